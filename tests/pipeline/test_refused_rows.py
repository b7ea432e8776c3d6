"""Rows ClickHouse refuses, through the real processes: the rest of their batch is stored, they are dead-lettered.

The operator adds a rule to ``readings`` that some readings break (a CHECK
constraint); ClickHouse then refuses every INSERT holding one. The writer
must store every other reading once, dead-letter exactly the refused ones
with ClickHouse's reason, acknowledge, and the audit must reconcile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from decimal import Decimal

import paho.mqtt.client as mqtt
from kit.services import mqtt_login
from paho.mqtt.enums import CallbackAPIVersion

from firmware_sim.encoders import FrameReading, encode_frame


def test_rows_clickhouse_refuses_are_dead_lettered_and_the_rest_stored(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory()
    ch = stack.ch()
    ch.command("ALTER TABLE sensorhub.readings ADD CONSTRAINT plausible CHECK value < 1000")
    # no merges: a row stored twice would stay twice
    ch.command("SYSTEM STOP MERGES sensorhub.readings")
    now_us = time.time_ns() // 1000
    good: dict[tuple[str, str, int, int], float] = {}
    bad: dict[tuple[str, str, int, int], float] = {}
    msgs = []
    for f in range(40):
        for d in range(3):
            dev = f"mill-{d}"
            base = now_us - 30_000_000 + f * 1000
            # every 7th frame of mill-1 carries one implausible value
            values = [float(f * 3 + i) + (5000.0 if (d == 1 and f % 7 == 0 and i == 2) else 0.0) for i in range(4)]
            readings = [FrameReading(1 + i, i, 0, v) for i, v in enumerate(values)]
            msgs.append((f"sensors/l2/{dev}/frame", encode_frame(dev, f, base, readings)))
            for i, r in enumerate(readings):
                (bad if r.value >= 1000 else good)[(dev, f"m{r.metric_id}", base + i, f * 65536 + i)] = r.value
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="refused-rows-test")
    mqtt_login(c, stack.info)
    c.connect("127.0.0.1", stack.mqtt_port)
    c.loop_start()
    try:
        for info in [c.publish(t, p, qos=1) for t, p in msgs]:
            info.wait_for_publish(20)
            assert info.is_published()
    finally:
        c.loop_stop()
        c.disconnect()

    def counts() -> tuple[int, int]:
        return (
            int(ch.command("SELECT count() FROM sensorhub.readings WHERE device LIKE 'mill-%'")),
            int(ch.command("SELECT count() FROM sensorhub.dead_letters WHERE topic LIKE '$sensorhub/readings/mill-%'")),
        )

    deadline = time.monotonic() + 90
    while counts() < (len(good), len(bad)) and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1.0)  # anything late (a duplicate) would show now
    assert counts() == (len(good), len(bad))
    stored = ch.query(
        "SELECT device, metric, toUnixTimestamp64Micro(ts), seq, value FROM sensorhub.readings WHERE device LIKE 'mill-%'"
    ).result_rows
    assert {(d, m, int(t), int(s)): v for d, m, t, s, v in stored} == good
    dead = {}
    for topic, payload, error in ch.query(
        "SELECT topic, payload, error FROM sensorhub.dead_letters WHERE topic LIKE '$sensorhub/readings/mill-%'",
        column_formats={"payload": "bytes"},
    ).result_rows:
        doc = json.loads(payload, parse_float=Decimal)
        assert topic == f"$sensorhub/readings/{doc['device']}"
        assert error.startswith("refused by ClickHouse: Code: 469.") and "plausible" in error, error
        dead[(doc["device"], doc["metric"], int(doc["ts"] * 1_000_000), int(doc["seq"]))] = float(doc["value"])
    assert dead == bad
    out = subprocess.run(
        [sys.executable, "-m", "sensorhub", "audit", "--reconcile", "--json",
         "--redis", stack.redis_url, "--clickhouse", stack.clickhouse_url],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert sum(r["writer_dead_lettered"] for r in json.loads(out.stdout)["rows"]) == len(bad)
