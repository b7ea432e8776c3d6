"""Simulated Sparkplug nodes answer the host's rebirth command (NCMD), over the aiomqtt control connection."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware_sim.control import REBIRTH_METRIC, rebirth_requested
from sensorhub.decoders.sparkplug_host import encode_rebirth

ROOT = Path(__file__).resolve().parents[2]


def test_the_host_rebirth_command_is_recognised() -> None:
    # the host's own encoder (sensorhub) against the simulator's own reader
    assert rebirth_requested(encode_rebirth(1_764_072_000_000))
    name = REBIRTH_METRIC.encode()
    metric_false = b"\x0a" + bytes([len(name)]) + name + b"\x20\x0b" + b"\x70\x00"  # boolean_value = false
    assert not rebirth_requested(b"\x08\x01\x12" + bytes([len(metric_false)]) + metric_false)
    other = b"\x0a\x05bdSeq\x20\x04\x70\x01"
    assert not rebirth_requested(b"\x12" + bytes([len(other)]) + other)
    for garbage in (b"", b"\x12\x7f", b"\xff\xff\xff", b"\x12\x03\x0a\x09a"):
        assert not rebirth_requested(garbage)


def test_a_node_rebirths_when_the_host_asks(mosquitto: Any, tmp_path: Path) -> None:
    births: dict[str, int] = {}
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        with lock:
            births[msg.topic] = births.get(msg.topic, 0) + 1

    watcher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="rebirth-watcher")
    watcher.on_message = on_message
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.subscribe("spBv1.0/+/NBIRTH/+", qos=1)
    watcher.loop_start()
    sim = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim", "run", "--mqtt", f"{mosquitto.host}:{mosquitto.port}",
         "--devices", "2", "--format", "sparkplug", "--rate", "20", "--duration", "8", "--json",
         "--truth", str(tmp_path / "sim.truth"), "--client-prefix", "rebirth"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(births) < 2:  # liveness bound, not a timing
            time.sleep(0.1)
        assert len(births) == 2, births  # both nodes born; the control connection listens from before
        target = sorted(births)[0]
        _, group, _, edge = target.split("/")
        watcher.publish(f"spBv1.0/{group}/NCMD/{edge}", encode_rebirth(int(time.time() * 1000)), qos=1)
        while time.monotonic() < deadline + 20 and births[target] < 2:
            time.sleep(0.1)
        with lock:
            seen = dict(births)
        assert seen[target] == 2, seen
        assert all(n == 1 for t, n in seen.items() if t != target), seen
        out, err = sim.communicate(timeout=60)  # the run ends by itself after its 8 s
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.communicate()
        watcher.loop_stop()
        watcher.disconnect()
    assert sim.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["rebirths"] == 1, result
