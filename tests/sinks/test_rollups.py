"""The rollups follow readings exactly once: a repeated INSERT (same token) counts once in them.

Directly through the ClickHouse HTTP interface with the sink's client, and
end to end with a writer that dies between its INSERT and its XACK.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from kit.store import count
from schemakit import READING_COLS, rollup_from_readings, rollup_rows, sink

from sensorhub.sinks.schema import ROLLUPS, apply_schema

T0 = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(hours=2)


def _block() -> list[list[Any]]:
    """Readings of two devices over 3 minutes, one of them a month earlier (another partition), a NaN."""
    rows = []
    for i in range(360):
        device = f"dev-{i % 2}"
        ts = T0 + dt.timedelta(seconds=i // 2)
        value = math.nan if i == 7 else round(20 + (i % 13) * 0.01, 2)
        rows.append([device, "temp", ts, value, 0, i, ts, "mqtt", T0])
    rows.append(["dev-0", "temp", T0 - dt.timedelta(days=31), 5.0, 0, 9999, T0, "mqtt", T0])
    return rows


def _insert(ch: Any, db: str, rows: list[list[Any]], token: str) -> None:
    # the settings the writer sends with each INSERT (sensorhub/pipeline/writer.py)
    ch.insert(
        f"{db}.readings", rows, column_names=READING_COLS,
        settings={"insert_deduplication_token": token, "insert_deduplicate": 1,
                  "min_insert_block_size_rows": len(rows), "min_insert_block_size_bytes": 0},
    )


def _rollups_match_readings(ch: Any, db: str) -> None:
    for r in ROLLUPS:
        got = rollup_rows(ch, db, r.table.name, r.bucket)
        assert got == rollup_from_readings(ch, db, r.bucket_of), r.table.name
        assert sum(x[3] for x in got) == count(ch, f"SELECT count() FROM {db}.readings")


def test_an_insert_repeated_with_its_token_counts_once_in_the_rollups(  # type: ignore[no-untyped-def]
    chdb_server, ch_client, ch_database
) -> None:
    ch = sink(chdb_server, ch_database)
    apply_schema(ch, ch_database)
    rows = _block()
    for _ in range(3):
        _insert(ch, ch_database, rows, "batch-1")
    assert count(ch, f"SELECT count() FROM {ch_database}.readings") == len(rows)
    _rollups_match_readings(ch, ch_database)
    # the first minute of dev-1, worked out here: its NaN is counted, and left out of min, max, avg and last
    first = [r for r in rows if r[0] == "dev-1" and r[2] < T0 + dt.timedelta(minutes=1)]
    values = [r[3] for r in first if not math.isnan(r[3])]
    assert len(values) == len(first) - 1
    minute = {(m[0], m[2].replace(tzinfo=dt.UTC)): m[3:] for m in rollup_rows(ch, ch_database, "readings_by_minute", "minute")}
    assert minute[("dev-1", T0)] == (
        len(first), min(values), max(values), round(sum(values) / len(values), 6), values[-1]
    )
    _insert(ch, ch_database, rows[:10], "batch-2")  # another token: new readings (ReplacingMergeTree aside)
    assert sum(m[3] for m in rollup_rows(ch, ch_database, "readings_by_minute", "minute")) == len(rows) + 10


def test_a_repeat_after_the_rollups_missed_an_insert_fills_them_once(  # type: ignore[no-untyped-def]
    chdb_server, ch_client, ch_database
) -> None:
    """The INSERT reached readings and failed in a rollup (as when the server dies between the two):
    the writer's repeat with the same token fills the rollup, and a further repeat adds nothing.
    Without ``deduplicate_blocks_in_dependent_materialized_views`` every repeat adds the block again."""
    ch = sink(chdb_server, ch_database)
    apply_schema(ch, ch_database)
    rows = _block()
    ch.command(f"ALTER TABLE {ch_database}.readings_by_hour ADD CONSTRAINT refuse CHECK hour < '2000-01-01'")
    try:
        _insert(ch, ch_database, rows, "batch-1")
    except Exception as exc:  # clickhouse-connect's own error tree
        assert "refuse" in str(exc)
    else:
        raise AssertionError("the rollup's constraint did not refuse the INSERT")
    assert count(ch, f"SELECT count() FROM {ch_database}.readings") == len(rows), "readings got the block first"
    assert count(ch, f"SELECT count() FROM {ch_database}.readings_by_hour") == 0
    ch.command(f"ALTER TABLE {ch_database}.readings_by_hour DROP CONSTRAINT refuse")
    for _ in range(3):
        _insert(ch, ch_database, rows, "batch-1")
    assert count(ch, f"SELECT count() FROM {ch_database}.readings") == len(rows)
    _rollups_match_readings(ch, ch_database)


def test_a_writer_killed_between_insert_and_ack_counts_each_reading_once_in_the_rollups(  # type: ignore[no-untyped-def]
    stack_factory, loadtest
) -> None:
    stack = stack_factory("[writer]\nfault_crash_after_insert = 3\nbatch_ms = 50\n")
    r = loadtest(
        stack, "--rate", "3000", "--count", "9000", "--devices", "20", "--format", "frame", "--per-message", "10",
        "--qos", "1", "--signal", "walk",
    )
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["mismatched"] == 0, r
    assert stack.redis().exists("sh:fault:writer-crashed"), "the writer never reached the crash point"
    log = stack.log("writer")
    assert "fault injection: exiting between INSERT and XACK" in log
    assert "replaying the insert intent" in log
    ch = stack.ch()
    stored = count(ch, "SELECT count() FROM sensorhub.readings")
    assert stored == r["published"]
    for rollup in ROLLUPS:
        assert count(ch, f"SELECT countMerge(readings) FROM sensorhub.{rollup.table.name}") == stored, rollup.table.name
    _rollups_match_readings(ch, "sensorhub")
