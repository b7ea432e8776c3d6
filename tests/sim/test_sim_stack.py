"""``sensorhub-sim loadtest --stack DIR --tls``: the broker's TLS port and CA, its account and the
ClickHouse URL all come from a running ``sensorhub stack``; nothing else is given."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def test_loadtest_takes_everything_from_the_stack(stack_factory: Any) -> None:
    stack = stack_factory()
    mq = stack.info["mqtt"]
    assert mq["tls_port"] and mq["ca_file"] and mq["username"]  # what --stack relies on
    argv = [sys.executable, "-m", "firmware_sim", "loadtest", "--stack", str(stack.dir), "--tls",
            "--rate", "2000", "--duration", "2", "--devices", "20", "--format", "mixed", "--json",
            "--client-prefix", "stacktls", "--device-prefix", "stacktls"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"status {out.returncode}:\n{out.stdout}\n{out.stderr}"
    r = json.loads(lines[-1])
    assert out.returncode == 0, r
    assert r["published"] > 3000
    assert (r["lost"], r["duplicated"], r["mismatched"]) == (0, 0, 0)
    assert mq["password"] not in out.stderr + out.stdout
