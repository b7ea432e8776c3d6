"""The rule engine over real entry blocks (the pipeline's codec): crossings, hysteresis, for_s, rates,
silence, the state bound, and the determinism a restarted evaluator relies on."""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec
import pytest

from sensorhub.alerts.engine import Engine
from sensorhub.config import AlertRule
from sensorhub.decoders import ReadingBatch
from sensorhub.pipeline.streams import decode_block, encode_block

T0 = 1_764_072_000.0


def block(readings: list[tuple[Any, ...]]) -> Any:
    """A decoded entry block of (device, metric, ts_s, value[, recv_s]) readings."""
    b = ReadingBatch(64)
    for dev, met, ts, v, *rest in readings:
        recv = rest[0] if rest else ts
        b.append(dev, met, round(ts * 1e6), v, 0, 0, round(recv * 1e6))
    return decode_block(encode_block(b, 0))


def run(engine: Engine, readings: list[tuple[Any, ...]], per_entry: int = 1, first_ms: int = 1) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for k in range(0, len(readings), per_entry):
        events += engine.process_block(f"{first_ms + k}-0", block(readings[k : k + per_entry]))
    return events


def series(values: list[float], dev: str = "d1", metric: str = "temp_c", step_s: float = 1.0) -> list[tuple[Any, ...]]:
    return [(dev, metric, T0 + i * step_s, v) for i, v in enumerate(values)]


def states(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(e["state"], e["value"]) for e in events]


def test_a_crossing_opens_one_alert_and_clearing_closes_it() -> None:
    eng = Engine([AlertRule(name="hot", metric="temp_c", above=80.0, clear_at=75.0, severity="critical")])
    ev = run(eng, series([70, 85, 86, 90, 79, 76, 74, 73]))
    assert states(ev) == [("open", 85), ("closed", 74)]
    opened, closed = ev
    assert opened["id"] == closed["id"] and opened["severity"] == "critical" and opened["threshold"] == 80.0
    assert opened["ts"] == T0 + 1 and closed["opened"] == T0 + 1 and closed["closed"] == T0 + 6
    assert closed["open_value"] == 85 and closed["threshold"] == 75.0
    assert opened["pos"] < closed["pos"]


def test_hysteresis_keeps_a_flapping_value_from_storming() -> None:
    flapping = [81.0, 79.0] * 50
    with_clear = Engine([AlertRule(name="hot", above=80.0, clear_at=75.0)])
    assert states(run(with_clear, series(flapping))) == [("open", 81)]
    # the same values without hysteresis: what clear_at prevents
    without = Engine([AlertRule(name="hot", above=80.0)])
    assert len(run(without, series(flapping))) == 100


def test_for_s_delays_until_the_condition_held_that_long_in_reading_time() -> None:
    rule = AlertRule(name="hot", above=80.0, for_s=10)
    eng = Engine([rule])
    assert run(eng, series([85, 85, 85], step_s=4.0)) == []  # 0 s, 4 s, 8 s above
    ev = run(Engine([rule]), series([85, 85, 85, 85], step_s=4.0))  # 12 s above: opens on the 4th
    assert states(ev) == [("open", 85)] and ev[0]["ts"] == T0 + 12
    # a reading under the limit starts the count again
    reset = Engine([rule])
    assert run(reset, series([85, 85, 70, 85, 85, 85], step_s=4.0)) == []
    assert states(run(reset, [("d1", "temp_c", T0 + 24, 85.0)])) == [("open", 85)]


def test_below_opens_on_a_drop_and_clears_above_clear_at() -> None:
    eng = Engine([AlertRule(name="low", metric="pressure", below=2.0, clear_at=2.5)])
    ev = run(eng, series([3.0, 2.1, 1.9, 2.2, 2.4, 2.6], metric="pressure"))
    assert states(ev) == [("open", 1.9), ("closed", 2.6)]


