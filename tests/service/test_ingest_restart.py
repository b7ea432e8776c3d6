"""A killed ingest process is READY again, and another source keeps flowing meanwhile.

Two MQTT sources share the device load through an MQTT v5 shared subscription
(the scale-out layout): the stack's own ingest ``mqtt`` and a second process
``mqtt2`` under its own supervisor. ``mqtt`` is killed with SIGKILL while the
simulator publishes; the supervisor (Restart=always, RestartSec=0.5) brings
it back. The other source must keep receiving all the while, and the run
must end with every reading stored exactly once. How fast the killed one is
back (ARCHITECTURE.md: within 5 s) is measured by ``benchmarks/service.py``;
the test bounds it only as liveness, at about ten times the usual second.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sensorhub.security.credentials import Credentials
from sensorhub.service.supervisor import ChildSpec, Supervisor

CONFIG = """
[mqtt]
shared_group = "ingest"

[sources.mqtt]
driver = "mqtt"

[sources.mqtt2]
driver = "mqtt"
"""


def _frames_of(redis: Any, name: str) -> int:
    total = 0
    for key in redis.keys(f"sh:metrics:ingest:{name}:*"):
        raw = redis.hget(key, "state")
        if raw:
            total = max(total, int(json.loads(raw)["counters"].get("frames", 0)))
    return total


def test_killed_ingest_is_ready_again_while_another_source_flows(stack_factory, loadtest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(CONFIG)
    cfg = next(stack.dir.parent.glob("sensorhub-*.toml"))
    env = {
        "SENSORHUB_REDIS_URL": stack.redis_url,
        "SENSORHUB_CLICKHOUSE_URL": stack.clickhouse_url,
        "SENSORHUB_MQTT_PORT": str(stack.mqtt_port),
        "PATH": os.environ.get("PATH", ""),
    }
    if stack.info.get("secure"):  # the second ingest runs as the stack's ingest account
        env["SENSORHUB_MQTT_USERNAME_FILE"] = str(Credentials(stack.dir).ingest_user_file)
        env["SENSORHUB_MQTT_PASSWORD_FILE"] = str(Credentials(stack.dir).ingest_password_file)
    second = ChildSpec(
        "mqtt2",
        (sys.executable, "-m", "sensorhub", "--config", str(cfg), "ingest", "--source", "mqtt2"),
        env=env,
        output=str(tmp_path / "mqtt2.log"),
    )
    r = stack.redis()
    with Supervisor([second]) as sup:
        assert sup.wait_ready("mqtt2", timeout_s=60)
        import threading

        result: dict[str, Any] = {}
        load = threading.Thread(
            target=lambda: result.update(
                loadtest(stack, "--rate", "4000", "--duration", "12", "--per-message", "5", "--qos", "1")
            )
        )
        load.start()
        time.sleep(4)
        before = _frames_of(r, "mqtt2")
        old = stack.signal("ingest", signal.SIGKILL)
        killed = time.monotonic()
        back_pid = stack.wait_restarted("ingest", old, timeout=10)  # READY with a new PID
        back_s = time.monotonic() - killed
        restarts = stack.status()["restarts"]
        time.sleep(max(0.0, 3.0 - back_s))  # metrics are published once a second
        during = _frames_of(r, "mqtt2") - before
        load.join(120)
        state = sup.state("mqtt2")
    assert back_pid != old
    assert restarts.get("ingest") == 1  # brought back by the stack's supervisor, once
    assert during > 0, "the other source received nothing while the first was down"
    assert state.restarts == 0  # the other source was not touched
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["mismatched"] == 0, result
    assert _frames_of(r, "mqtt") > 0  # the restarted source takes its share again
