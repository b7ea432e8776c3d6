"""A running stack with alert rules for the alert tests, and helpers to drive it.

Readings go in over MQTT as JSON with explicit device times; events are read
back from the events stream, over WebSocket and from ClickHouse. A *marker*
(rule ``marker``: a reading of metric ``marker`` above 0.5 opens it, below
closes it) sent after a test's readings on the same device tells when the
evaluator has seen them all: one device's readings stay in order through the
pipeline, so once the marker's closed event is there, every event of the
readings before it is too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import redis as redis_mod
from kit.services import mqtt_login
from paho.mqtt.enums import CallbackAPIVersion

from sensorhub.alerts.keys import AlertKeys
from sensorhub.pipeline.keys import StreamLayout

RULES = """
[alerts]
client_queue = 32
checkpoint_ms = 500
tick_ms = 100

[[alerts.rules]]
name = "hot"
device = "hot-*"
metric = "temp_c"
above = 80.0
clear_at = 75.0
severity = "critical"

[[alerts.rules]]
name = "slow-hot"
device = "slow-*"
metric = "temp_c"
above = 80.0
for_s = 10

[[alerts.rules]]
name = "quiet"
device = "quiet-*"
silent_s = 1.5
severity = "info"

[[alerts.rules]]
name = "storm"
device = "storm-*"
metric = "v"
above = 50.0

[[alerts.rules]]
name = "filt"
device = "filt-*"
metric = "v"
above = 50.0

[[alerts.rules]]
name = "filt-critical"
device = "filt-*"
metric = "w"
above = 50.0
severity = "critical"

[[alerts.rules]]
name = "marker"
metric = "marker"
above = 0.5
severity = "info"
"""

T0 = time.time() - 30 * 86400  # device times a month back: inside the writer's window; markers 10 days on


class AlertStack:
    """The running stack, with helpers to publish readings and read events back."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.mqtt_port: int = info["mqtt"]["port"]
        self.alerts_url: str = info["alerts_url"]
        token = info.get("alerts_token")  # a secured stack's gateway wants it
        self.ws_headers: dict[str, str] = {"Authorization": f"Bearer {token}"} if token else {}
        self._page_query = f"?token={token}" if token else ""
        self.redis: Any = redis_mod.Redis.from_url(info["redis_url"])
        self.keys = AlertKeys(StreamLayout())
        self._mqtt = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                 client_id=f"alerts-test-{time.monotonic_ns()}")
        mqtt_login(self._mqtt, info)
        self._mqtt.connect("127.0.0.1", self.mqtt_port)
        self._mqtt.loop_start()
        self._marks = 0

    @property
    def page_url(self) -> str:
        return self.alerts_url.replace("ws://", "http://").removesuffix("/alerts") + "/" + self._page_query

    def publish(self, device: str, readings: list[tuple[str, float, float]], chunk: int = 500) -> None:
        """Readings ``(metric, value, ts)`` of ``device``, as JSON arrays of up to ``chunk``, QoS 1."""
        infos = []
        for i in range(0, len(readings), chunk):
            doc = [{"metric": m, "value": v, "ts": round(ts, 6)} for m, v, ts in readings[i : i + chunk]]
            infos.append(self._mqtt.publish(f"sensors/line1/{device}/json", json.dumps(doc), qos=1))
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()

    def mark(self, device: str, timeout: float = 60.0) -> None:
        """Wait until the evaluator has seen every reading published for ``device`` so far."""
        self._marks += 1
        ts = T0 + 10 * 86400 + self._marks
        self.publish(device, [("marker", 1.0, ts), ("marker", 0.0, ts + 0.001)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["rule"] == "marker" and e["state"] == "closed" and abs(e["ts"] - (ts + 0.001)) < 1e-5
                   for e in self.events(device, rules=("marker",))):
                return
            time.sleep(0.05)
        raise TimeoutError(f"the evaluator did not see the marker of {device} within {timeout} s")

    def events(self, device: str, rules: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Every event of ``device`` in the events stream, in order (markers only if asked for)."""
        out = []
        for _id, fields in self.redis.xrange(self.keys.events):
            ev = json.loads(fields[b"e"])
            if ev["device"] != device:
                continue
            if (rules is None and ev["rule"] != "marker") or (rules is not None and ev["rule"] in rules):
                out.append(ev)
        return out

    def metrics(self, role: str) -> dict[str, Any]:
        """The freshest metrics snapshot of a process in ``role`` (alerts, gateway); {} if none."""
        best: dict[str, Any] = {}
        for key in self.redis.scan_iter("sh:metrics:*"):
            raw = self.redis.hget(key, "state")
            snap = json.loads(raw) if raw else {}
            if snap.get("role") == role and snap.get("heartbeat", 0) > best.get("heartbeat", 0):
                best = snap
        return best

    def close(self) -> None:
        self._mqtt.loop_stop()
        self._mqtt.disconnect()
        self.redis.close()


def start(d: Path, config_text: str) -> dict[str, Any]:
    """``sensorhub --config FILE stack up --json`` in ``d``; returns its JSON."""
    cfg = d / "sensorhub.toml"
    d.mkdir(parents=True, exist_ok=True)
    cfg.write_text(config_text)
    argv = [sys.executable, "-m", "sensorhub", "--config", str(cfg), "stack", "up", "--dir", str(d / "stack"),
            "--json", "--timeout", "120"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    if out.returncode != 0:
        raise RuntimeError(f"stack up failed:\n{out.stdout}\n{out.stderr}")
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def stack_down(info: dict[str, Any]) -> None:
    from sensorhub.service.stack import stack_down as down

    down(Path(info["dir"]))