def test_rate_below_opens_on_a_falling_pressure() -> None:
    rule = AlertRule(name="falling", metric="pressure", rate_below=-1.0, clear_at=-0.2, window_s=10)
    eng = Engine([rule])
    steady = [5.0] * 10
    falling = [5.0 - 2.0 * (i + 1) * 0.5 for i in range(20)]  # -2 per second, a reading every 0.5 s
    readings = series(steady, metric="pressure", step_s=0.5) + [
        ("d1", "pressure", T0 + 5 + 0.5 * (i + 1), v) for i, v in enumerate(falling)
    ]
    ev = run(eng, readings)
    assert [e["state"] for e in ev] == ["open"]
    assert ev[0]["value"] < -1.0 and ev[0]["kind"] == "rate_below"
    # flat again: the rate over the window comes back above clear_at and the alert closes
    flat = [("d1", "pressure", T0 + 15 + 0.5 * i, falling[-1]) for i in range(1, 30)]
    closes = run(eng, flat, first_ms=1000)
    assert [e["state"] for e in closes] == ["closed"] and closes[0]["value"] >= -0.2


def test_nan_neither_opens_nor_closes() -> None:
    eng = Engine([AlertRule(name="hot", above=80.0)])
    eng = Engine([AlertRule(name="hot", above=80.0)])
    assert states(run(eng, series([math.nan, 90.0, math.nan]))) == [("open", 90)]
    assert states(run(eng, series([10.0]), first_ms=100)) == [("closed", 10)]


def test_globs_pick_devices_and_metrics() -> None:
    eng = Engine([AlertRule(name="hot", device="line1-*", metric="temp_*", above=80.0)])
    ev = run(eng, [("line1-a", "temp_c", T0, 90.0), ("line2-a", "temp_c", T0, 90.0),
                   ("line1-b", "rh", T0, 90.0), ("line1-c", "temp_k", T0, 90.0)], per_entry=4)
    assert sorted(e["device"] + "/" + e["metric"] for e in ev) == ["line1-a/temp_c", "line1-c/temp_k"]


def test_silent_device_opens_on_the_clock_and_closes_on_its_next_reading() -> None:
    eng = Engine([AlertRule(name="quiet", device="q-*", silent_s=5)])
    assert run(eng, [("q-1", "x", T0, 1.0, T0), ("other", "x", T0, 1.0, T0)], per_entry=2) == []
    assert eng.tick(round((T0 + 4) * 1e6)) == []
    opened = eng.tick(round((T0 + 6) * 1e6))
    assert [(e["state"], e["device"]) for e in opened] == [("open", "q-1")]
    assert opened[0]["opened"] == T0 + 5 and eng.tick(round((T0 + 7) * 1e6)) == []
    closed = run(eng, [("q-1", "x", T0 + 8, 1.0, T0 + 8)], first_ms=10)
    assert [e["state"] for e in closed] == ["closed"] and closed[0]["id"] == opened[0]["id"]
    assert closed[0]["value"] == pytest.approx(8.0)


def test_a_silence_nobody_ticked_through_opens_and_closes_on_the_next_reading() -> None:
    """What a restarted evaluator sees when it re-reads a gap: the same alert, at the same position."""
    live = Engine([AlertRule(name="quiet", silent_s=5)])
    run(live, [("q-1", "x", T0, 1.0, T0)])
    ticked = live.tick(round((T0 + 6) * 1e6))
    live_close = run(live, [("q-1", "x", T0 + 9, 1.0, T0 + 9)], first_ms=10)
    replay = Engine([AlertRule(name="quiet", silent_s=5)])
    run(replay, [("q-1", "x", T0, 1.0, T0)])
    replayed = run(replay, [("q-1", "x", T0 + 9, 1.0, T0 + 9)], first_ms=10)
    assert [(e["state"], e["id"], e["pos"]) for e in replayed] == [
        (e["state"], e["id"], e["pos"]) for e in ticked + live_close
    ]


def _random_readings(seed: int, n: int = 600) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    out: list[tuple[Any, ...]] = []
    t = T0
    for _ in range(n):
        t += rng.choice([0.1, 0.5, 1.0, 3.0, 8.0])
        dev = f"d{rng.randrange(6)}"
        out.append((dev, rng.choice(["temp_c", "pressure"]), t, rng.uniform(0, 100), t))
    return out


