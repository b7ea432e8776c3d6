"""Dead letters decode again after a fix, and a replay run twice stores them once."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
from kit.encoders import frame
from kit.services import mqtt_login
from paho.mqtt.enums import CallbackAPIVersion


def _frame(device: str, seq: int, n: int) -> bytes:
    # an hour ago: inside the writer's device-time window
    return frame(device, seq, (int(time.time()) - 3600) * 1_000_000 + seq, [(1, i, 0, float(i)) for i in range(n)])


def _replay(stack, *args: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    out = subprocess.run(
        [sys.executable, "-m", "sensorhub", "dlq", "replay", "--json", "--clickhouse", stack.clickhouse_url, *args],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_replay_after_a_configuration_fix_stores_each_reading_once(stack_factory) -> None:  # type: ignore[no-untyped-def]
    # the stack runs with a payload limit too small for 40-reading frames
    stack = stack_factory("[mqtt]\nmax_payload_bytes = 256\n")
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="dlq-test")
    mqtt_login(c, stack.info)
    c.connect("127.0.0.1", stack.mqtt_port)
    c.loop_start()
    msgs = [_frame("big-1", s, 40) for s in range(5)] + [_frame("small-1", s, 2) for s in range(3)]
    msgs.append(b"SH\x07garbage")
    for m in msgs:
        dev = "big-1" if b"big-1" in m else "small-1"
        c.publish(f"sensors/l1/{dev}/frame", m, qos=1).wait_for_publish(10)
    c.loop_stop()
    ch = stack.ch()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and int(ch.command("SELECT count() FROM sensorhub.dead_letters")) < 6:
        time.sleep(0.2)
    assert int(ch.command("SELECT count() FROM sensorhub.dead_letters")) == 6
    assert int(ch.command("SELECT count() FROM sensorhub.readings")) == 6  # the small frames

    # still failing with the stack's configuration: nothing stored
    env_cfg = ["--config", str(stack.dir.parent / "sensorhub-0.toml")]
    out = subprocess.run(
        [sys.executable, "-m", "sensorhub", *env_cfg, "dlq", "replay", "--json", "--clickhouse", stack.clickhouse_url],
        capture_output=True, text=True, timeout=120,
    )
    report = json.loads(out.stdout)
    assert report["replayed"] == 0 and report["still_failing"] == 6

    # after the fix (default limit): the five frames decode, the garbage does not
    report = _replay(stack)
    assert report == {**report, "considered": 6, "replayed": 5, "readings": 200, "still_failing": 1}
    assert any("UnsupportedVersion" in r or "version" in r for r in report["reasons"])
    assert int(ch.command("SELECT count() FROM sensorhub.readings WHERE device = 'big-1'")) == 200

    # a second replay finds nothing new; nothing is stored twice
    report = _replay(stack)
    assert report["considered"] == 1 and report["replayed"] == 0
    assert int(ch.command("SELECT count() FROM sensorhub.readings")) == 206
    assert int(ch.command("SELECT uniqExact(device, metric, ts, seq) FROM sensorhub.readings")) == 206
