"""The writer against readings ClickHouse must not or will not store, with real Redis and ClickHouse.

- Readings whose device time is outside the window are dead-lettered, the
  rest of their entry is stored, and ``sensorhub dlq replay`` stores them
  once the window is widened.
- A batch ClickHouse refuses for some of its rows is split; exactly the
  rows at fault are dead-lettered with ClickHouse's reason, every other row
  is stored once, and the batch is acknowledged.
- A batch refused as a whole for a reason that is not in its rows (a full
  disk) is waited out: nothing is dead-lettered, nothing acknowledged, and
  it is stored when the disk has room again.
- A writer killed while splitting stays exactly once after its restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import clickhouse_connect
import pytest
from kit import services
from kit.disk import fill
from kit.streams import create_groups, readings_entry

from sensorhub.config import load_settings
from sensorhub.decoders import ReadingBatch
from sensorhub.errors import SinkError
from sensorhub.pipeline.audit import reconcile
from sensorhub.pipeline.clickhouse_errors import (
    ROW_CAUSED_ERRORS,
    SINK_FAILURES,
    ClickHouseFailed,
    refused_for_rows,
    sink_boundary,
)
from sensorhub.pipeline.columns import Batch
from sensorhub.pipeline.dlq import replay_dead_letters
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.rejected import READING_TOPIC, DeviceTimeWindow, reading_payload
from sensorhub.pipeline.writer import Writer
from sensorhub.sinks.schema import apply_schema

DAY_US = 86_400_000_000
NOW_US = time.time_ns() // 1000

Reading = tuple[str, str, int, float, int, int, int]  # device, metric, ts_us, value, quality, seq, recv_us


def _entry(readings: list[Reading]) -> dict[bytes, bytes]:
    b = ReadingBatch()
    for r in readings:
        b.append(*r)
    return readings_entry(b)


def _publish(r: Any, layout: StreamLayout, entries: list[list[Reading]]) -> None:
    """XADD the entries and count them in the audit as ingest does (``xadded`` per receive minute)."""
    for k, readings in enumerate(entries):
        r.xadd(layout.readings(k % layout.partitions), _entry(readings))
        for rd in readings:
            r.hincrby(layout.audit_key("mqtt", rd[6] // 60_000_000, k % layout.partitions), "xadded", 1)


def _pending(r: Any, layout: StreamLayout) -> int:
    return sum(r.xpending(s, "writers")["pending"] for s in layout.all_streams())


def _drained(r: Any, layout: StreamLayout) -> bool:
    """Every entry read and acknowledged."""
    for s in layout.all_streams():
        g = r.xinfo_groups(s)[0]
        if g["pending"] or (r.xlen(s) and g["last-delivered-id"].decode() < r.xinfo_stream(s)["last-generated-id"].decode()):
            return False
    return True


def _run_writer(w: Writer, r: Any, layout: StreamLayout, timeout: float = 60.0) -> None:
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not _drained(r, layout):
            time.sleep(0.1)
    finally:
        w.stop_event.set()
        t.join(30)
    assert _drained(r, layout), "the writer did not acknowledge every entry"


def _stored(ch: Any, db: str) -> list[tuple[Any, ...]]:
    return ch.query(
        f"SELECT device, metric, toUnixTimestamp64Micro(ts), value, quality, seq, toUnixTimestamp64Micro(recv) "
        f"FROM {db}.readings ORDER BY device, metric, ts, seq"
    ).result_rows


def _dead(ch: Any, db: str) -> list[tuple[Any, ...]]:
    return ch.query(
        f"SELECT source, topic, payload, error, toUnixTimestamp64Micro(recv), entry_id FROM {db}.dead_letters "
        f"ORDER BY entry_id", column_formats={"payload": "bytes"},
    ).result_rows


def _audit(r: Any, layout: StreamLayout) -> dict[str, int]:
    out: dict[str, int] = {}
    for key in r.scan_iter(layout.audit_pattern):
        for f, v in r.hgetall(key).items():
            out[f.decode()] = out.get(f.decode(), 0) + int(v)
    return out


def _settings(redis_server: Any, chdb_server: Any, db: str, **writer: Any) -> Any:
    return load_settings(
        redis={"url": redis_server.url, "partitions": 2},
        clickhouse={"url": chdb_server.url, "database": db},
        writer={"consumer": "w1", **writer},
    )


def _key(rd: Reading) -> tuple[Any, ...]:
    return (rd[0], rd[1], rd[2], rd[3], rd[4], rd[5], rd[6])


# ---------------------------------------------------------------- device time


def test_readings_outside_the_device_time_window_are_dead_lettered_and_replayable(
    redis_client, redis_server, chdb_server, ch_client, ch_database  # type: ignore[no-untyped-def]
) -> None:
    layout = StreamLayout("sh", 2)
    create_groups(redis_client, layout)
    recv = NOW_US
    good = [
        ("press-1", "p", recv - 5_000_000, 1.5, 0, 1, recv),
        ("press-1", "p", recv - 399 * DAY_US, 2.5, 1, 2, recv + 1),  # 399 days old: backfill, stored
        ("press-1", "p", recv + 3_000_000_000, 3.5, 0, 3, recv + 2),  # 50 min ahead: stored
    ]
    bad = [
        ("clock-1", "t", recv - 500 * DAY_US, 4.5, 0, 4, recv + 3),  # 500 days old
        ("clock-1", "t", recv + 2 * 3_600_000_000, -5.25, 2, 5, recv + 4),  # 2 hours ahead
        ("clock-1", "t", 16_725_225_600_000_000, 6.0, 0, 6, recv + 5),  # year 2500
        ("clock-1", "t", 0, 7.0, 0, 7, recv + 6),  # the epoch
        ("clock-1", "t", -2_500_000_000_000_000, float("nan"), 0, 2**64 - 1, recv + 7),  # 1890: before DateTime64
    ]
    # mixed within entries: one entry all good, one mixed, one all bad
    _publish(redis_client, layout, [good[:1], [good[1], bad[0], good[2], bad[1]], bad[2:]])
    w = Writer(_settings(redis_server, chdb_server, ch_database))
    _run_writer(w, redis_client, layout)

    assert _stored(ch_client, ch_database) == sorted(_key(g) for g in good)
    dead = _dead(ch_client, ch_database)
    assert len(dead) == len(bad)
    by_seq = {json.loads(p)["seq"]: (src, topic, p, err, rv, eid) for src, topic, p, err, rv, eid in dead if b"NaN" not in p}
    for rd in bad[:4]:
        src, topic, payload, err, rv, _ = by_seq[rd[5]]
        doc = json.loads(payload)
        assert (src, topic, rv) == ("mqtt", READING_TOPIC + rd[0], rd[6])
        assert payload == reading_payload(rd[0], rd[1], rd[3], rd[2], rd[5], rd[4])
        assert (doc["device"], doc["metric"], doc["value"], doc["quality"]) == (rd[0], rd[1], rd[3], rd[4])
        assert round(doc["ts"] * 1e6) == rd[2]
        assert err.startswith("device time ")
    assert "more than writer.device_time_max_past_s" in by_seq[4][3]
    assert "more than writer.device_time_max_future_s" in by_seq[5][3]
    assert "2500-01-01" in by_seq[6][3] and "outside the range of the ts column" in by_seq[6][3]
    assert "years before its receive time" in by_seq[7][3]
    nan = next(d for d in dead if b"NaN" in d[2])
    assert "outside the range of the ts column" in nan[3]
    assert len({d[5] for d in dead}) == len(bad)  # a dead letter per reading, each its own id
    counts = _audit(redis_client, layout)
    assert (counts["inserted"], counts["writer_dead_lettered"]) == (len(good), len(bad))
    assert all(row["ok"] for row in reconcile(redis_client, ch_client, layout, ch_database)), reconcile(
        redis_client, ch_client, layout, ch_database
    )
    assert w.metrics.counters["device_time_dead_lettered"] == len(bad)

    # the operator widens the window to its maximum: the 500-day-old reading replays, the rest stays
    wide = _settings(redis_server, chdb_server, ch_database, device_time_max_past_s=6 * 365 * 86400)
    report = replay_dead_letters(wide, ch_client)
    assert (report.considered, report.replayed, report.readings, report.still_failing) == (5, 1, 1, 4)
    assert _stored(ch_client, ch_database) == sorted(_key(g) for g in [*good, bad[0]])
    assert sum(report.reasons.values()) == 4 and any("device time" in k for k in report.reasons)
    assert replay_dead_letters(wide, ch_client).replayed == 0  # nothing twice
    assert len(_stored(ch_client, ch_database)) == len(good) + 1
    assert all(row["ok"] for row in reconcile(redis_client, ch_client, layout, ch_database))


def test_window_settings_are_checked_with_their_names() -> None:
    from sensorhub.errors import ConfigError

    with pytest.raises(ConfigError) as past:
        load_settings(writer={"device_time_max_past_s": 10 * 365 * 86400})
    assert "writer.device_time_max_past_s" in str(past.value) and "less than or equal to" in str(past.value)
    with pytest.raises(ConfigError) as future:
        load_settings(writer={"device_time_max_future_s": -1})
    assert "writer.device_time_max_future_s" in str(future.value)
    s = load_settings()
    assert (s.writer.device_time_max_past_s, s.writer.device_time_max_future_s) == (400 * 86400, 3600)


def test_the_widest_window_keeps_a_batch_within_100_partitions() -> None:
    s = load_settings(writer={"device_time_max_past_s": 6 * 365 * 86400, "device_time_max_future_s": 365 * 86400})
    w = DeviceTimeWindow.of(s.writer.device_time_max_past_s, s.writer.device_time_max_future_s)
    # a batch whose receive times span a day: the months its accepted device times can fall in
    import datetime as dt

    recv0 = NOW_US
    lo = dt.datetime.fromtimestamp((recv0 - w.max_past_us) / 1e6, dt.UTC)
    hi = dt.datetime.fromtimestamp((recv0 + DAY_US + w.max_future_us) / 1e6, dt.UTC)
    months = (hi.year - lo.year) * 12 + hi.month - lo.month + 1
    assert months < 100


# ---------------------------------------------------------------- refused by ClickHouse


def test_row_caused_error_names_are_the_engines(ch_client) -> None:  # type: ignore[no-untyped-def]
    codes = ",".join(str(c) for c in ROW_CAUSED_ERRORS.values())
    rows = ch_client.query(f"SELECT n, errorCodeToName(n) FROM (SELECT arrayJoin([{codes}]) AS n)").result_rows
    assert {name: int(n) for n, name in rows} == ROW_CAUSED_ERRORS


def _mixed_entries(bad_seqs: set[int], n_entries: int = 6, per_entry: int = 50) -> tuple[list[list[Reading]], list[Reading], list[Reading]]:
    entries, good, bad = [], [], []
    for e in range(n_entries):
        rows = []
        for i in range(per_entry):
            seq = e * per_entry + i
            value = 5000.0 + seq if seq in bad_seqs else float(seq)
            rd = (f"dev-{e % 3}", "m", NOW_US - 10_000_000 + seq, value, 0, seq, NOW_US + seq)
            rows.append(rd)
            (bad if seq in bad_seqs else good).append(rd)
        entries.append(rows)
    return entries, good, bad


def test_a_batch_refused_for_some_rows_stores_the_rest_and_dead_letters_exactly_those(
    redis_client, redis_server, chdb_server, ch_client, ch_database  # type: ignore[no-untyped-def]
) -> None:
    apply_schema(ch_client, ch_database)
    # an operator's rule the data breaks: ClickHouse refuses every INSERT holding such a row
    ch_client.command(f"ALTER TABLE {ch_database}.readings ADD CONSTRAINT plausible CHECK value < 1000")
    # no merges: a row stored twice stays twice (ReplacingMergeTree would hide it after a merge)
    ch_client.command(f"SYSTEM STOP MERGES {ch_database}.readings")
    layout = StreamLayout("sh", 2)
    create_groups(redis_client, layout)
    bad_seqs = {0, 77, 78, 150, 299}
    entries, good, bad = _mixed_entries(bad_seqs)
    _publish(redis_client, layout, entries)
    w = Writer(_settings(redis_server, chdb_server, ch_database))
    _run_writer(w, redis_client, layout)

    assert _stored(ch_client, ch_database) == sorted(_key(g) for g in good)
    assert int(ch_client.command(f"SELECT count() FROM {ch_database}.readings")) == len(good)  # no duplicate
    dead = _dead(ch_client, ch_database)
    assert sorted(json.loads(p)["seq"] for _, _, p, _, _, _ in dead) == sorted(bad_seqs)
    for _, topic, _, err, _, _ in dead:
        assert topic.startswith(READING_TOPIC)
        assert err.startswith("refused by ClickHouse: Code: 469.") and "plausible" in err, err
    counts = _audit(redis_client, layout)
    assert (counts["inserted"], counts["writer_dead_lettered"]) == (len(good), len(bad))
    assert all(row["ok"] for row in reconcile(redis_client, ch_client, layout, ch_database))
    assert w.metrics.counters["rows_refused"] == len(bad)
    assert w.metrics.counters["split_inserts"] > 0
    assert not redis_client.exists(layout.intent("w1"))


def _drive(w: Writer, r: Any, layout: StreamLayout) -> Batch:
    """Read every entry into one batch and flush it (as the writer's loop does, in one go)."""
    batch = Batch()
    for s in layout.all_streams():
        for stream, got in r.xreadgroup("writers", w.consumer, {s: ">"}) or []:
            for entry_id, fields in got:
                w.columns.add(batch, stream.decode(), entry_id.decode(), fields, time.time_ns())
    w.delivery.flush(batch)
    return batch


def test_too_many_partitions_for_one_insert_splits_and_stores_every_row(
    redis_client, redis_server, chdb_server, ch_client, ch_database  # type: ignore[no-untyped-def]
) -> None:
    apply_schema(ch_client, ch_database)
    layout = StreamLayout("sh", 2)
    create_groups(redis_client, layout)
    ch_client.command(f"SYSTEM STOP MERGES {ch_database}.readings")
    # 12 months of backfill (inside the window) in one batch; this server takes 2 months per INSERT
    readings = [("back-1", "m", NOW_US - k * 31 * DAY_US, float(k), 0, k, NOW_US + k) for k in range(12)]
    _publish(redis_client, layout, [readings[:6], readings[6:]])
    w = Writer(_settings(redis_server, chdb_server, ch_database))
    w.ch = clickhouse_connect.get_client(dsn=chdb_server.url, settings={"max_partitions_per_insert_block": 2})
    _drive(w, redis_client, layout)
    assert _stored(ch_client, ch_database) == sorted(_key(r) for r in readings)
    assert _dead(ch_client, ch_database) == []  # no single row was at fault
    assert _pending(redis_client, layout) == 0
    assert w.metrics.counters["split_inserts"] >= 6


def test_each_insert_lands_whole_even_where_the_server_would_cut_it_in_parts(
    redis_client, redis_server, chdb_server, ch_client, ch_database  # type: ignore[no-untyped-def]
) -> None:
    """A server that writes every block as its own part as soon as it comes: a refused INSERT
    would have stored its first blocks, and the halves would store them again (duplicates)."""
    apply_schema(ch_client, ch_database)
    ch_client.command(f"ALTER TABLE {ch_database}.readings ADD CONSTRAINT plausible CHECK value < 1000")
    # no merges: a row stored twice stays twice (ReplacingMergeTree would hide it after a merge)
    ch_client.command(f"SYSTEM STOP MERGES {ch_database}.readings")
    layout = StreamLayout("sh", 2)
    create_groups(redis_client, layout)
    entries, good, _ = _mixed_entries({599}, n_entries=60, per_entry=10)
    _publish(redis_client, layout, entries)
    w = Writer(_settings(redis_server, chdb_server, ch_database))
    w.ch = clickhouse_connect.get_client(
        dsn=chdb_server.url, settings={"min_insert_block_size_rows": 1, "min_insert_block_size_bytes": 1}
    )
    _drive(w, redis_client, layout)
    assert int(ch_client.command(f"SELECT count() FROM {ch_database}.readings")) == len(good)
    assert _stored(ch_client, ch_database) == sorted(_key(g) for g in good)
    assert [json.loads(p)["seq"] for _, _, p, _, _, _ in _dead(ch_client, ch_database)] == [599]


def test_refused_for_rows_tells_row_errors_from_the_rest() -> None:
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    assert refused_for_rows(DatabaseError("Code: 469. ... (VIOLATED_CONSTRAINT)", code=469))
    partitions = "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)."
    assert refused_for_rows(DatabaseError(partitions, code=252))
    parts = "Code: 252. DB::Exception: Too many parts (3001 with average size of 1.00 KiB) in table"
    assert not refused_for_rows(DatabaseError(parts, code=252))  # merges are behind: wait
    assert not refused_for_rows(DatabaseError("Code: 243. ... (NOT_ENOUGH_SPACE)", code=243))
    assert not refused_for_rows(DatabaseError("Code: 60. ... (UNKNOWN_TABLE)", code=60))
    assert not refused_for_rows(OperationalError("Connection refused"))
    assert not refused_for_rows(OSError("timed out"))


def test_sink_boundary_classifies_what_comes_out_of_clickhouse() -> None:
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    def through(exc: BaseException) -> BaseException:
        try:
            with sink_boundary():
                raise exc
        except BaseException as out:
            return out
        raise AssertionError("nothing raised")

    row = through(DatabaseError("Code: 469. DB::Exception: Constraint violated (VIOLATED_CONSTRAINT)", code=469))
    assert isinstance(row, ClickHouseFailed) and row.row_caused
    assert row.why == "Code: 469. DB::Exception: Constraint violated (VIOLATED_CONSTRAINT)"
    for retryable in (OperationalError("Connection refused"), DatabaseError("Code: 243. (NOT_ENOUGH_SPACE)", code=243)):
        out = through(retryable)
        assert isinstance(out, ClickHouseFailed) and not out.row_caused and str(out) == str(retryable)
    # ours already, or the socket's: retryable as they are
    for passed in (SinkError("ClickHouse at x unreachable"), OSError("timed out")):
        assert through(passed) is passed
    bug = KeyError("a bug")
    assert through(bug) is bug
    assert not isinstance(bug, SINK_FAILURES)


# ---------------------------------------------------------------- waited out, never dead-lettered


def test_a_full_disk_is_waited_out_and_nothing_is_dead_lettered(
    redis_client, redis_server, small_disk, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    server = services.start_chdb_server(tmp_path, data=small_disk / "d", log_path=tmp_path / "chdb.log")
    url = server.url
    ch = clickhouse_connect.get_client(dsn=url)
    try:
        layout = StreamLayout("sh", 2)
        create_groups(redis_client, layout)
        settings = load_settings(
            redis={"url": redis_server.url, "partitions": 2}, clickhouse={"url": url},
            writer={"consumer": "w1", "backoff": {"initial_s": 0.05, "max_s": 0.2}},
        )
        w = Writer(settings)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and w.state != "inserting":
                time.sleep(0.1)
            assert w.state == "inserting"  # schema applied, streams read: now the disk fills up
            filler = small_disk / "filler"
            fill(filler)
            entries, good, _ = _mixed_entries(set(), n_entries=4, per_entry=200)
            _publish(redis_client, layout, entries)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and w.metrics.counters.get("retries", 0) < 3:
                time.sleep(0.1)
            assert w.metrics.counters.get("retries", 0) >= 3, "the writer never met the full disk"
            assert _pending(redis_client, layout) >= 1  # read, and not acknowledged:
            assert _audit(redis_client, layout).get("inserted", 0) == 0
            assert int(ch.command("SELECT count() FROM sensorhub.readings")) == 0
            assert int(ch.command("SELECT count() FROM sensorhub.dead_letters")) == 0
            assert "split_inserts" not in w.metrics.counters
            filler.unlink()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not _drained(redis_client, layout):
                time.sleep(0.1)
        finally:
            w.stop_event.set()
            t.join(30)
        assert _drained(redis_client, layout)
        assert _stored(ch, "sensorhub") == sorted(_key(g) for g in good)
        assert int(ch.command("SELECT count() FROM sensorhub.dead_letters")) == 0
        assert "NOT_ENOUGH_SPACE" in (tmp_path / "chdb.log").read_text(errors="replace")
    finally:
        ch.close()
        server.terminate(timeout=20)


# ---------------------------------------------------------------- a crash while splitting


@pytest.mark.parametrize("rule_dropped", [False, True], ids=["same-rule", "rule-dropped-meanwhile"])
def test_a_writer_killed_while_splitting_stays_exactly_once(
    redis_client, redis_server, chdb_server, ch_client, ch_database, tmp_path, rule_dropped  # type: ignore[no-untyped-def]
) -> None:
    """Killed after the 4th INSERT of a split batch, restarted with the same consumer name.

    With the operator's rule dropped meanwhile, ClickHouse would now take the whole batch:
    the restarted writer must still walk the halves the intent recorded (whole, the rows
    inserted before the crash would be stored twice); it stores what ClickHouse takes now.
    """
    apply_schema(ch_client, ch_database)
    ch_client.command(f"ALTER TABLE {ch_database}.readings ADD CONSTRAINT plausible CHECK value < 1000")
    # no merges: a row stored twice stays twice (ReplacingMergeTree would hide it after a merge)
    ch_client.command(f"SYSTEM STOP MERGES {ch_database}.readings")
    layout = StreamLayout("sh", 2)
    create_groups(redis_client, layout)
    bad_seqs = {3, 140, 141, 260}
    entries, good, bad = _mixed_entries(bad_seqs, n_entries=6, per_entry=50)
    _publish(redis_client, layout, entries)
    env = {
        **os.environ,
        "SENSORHUB_REDIS_URL": redis_server.url,
        "SENSORHUB_REDIS_PARTITIONS": "2",
        "SENSORHUB_CLICKHOUSE_URL": chdb_server.url,
        "SENSORHUB_CLICKHOUSE_DATABASE": ch_database,
        "SENSORHUB_WRITER_FAULT_CRASH_AFTER_SPLIT_INSERTS": "4",
    }

    def writer(name: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{name}.log", "wb") as log:  # the child has its own copy of the descriptor
            return subprocess.Popen(
                [sys.executable, "-m", "sensorhub", "writer", "--consumer", "w1"], env=env, stdout=log,
                stderr=subprocess.STDOUT,
            )

    first = writer("first")
    assert first.wait(120) == 70, (tmp_path / "first.log").read_text()
    assert "exiting while splitting a refused batch" in (tmp_path / "first.log").read_text()
    intent = json.loads(redis_client.get(layout.intent("w1")))
    assert intent["split"], intent  # it died half way through
    stored_at_crash = int(ch_client.command(f"SELECT count() FROM {ch_database}.readings"))
    assert 0 < stored_at_crash < len(good)
    assert list(intent["refused"]) == ["readings:3-4"]  # the first bad row, found before the crash
    if rule_dropped:
        ch_client.command(f"ALTER TABLE {ch_database}.readings DROP CONSTRAINT plausible")
        # what was refused before the crash stays refused; the rows not tried yet are stored now
        good, bad = good + [b for b in bad if b[5] != 3], [b for b in bad if b[5] == 3]
        bad_seqs = {3}

    second = writer("second")  # the same consumer: it replays its intent first
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (_drained(redis_client, layout) and not redis_client.exists(layout.intent("w1"))):
            time.sleep(0.2)
    finally:
        second.terminate()
        second.wait(30)
    text = (tmp_path / "second.log").read_text()
    assert "replaying the insert intent" in text, text[-3000:]
    assert _drained(redis_client, layout)
    assert int(ch_client.command(f"SELECT count() FROM {ch_database}.readings")) == len(good)
    assert _stored(ch_client, ch_database) == sorted(_key(g) for g in good)
    dead = _dead(ch_client, ch_database)
    assert int(ch_client.command(f"SELECT count() FROM {ch_database}.dead_letters")) == len(bad)
    assert sorted(json.loads(p)["seq"] for _, _, p, _, _, _ in dead) == sorted(bad_seqs)
    counts = _audit(redis_client, layout)
    assert (counts["inserted"], counts["writer_dead_lettered"]) == (len(good), len(bad))
    assert all(row["ok"] for row in reconcile(redis_client, ch_client, layout, ch_database))