RULES = [
    AlertRule(name="hot", metric="temp_c", above=70.0, clear_at=50.0, for_s=2),
    AlertRule(name="low", metric="pressure", below=20.0, clear_at=30.0),
    AlertRule(name="rising", metric="temp_c", rate_above=5.0, window_s=6),
    AlertRule(name="quiet", device="d[0-2]", silent_s=6),
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_restart_from_a_checkpoint_gives_the_same_events_at_the_same_positions(seed: int) -> None:
    readings = _random_readings(seed)
    cut = 240
    whole = Engine(RULES)
    head = run(whole, readings[:cut], per_entry=4)
    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(whole.snapshot()))  # as the checkpoint keeps it
    tail = run(whole, readings[cut:], per_entry=4, first_ms=1 + cut)
    assert len(head) > 10 and len(tail) > 10  # the sequence exercises the rules
    assert {e["kind"] for e in head + tail} == {"above", "below", "rate_above", "silent_s"}
    resumed = Engine(RULES)
    assert resumed.restore(snap) > 0
    after = run(resumed, readings[cut:], per_entry=4, first_ms=1 + cut)
    assert [(e["id"], e["state"], e["pos"], e["value"]) for e in after] == [
        (e["id"], e["state"], e["pos"], e["value"]) for e in tail
    ]
    assert resumed.open_alerts() == whole.open_alerts()


def test_a_changed_rule_starts_without_the_old_state() -> None:
    eng = Engine([AlertRule(name="hot", above=80.0)])
    run(eng, series([90.0]))
    same = Engine([AlertRule(name="hot", above=80.0)])
    assert same.restore(eng.snapshot()) == 1 and len(same.open_alerts()) == 1
    changed = Engine([AlertRule(name="hot", above=85.0)])
    assert changed.restore(eng.snapshot()) == 0 and changed.open_alerts() == {}


def test_a_quiet_threshold_series_holds_no_state() -> None:
    eng = Engine([AlertRule(name="hot", above=80.0)], max_series=100)
    run(eng, [(f"d{i}", "temp_c", T0 + i * 0.001, 10.0) for i in range(1000)], per_entry=50)
    assert eng.series == {} and eng.readings == 1000


def test_state_is_bounded_and_open_alerts_are_kept() -> None:
    # for_s keeps a pending state for every series above the limit
    eng = Engine([AlertRule(name="hot", above=80.0, for_s=60)], max_series=100)
    run(eng, [("hot-dev", "temp_c", T0, 99.0), ("hot-dev", "temp_c", T0 + 61, 99.0)], per_entry=2)
    run(eng, [(f"d{i}", "temp_c", T0 + 100 + i * 0.001, 90.0) for i in range(1000)], per_entry=50, first_ms=10)
    assert len(eng.series) <= 100
    assert [k for k in eng.open_alerts().values()] == [("hot", "hot-dev", "temp_c")]
    assert len(eng.evicted) >= 900


@pytest.mark.parametrize("seed", [4, 5])
def test_entries_evaluated_together_or_one_by_one_give_the_same_events(seed: int) -> None:
    readings = _random_readings(seed, n=800)
    one = Engine(RULES)
    singly = run(one, readings, per_entry=5)
    together = Engine(RULES)
    entries = [(f"{1 + k}-0", block(readings[k : k + 5])) for k in range(0, len(readings), 5)]
    batched: list[dict[str, Any]] = []
    for j in range(0, len(entries), 16):
        batched += together.process_entries(entries[j : j + 16])
    key = [(e["id"], e["state"], e["pos"], e["value"]) for e in singly]
    assert len(key) > 20
    assert sorted(key) == sorted((e["id"], e["state"], e["pos"], e["value"]) for e in batched)
    a, b = together.snapshot(), one.snapshot()
    assert sorted(map(repr, a["series"])) == sorted(map(repr, b["series"]))
    assert sorted(map(repr, a["silences"])) == sorted(map(repr, b["silences"]))


def test_readings_the_writer_would_not_store_are_not_evaluated() -> None:
    eng = Engine([AlertRule(name="hot", above=80.0)], device_time=(3600 * 10**6, 3600 * 10**6))
    assert run(eng, [("d1", "temp_c", T0 - 7200, 99.0, T0)]) == []
    assert eng.skipped_device_time == 1
    assert len(run(eng, [("d1", "temp_c", T0, 99.0, T0)])) == 1
