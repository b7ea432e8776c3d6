"""A redelivery is what MQTT says it is; two identical payloads are two readings.

Real devices repeat themselves: a sensor whose value does not change sends the
same bytes every second, and a reading without ``ts`` takes its receive time,
so every message is a new reading. The broker, on the other hand, hands a
message it had sent and not had acknowledged over again (DUP flag, same packet
id) after the ingest comes back, and hands a topic's retained message to every
new subscription. All of it against the real mosquitto, ingest, Redis, writer
and ClickHouse of ``sensorhub stack``.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from kit.services import mqtt_login
from kit.store import count, wait_count
from paho.mqtt.enums import CallbackAPIVersion

from sensorhub.security.credentials import Credentials

DEVICES = [f"press-{i}" for i in range(8)]  # per test line: <line>-press-<i>
REPEATS = 15
JSON_PAYLOAD = json.dumps({"metric": "temp_c", "value": 21.5}).encode()
ILP_PAYLOAD = b"env temp_c=21.5"


def _publisher(stack: Any, name: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{name}-{time.monotonic_ns()}")
    c.max_inflight_messages_set(1000)
    mqtt_login(c, stack.info)
    c.connect("127.0.0.1", stack.mqtt_port)
    c.loop_start()
    return c


def _publish(c: mqtt.Client, msgs: list[tuple[str, bytes]], qos: int, retain: bool = False) -> None:
    infos = [c.publish(t, p, qos=qos, retain=retain) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(30)
        assert i.is_published()


def _repeated(line: str, rounds: int = REPEATS) -> list[list[tuple[str, bytes]]]:
    """Per round, every device's identical timestamp-less JSON and line-protocol payloads."""
    return [
        [(f"sensors/{line}/{line}-{d}/json", JSON_PAYLOAD) for d in DEVICES]
        + [(f"sensors/{line}/{line}-{d}/ilp", ILP_PAYLOAD) for d in DEVICES]
        for _ in range(rounds)
    ]


def _readings(where: str) -> str:
    return f"SELECT count() FROM sensorhub.readings WHERE {where}"


def _settled(ch: Any, where: str, want: int) -> int:
    """The count once it reached ``want`` and stayed put for a moment (nothing more arrives)."""
    wait_count(ch, _readings(where), want)
    time.sleep(1.5)
    return count(ch, _readings(where))


def _audit(redis: Any, field: str) -> int:
    return sum(int(redis.hget(k, field) or 0) for k in redis.scan_iter("sh:audit:*"))


@pytest.mark.parametrize("client", ["native", "paho"])
def test_repeated_timestampless_payloads_are_all_stored(stack_factory, client: str) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(f'[mqtt]\nclient = "{client}"\n')
    pub = _publisher(stack, "repeat")
    try:
        for qos, line in ((1, "q1"), (0, "q0")):
            for batch in _repeated(line):
                _publish(pub, batch, qos)
                time.sleep(0.05)
    finally:
        pub.loop_stop()
        pub.disconnect()
    ch = stack.ch()
    per_line = len(DEVICES) * 2 * REPEATS
    for line in ("q1", "q0"):
        # QoS 0 is at most once by definition, but nothing on loopback drops it
        assert _settled(ch, f"startsWith(device, '{line}-')", per_line) == per_line, line
        for metric in ("temp_c", "env.temp_c"):
            per_device = ch.query(
                f"SELECT device, count() FROM sensorhub.readings WHERE startsWith(device, '{line}-') "
                f"AND metric = '{metric}' GROUP BY device"
            ).result_rows
            assert sorted(per_device) == [(f"{line}-{d}", REPEATS) for d in DEVICES], (line, metric)
    total = int(ch.command("SELECT count() FROM sensorhub.readings"))
    assert total == 2 * per_line, total
    # one row per message: every reading has its own receive time, per device and metric
    assert int(ch.command("SELECT uniqExact(device, metric, ts, seq) FROM sensorhub.readings")) == total
    assert int(ch.command("SELECT count() FROM sensorhub.dead_letters")) == 0
    assert _audit(stack.redis(), "duplicates") == 0


def test_long_topics_sharing_a_prefix_are_told_apart(stack_factory) -> None:  # type: ignore[no-untyped-def]
    """The same timestamped payload on two topics that share their first 80 characters."""
    stack = stack_factory()
    line = "l" * 80
    # an hour ago: inside the writer's device-time window
    payload = json.dumps({"metric": "temp_c", "value": 1.0, "ts": int(time.time()) - 3600 + 0.5, "seq": 3}).encode()
    pub = _publisher(stack, "long")
    try:
        _publish(pub, [(f"sensors/{line}/{d}/json", payload) for d in ("a", "b")], 1)
    finally:
        pub.loop_stop()
        pub.disconnect()
    ch = stack.ch()
    assert _settled(ch, "1", 2) == 2
    assert sorted(r[0] for r in ch.query("SELECT device FROM sensorhub.readings").result_rows) == ["a", "b"]


