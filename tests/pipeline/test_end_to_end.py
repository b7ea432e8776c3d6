"""The whole data path with real processes: mosquitto → ingest → Redis → writer → ClickHouse.

Publishers are real MQTT clients: the simulator (its own encoders), paho, and
``mosquitto_pub``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from kit.encoders import frame
from kit.services import mqtt_login
from kit.store import count, wait_count
from paho.mqtt.enums import CallbackAPIVersion

# An hour ago, on a whole second: device times inside the writer's window (writer.device_time_max_past_s).
T0_S = int(time.time()) - 3600
T0_US = T0_S * 1_000_000


def _publisher(stack: Any) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"test-pub-{time.monotonic_ns()}")
    mqtt_login(c, stack.info)
    c.connect("127.0.0.1", stack.mqtt_port)
    c.loop_start()
    return c


def _publish_all(c: mqtt.Client, msgs: list[tuple[str, bytes]]) -> None:
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(10)
        assert i.is_published()


@pytest.mark.slow
def test_200_devices_mixed_formats_stored_exactly_once(stack_factory, loadtest) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory()
    r = loadtest(
        stack, "--rate", "4000", "--duration", "8", "--devices", "200", "--format", "mixed",
        "--per-message", "5", "--qos", "1",
    )
    assert r["published"] > 25_000
    assert r["lost"] == 0, r
    assert r["duplicated"] == 0, r
    assert r["mismatched"] == 0, r
    assert r["stored"] == r["published"]
    ch = stack.ch()
    assert count(ch, "SELECT uniqExact(device) FROM sensorhub.readings") >= 200
    # count() without FINAL is exact: no duplicate parts
    assert count(ch, "SELECT count() FROM sensorhub.readings") == count(
        ch, "SELECT uniqExact(device, metric, ts, seq) FROM sensorhub.readings"
    )


def test_bad_payloads_are_dead_lettered_and_good_ones_stored(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory()
    c = _publisher(stack)
    base = T0_US
    good_frame = frame("press-1", 7, base, [(1, 0, 0, 1.5), (2, 10, 1, -3.25)])
    bad_crc = bytearray(good_frame)
    bad_crc[-1] ^= 0xFF
    bad_magic = b"XX" + good_frame[2:]
    hot = b'{"metric": "temp_c", "value": "hot"}'
    bad_ilp = b"spindle rpm=12x00 1764072000000000000"
    msgs = [
        ("sensors/l1/press-1/frame", good_frame),
        ("sensors/l1/press-1/frame", bytes(bad_crc)),
        ("sensors/l1/press-1/frame", bad_magic),
        ("sensors/l1/press-2/frame", good_frame),  # topic names another device
        ("sensors/l1/oven-1/json", json.dumps({"metric": "temp_c", "value": 21.5, "ts": T0_S + 0.5, "seq": 1}).encode()),
        ("sensors/l1/oven-1/json", hot),
        ("sensors/l1/oven-1/json", b"{not json"),
        ("sensors/l1/mill-1/ilp", f"spindle,line=l1 rpm=1200i,load=0.75 {T0_S * 10**9}".encode()),
        ("sensors/l1/mill-1/ilp", bad_ilp),
    ]
    # (topic, raw payload, reason, byte offset the reason names), one per bad message
    want_dead = sorted([
        ("sensors/l1/press-1/frame", bytes(bad_crc), "ChecksumMismatch", len(good_frame) - 4),
        ("sensors/l1/press-1/frame", bad_magic, "BadMagic", 0),
        ("sensors/l1/press-2/frame", good_frame, "DeviceMismatch", 5),
        ("sensors/l1/oven-1/json", hot, "InvalidValue", hot.index(b'"hot"')),
        ("sensors/l1/oven-1/json", b"{not json", "SyntaxError_", 1),
        ("sensors/l1/mill-1/ilp", bad_ilp, "SyntaxError_", bad_ilp.index(b"12x00")),
    ])
    _publish_all(c, msgs)
    c.loop_stop()
    ch = stack.ch()
    assert wait_count(ch, "SELECT count() FROM sensorhub.dead_letters", 6) == 6
    assert wait_count(ch, "SELECT count() FROM sensorhub.readings", 5) == 5
    time.sleep(1.0)  # nothing more arrives
    assert count(ch, "SELECT count() FROM sensorhub.readings") == 5
    assert count(ch, "SELECT count() FROM sensorhub.dead_letters") == 6
    rows = ch.query("SELECT source, topic, hex(payload), error FROM sensorhub.dead_letters").result_rows
    assert {src for src, _, _, _ in rows} == {"mqtt"}
    got_dead = []
    for _, topic, payload_hex, error in rows:
        m = re.fullmatch(r"(\w+): .* \(at offset (\d+)\)", error)
        assert m, error
        got_dead.append((topic, bytes.fromhex(payload_hex), m[1], int(m[2])))  # the payload, raw and untouched
    assert sorted(got_dead) == want_dead
    mismatch = next(e for _, t, _, e in rows if t == "sensors/l1/press-2/frame")
    assert "'press-1'" in mismatch and "'press-2'" in mismatch, mismatch
    got = ch.query("SELECT device, metric, value, quality FROM sensorhub.readings ORDER BY device, metric").result_rows
    assert got == [
        ("mill-1", "spindle.load", 0.75, 0),
        ("mill-1", "spindle.rpm", 1200.0, 0),
        ("oven-1", "temp_c", 21.5, 0),
        ("press-1", "m1", 1.5, 0),
        ("press-1", "m2", -3.25, 1),
    ]


def test_order_within_a_device_is_send_order(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory()
    c = _publisher(stack)
    base = T0_US
    n = 300
    msgs = [("sensors/l2/seq-1/frame", frame("seq-1", i, base + i * 1000, [(1, 0, 0, float(i))])) for i in range(n)]
    _publish_all(c, msgs)
    c.loop_stop()
    ch = stack.ch()
    assert wait_count(ch, "SELECT count() FROM sensorhub.readings WHERE device = 'seq-1'", n) == n
    rows = ch.query(
        "SELECT seq, toUnixTimestamp64Micro(recv) FROM sensorhub.readings WHERE device = 'seq-1' ORDER BY seq"
    ).result_rows
    recv = [r for _, r in rows]
    assert [s for s, _ in rows] == [i * 65536 for i in range(n)]
    assert recv == sorted(recv), "a later frame was received before an earlier one"


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto_pub not installed")
def test_mosquitto_pub_json_and_audit_reconciles(stack_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory()
    # the stack's credentials in mosquitto_pub's options file, not on its command line
    if stack.info.get("secure"):
        (tmp_path / "mosquitto_pub").write_text(f"-u {stack.info['mqtt']['username']}\n-P {stack.info['mqtt']['password']}\n")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    for i in range(20):
        doc = json.dumps({"ts": T0_S + i, "seq": i, "values": {"rh": 40 + i, "temp_c": 20.5}})
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(stack.mqtt_port), "-q", "1",
             "-t", "sensors/l3/hvac-1/json", "-m", doc],
            check=True, timeout=10, env=env,
        )
    ch = stack.ch()
    assert wait_count(ch, "SELECT count() FROM sensorhub.readings WHERE device = 'hvac-1'", 40) == 40
    out = subprocess.run(
        [sys.executable, "-m", "sensorhub", "audit", "--reconcile", "--json",
         "--redis", stack.redis_url, "--clickhouse", stack.clickhouse_url],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    audit = json.loads(out.stdout)
    row = next(r for r in audit["rows"] if r["source"] == "mqtt")
    q = subprocess.run(
        [sys.executable, "-m", "sensorhub", "query", "--stack", str(stack.dir), "--format", "TSV",
         "SELECT metric, count() FROM sensorhub.readings WHERE device = 'hvac-1' GROUP BY metric ORDER BY metric"],
        capture_output=True, text=True, timeout=60,
    )
    assert q.returncode == 0, q.stderr
    assert q.stdout == "rh\t20\ntemp_c\t20\n"
    # received also counts the Sparkplug host's own STATE message on spBv1.0/#
    assert row["received"] >= 20 and row["xadded"] == 40 and row["stored"] == 40 and row["ok"]


def test_writer_stopped_raises_lag_alert_then_recovers(stack_factory) -> None:  # type: ignore[no-untyped-def]
    import signal

    stack = stack_factory("[writer]\nlag_alert_s = 2.0\n")
    r = stack.redis()
    stack.signal("writer", signal.SIGSTOP)
    try:
        c = _publisher(stack)
        base = T0_US
        _publish_all(c, [("sensors/l4/lag-1/frame", frame("lag-1", i, base + i, [(1, 0, 0, 1.0)])) for i in range(50)])
        deadline = time.monotonic() + 20
        alert = None
        while time.monotonic() < deadline and not alert:
            for _id, f in r.xrange("sh:events"):
                if f[b"kind"] == b"lag_alert":
                    alert = json.loads(f[b"data"])
            time.sleep(0.3)
        assert alert and alert["lag_s"] >= 2.0  # the event rounds to 0.1 s
        states = [json.loads(r.hget(k, "state")) for k in r.keys("sh:metrics:ingest:*")]
        assert any(s["gauges"].get("lag_alert") for s in states)
    finally:
        stack.signal("writer", signal.SIGCONT)
    ch = stack.ch()
    assert wait_count(ch, "SELECT count() FROM sensorhub.readings WHERE device = 'lag-1'", 50) == 50
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        states = [json.loads(r.hget(k, "state")) for k in r.keys("sh:metrics:ingest:*")]
        if states and not any(s["gauges"].get("lag_alert") for s in states):
            break
        time.sleep(0.3)
    assert not any(s["gauges"].get("lag_alert") for s in states)


def test_hop_latency_is_stored_per_interval_for_every_hop(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory("[writer]\nhop_latency_interval_s = 1.0\n")
    c = _publisher(stack)
    base = T0_US
    _publish_all(c, [("sensors/l5/hop-1/frame", frame("hop-1", i, base + i, [(1, 0, 0, 1.0)])) for i in range(200)])
    c.loop_stop()
    ch = stack.ch()
    want = {"recv_to_xadd", "decode_to_xadd", "xadd_to_read", "read_to_insert", "recv_to_insert", "device_to_insert"}
    deadline = time.monotonic() + 30
    hops: set[str] = set()
    while time.monotonic() < deadline and not want <= hops:
        hops = {h for (h,) in ch.query("SELECT DISTINCT hop FROM sensorhub.hop_latency").result_rows}
        time.sleep(0.5)
    assert want <= hops, hops
    query = "SELECT process, sum(count), max(p99_ms) FROM sensorhub.hop_latency WHERE hop = 'recv_to_insert' GROUP BY process"
    # The readings may span intervals, and an interval's row lands a moment after it closes: wait
    # for all 200, then for three more intervals, so a cumulative count would have grown past 200.
    rows = ch.query(query).result_rows
    while time.monotonic() < deadline and sum(int(n) for _, n, _ in rows) < 200:
        time.sleep(0.5)
        rows = ch.query(query).result_rows
    time.sleep(3.0)
    rows = ch.query(query).result_rows
    assert sum(int(n) for _, n, _ in rows) == 200  # per interval, not cumulative: each reading counted once
    assert all(p.startswith("writer:") for p, _, _ in rows)
