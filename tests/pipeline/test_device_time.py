"""A device with a broken clock among healthy ones, through the real processes.

mosquitto → ingest → Redis → writer → ClickHouse, published with the
simulator's frame encoder. The broken device dates its frames over 160
different months, one in the year 2500 and one at the epoch: every one of
its readings must be either stored or dead-lettered with the reason (checked
one by one), every healthy reading stored, the audit must reconcile, and
``sensorhub dlq replay`` with a wider window must store the dead-lettered
readings it now accepts, once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from kit.services import mqtt_login, publish_all
from paho.mqtt.enums import CallbackAPIVersion

from firmware_sim.encoders import FrameReading, encode_frame

DAY_US = 86_400_000_000
YEAR_2500_US = 16_725_225_600_000_000
BROKEN = "clock-9"

Key = tuple[str, int, int]  # metric, ts_us, seq


def _messages(now_us: int) -> tuple[list[tuple[str, bytes]], dict[tuple[str, str, int, int], float], dict[Key, float]]:
    """Healthy frames and the broken device's frames, interleaved; and what each holds."""
    healthy_msgs, healthy = [], {}
    for d in range(5):
        dev = f"ok-{d}"
        for f in range(30):
            base = now_us - 60_000_000 + f * 1000
            readings = [FrameReading(1 + i, i, 0, float(d * 1000 + f * 10 + i)) for i in range(4)]
            healthy_msgs.append((f"sensors/l1/{dev}/frame", encode_frame(dev, f, base, readings)))
            for i, r in enumerate(readings):
                healthy[(dev, f"m{r.metric_id}", base + i, f * 65536 + i)] = r.value
    # 160 frames 31 days apart (each in another month), then the year 2500, then the epoch
    bases = [now_us - k * 31 * DAY_US for k in range(160)] + [YEAR_2500_US, 0]
    broken_msgs, broken = [], {}
    for f, base in enumerate(bases):
        readings = [FrameReading(7, 0, 0, f + 0.5), FrameReading(8, 1, 2, -f - 0.25)]
        broken_msgs.append((f"sensors/l9/{BROKEN}/frame", encode_frame(BROKEN, f, base, readings)))
        for i, r in enumerate(readings):
            broken[(f"m{r.metric_id}", base + i, f * 65536 + i)] = r.value
    msgs = []
    for i in range(max(len(healthy_msgs), len(broken_msgs))):
        msgs += healthy_msgs[i : i + 1] + broken_msgs[i : i + 1]
    return msgs, healthy, broken


def _publish(stack: Any, msgs: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"clock-test-{time.monotonic_ns()}")
    publish_all(mqtt_login(c, stack.info), "127.0.0.1", stack.mqtt_port, msgs)


def _broken_now(ch: Any) -> tuple[dict[Key, list[float]], dict[Key, list[tuple[float, str]]]]:
    stored: dict[Key, list[float]] = {}
    for metric, ts, seq, value in ch.query(
        "SELECT metric, toUnixTimestamp64Micro(ts), seq, value FROM sensorhub.readings WHERE device = {d:String}",
        parameters={"d": BROKEN},
    ).result_rows:
        stored.setdefault((metric, int(ts), int(seq)), []).append(value)
    dead: dict[Key, list[tuple[float, str]]] = {}
    for payload, error in ch.query(
        "SELECT payload, error FROM sensorhub.dead_letters WHERE topic = {t:String}",
        parameters={"t": f"$sensorhub/readings/{BROKEN}"}, column_formats={"payload": "bytes"},
    ).result_rows:
        doc = json.loads(payload, parse_float=Decimal)
        assert doc["device"] == BROKEN
        key = (doc["metric"], int(doc["ts"] * 1_000_000), int(doc["seq"]))
        dead.setdefault(key, []).append((float(doc["value"]), error))
    return stored, dead