def test_ingest_killed_between_redis_and_ack_stores_each_message_once(stack_factory) -> None:  # type: ignore[no-untyped-def]
    """The ingest dies after its readings are in Redis and before the PUBACKs: the broker redelivers.

    The redelivered messages carry the DUP flag and their packet ids; they are
    recognised as written. Messages the dead process had not written yet are
    new. Identical timestamp-less payloads throughout, so content tells nothing.
    """
    stack = stack_factory("[ingest]\nfault_crash_after_flush = 5\n")
    old = stack.pid("ingest")
    pub = _publisher(stack, "crash")
    rounds = _repeated("k", rounds=40)
    try:
        for batch in rounds:
            _publish(pub, batch, 1)
            time.sleep(0.05)
    finally:
        pub.loop_stop()
        pub.disconnect()
    stack.wait_restarted("ingest", old, timeout=60)
    r = stack.redis()
    assert r.get("sh:fault:ingest-crashed") is not None, "the fault was not injected"
    want = sum(len(b) for b in rounds)
    ch = stack.ch()
    assert _settled(ch, "1", want) == want
    assert int(ch.command("SELECT uniqExact(device, metric, ts, seq) FROM sensorhub.readings")) == want
    # the broker did redeliver what the dead process had written, and it was recognised
    assert _audit(r, "duplicates") > 0


def test_kill_9_while_repeated_payloads_flow(stack_factory) -> None:  # type: ignore[no-untyped-def]
    """kill -9 at an arbitrary moment of a stream of identical payloads: each stored exactly once."""
    stack = stack_factory()
    pub = _publisher(stack, "kill")
    rounds = _repeated("x", rounds=60)
    try:
        for i, batch in enumerate(rounds):
            _publish(pub, batch, 1)
            time.sleep(0.03)
            if i == 20:
                old = stack.signal("ingest", signal.SIGKILL)
        stack.wait_restarted("ingest", old, timeout=60)
    finally:
        pub.loop_stop()
        pub.disconnect()
    want = sum(len(b) for b in rounds)
    ch = stack.ch()
    assert _settled(ch, "1", want) == want


def test_retained_message_is_one_reading_across_restarts(stack_factory) -> None:  # type: ignore[no-untyped-def]
    """A retained reading is handed to every new subscription; restarts do not make it new readings."""
    stack = stack_factory()
    pub = _publisher(stack, "retain")
    payload = json.dumps({"metric": "setpoint", "value": 42.0}).encode()
    topic = "sensors/r/valve-1/json"
    try:
        _publish(pub, [(topic, payload)], 1, retain=True)
        ch = stack.ch()
        assert _settled(ch, "metric = 'setpoint'", 1) == 1
        # a restarted ingest subscribes again: MQTT 5 sends retained messages to new subscriptions only
        for _ in range(2):
            old = stack.signal("ingest", signal.SIGKILL)
            stack.wait_restarted("ingest", old, timeout=60)
        # a subscription that is new (its session gone) gets the retained message again: stored once
        r = stack.redis()
        old = stack.pid("ingest")
        stack.signal("ingest", signal.SIGSTOP)
        _drop_session(stack)
        stack.signal("ingest", signal.SIGKILL)
        stack.wait_restarted("ingest", old, timeout=60)
        # a live message on the same topic is a new reading as ever
        _publish(pub, [(topic, payload)], 1)
    finally:
        pub.loop_stop()
        pub.disconnect()
    assert _settled(ch, "metric = 'setpoint'", 2) == 2
    assert _audit(r, "duplicates") >= 1  # the retained copy handed to the new subscription


def _drop_session(stack: Any) -> None:
    """End the ingest's broker session: take its client id over with a clean start."""
    cid = f"sensorhub-ingest-{stack.mqtt_port}"  # the stack's ingest (SENSORHUB_MQTT_CLIENT_ID)
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    if stack.info.get("secure"):  # the ingest's own account: its client id is taken over by its owner
        creds = Credentials(stack.dir)
        c.username_pw_set(creds.ingest_user(), creds.ingest_password_file.read_text().strip())
    c.connect("127.0.0.1", stack.mqtt_port, clean_start=True)
    c.loop_start()
    deadline = time.monotonic() + 10
    while not c.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.is_connected()
    c.disconnect()
    c.loop_stop()
