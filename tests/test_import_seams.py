"""What a module loads when imported: the seams that keep a process from paying for another's imports.

Each check runs in a fresh interpreter and looks at ``sys.modules``; it asserts
what is loaded, never how long it took (that is ``python -X importtime``'s job).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CODEC = ("sensorhub._ext.entrycodec", "sensorhub.pipeline.entrycodec_py")


def _loaded(code: str, watched: tuple[str, ...], pure: bool = False) -> list[str]:
    """Which of ``watched`` (packages count with their submodules) ``code`` leaves in ``sys.modules``."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(w for w in {list(watched)!r} "
        "if any(m == w or m.startswith(w + '.') for m in sys.modules))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "SENSORHUB_PURE_PYTHON"}
    if pure:
        env["SENSORHUB_PURE_PYTHON"] = "1"
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    found: list[str] = json.loads(p.stdout.strip().splitlines()[-1])
    return found


@pytest.mark.parametrize("pure", [False, True], ids=["cython", "python"])
def test_the_monitor_and_the_metrics_read_key_names_without_the_entry_codec(pure: bool) -> None:
    code = "import sensorhub.monitor.state, sensorhub.metrics.snapshot, sensorhub.pipeline.keys"
    assert _loaded(code, CODEC, pure) == []
    # the probe sees the codec when it is loaded, in either implementation
    assert (CODEC[1] if pure else CODEC[0]) in _loaded("import sensorhub.pipeline.streams", CODEC, pure)