def _wait(fn: Any, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (v := fn()) and time.monotonic() < deadline:
        time.sleep(0.3)
    return v


def _audit_ok(stack: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sensorhub", "audit", "--reconcile", "--json",
         "--redis", stack.redis_url, "--clickhouse", stack.clickhouse_url],
        capture_output=True, text=True, timeout=120,
    )


def test_a_broken_clock_loses_nothing_and_stops_no_one(stack_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory()
    now_us = time.time_ns() // 1000
    msgs, healthy, broken = _messages(now_us)
    _publish(stack, msgs)
    ch = stack.ch()

    def all_in() -> bool:
        stored, dead = _broken_now(ch)
        n_ok = int(ch.command("SELECT count() FROM sensorhub.readings WHERE device LIKE 'ok-%'"))
        return n_ok >= len(healthy) and len(stored) + len(dead) >= len(broken)

    assert _wait(all_in), "not everything arrived"
    time.sleep(1.0)  # anything late (a duplicate) would show now

    # every healthy reading, once, with its value
    got = ch.query(
        "SELECT device, metric, toUnixTimestamp64Micro(ts), seq, value FROM sensorhub.readings WHERE device LIKE 'ok-%'"
    ).result_rows
    assert len(got) == len(healthy)
    assert {(d, m, int(t), int(s)): v for d, m, t, s, v in got} == healthy

    # every reading of the broken clock: stored or dead-lettered with the reason, never both, never twice
    stored, dead = _broken_now(ch)
    window_start = now_us - 400 * DAY_US
    for key, value in broken.items():
        where = "stored" if key in stored else "dead" if key in dead else "nowhere"
        assert (key in stored) + (key in dead) == 1, (key, where)
        ts = key[1]
        if window_start + DAY_US < ts < now_us + 3_600_000_000:
            assert stored.get(key) == [value], (key, where)
        else:
            assert window_start - DAY_US > ts or ts > now_us + 3_600_000_000, key
            [(dvalue, error)] = dead[key]
            assert dvalue == value
            assert error.startswith("device time "), error
            if ts == YEAR_2500_US or ts == YEAR_2500_US + 1:
                assert "outside the range of the ts column" in error
            else:
                assert "before its receive time" in error and "writer.device_time_max_past_s" in error
    assert set(stored) | set(dead) == set(broken)
    assert len(stored) == 2 * 13  # the frames of the last 400 days
    months = ch.command(
        "SELECT uniqExact(toYYYYMM(ts)) FROM sensorhub.readings WHERE device = {d:String}", parameters={"d": BROKEN}
    )
    assert int(months) == 13

    out = _audit_ok(stack)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    rows = json.loads(out.stdout)["rows"]
    assert sum(r["writer_dead_lettered"] for r in rows) == len(dead)

    # the operator widens the window to its maximum (6 years back) and replays
    wide = tmp_path / "wide.toml"
    wide.write_text(f"[writer]\ndevice_time_max_past_s = {6 * 365 * 86400}\n")

    def replay() -> dict[str, Any]:
        r = subprocess.run(
            [sys.executable, "-m", "sensorhub", "--config", str(wide), "dlq", "replay", "--json",
             "--clickhouse", stack.clickhouse_url],
            capture_output=True, text=True, timeout=120,
        )
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    report = replay()
    six_years = now_us - 6 * 365 * DAY_US
    newly = {k for k in dead if six_years + DAY_US < k[1] < now_us}  # not the year 2500
    assert report["replayed"] == report["readings"] == len(newly)
    assert report["still_failing"] == len(dead) - len(newly)
    stored2, dead2 = _broken_now(ch)
    assert set(stored2) == set(stored) | newly
    assert all(len(v) == 1 and v[0] == broken[k] for k, v in stored2.items())
    assert set(dead2) == set(dead)  # the dead letters stay, marked replayed
    assert replay()["replayed"] == 0  # nothing twice
    assert int(ch.command(f"SELECT count() FROM sensorhub.readings WHERE device = '{BROKEN}'")) == len(stored2)
    out = _audit_ok(stack)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
