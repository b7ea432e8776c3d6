"""``sensorhub schema migrate`` on a database schema version 1 wrote: every row kept, then current."""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys
from typing import Any

import pytest
from kit.store import count
from schemakit import READING_COLS, rollup_from_readings, rollup_rows, sink

from sensorhub.errors import SinkError
from sensorhub.sinks.migrations import migrate, v1_ddl
from sensorhub.sinks.schema import ROLLUPS, SCHEMA_VERSION, apply_schema

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
V1_TABLES = ("readings", "trades", "dead_letters", "dead_letter_replays", "ingest_audit", "hop_latency")


def _version_1(ch: Any, db: str) -> None:
    """A database as schema version 1 made it, holding rows in every table."""
    for stmt in v1_ddl(db):
        ch.command(stmt)
    ch.command(f"INSERT INTO {db}.schema_version (version) VALUES (1)")
    readings = []
    for i in range(3000):
        ts = NOW - dt.timedelta(days=40) + dt.timedelta(seconds=i * 997)  # over a month boundary or two
        value = math.nan if i % 500 == 3 else round(20 + (i % 17) * 0.01, 2)
        readings.append([f"dev-{i % 3}", f"m{i % 4}", ts, value, i % 3, i, ts, "mqtt", NOW])
    ch.insert(f"{db}.readings", readings, column_names=READING_COLS)
    ch.insert(f"{db}.trades", [["okx", "BTC-USDT", str(100 + i), 65_000 + i * 0.1, 0.001 * i, "buy", NOW, NOW, NOW]
                               for i in range(50)],
              column_names=["venue", "symbol", "trade_id", "price", "amount", "side", "ts", "recv", "inserted"])
    ch.insert(f"{db}.dead_letters", [["mqtt", "sensors/x", b"\x00bad", "truncated", NOW, "1-0", NOW]],
              column_names=["source", "topic", "payload", "error", "recv", "entry_id", "inserted"])
    ch.insert(f"{db}.dead_letter_replays", [["1-0", 0, NOW]], column_names=["entry_id", "readings", "replayed"])
    ch.insert(f"{db}.ingest_audit", [["mqtt", "ingest:1", NOW.replace(second=0), 10, 10, 0, 10, 10, NOW]],
              column_names=["source", "process", "minute", "received", "decoded", "dead_lettered", "xadded",
                            "inserted", "written"])
    ch.insert(f"{db}.hop_latency", [["writer:1", "insert", NOW, 10.0, 5, 1.0, 2.0, 3.0, 4.0]],
              column_names=["process", "hop", "interval_start", "interval_s", "count", "p50_ms", "p95_ms",
                            "p99_ms", "max_ms"])


def _rows(ch: Any, db: str) -> dict[str, list[tuple[Any, ...]]]:
    # NaN != NaN: compare values as text
    return {t: [tuple(map(repr, r)) for r in ch.query(f"SELECT * FROM {db}.{t} ORDER BY ALL").result_rows]
            for t in V1_TABLES}


def _columns(ch: Any, db: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in ch.query(
        "SELECT table, name, type, default_kind, default_expression, compression_codec FROM system.columns "
        f"WHERE database = '{db}' ORDER BY table, position"
    ).result_rows]


def _engines(ch: Any, db: str) -> dict[str, str]:
    """Each table's engine clause, its SETTINGS in name order (MODIFY SETTING appends to the list)."""
    out = {}
    for n, e in ch.query(f"SELECT name, engine_full FROM system.tables WHERE database = '{db}'").result_rows:
        head, sep, settings = e.replace(db, "DB").partition(" SETTINGS ")
        out[n] = head + sep + ", ".join(sorted(settings.split(", "))) if sep else head
    return out


def test_a_version_1_database_keeps_every_row_and_becomes_the_current_schema(  # type: ignore[no-untyped-def]
    chdb_server, ch_client, ch_database
) -> None:
    ch = sink(chdb_server, ch_database)
    _version_1(ch, ch_database)
    before = _rows(ch, ch_database)
    assert len(before["readings"]) == 3000

    run = migrate(ch, ch_database)
    assert any("MODIFY COLUMN `value` CODEC(Delta(8), ZSTD(1))" in s for s in run)
    assert _rows(ch, ch_database) == before
    assert count(ch, f"SELECT max(version) FROM {ch_database}.schema_version") == SCHEMA_VERSION
    # the rollups hold the readings stored before they existed
    for r in ROLLUPS:
        assert rollup_rows(ch, ch_database, r.table.name, r.bucket) == rollup_from_readings(ch, ch_database, r.bucket_of)

    # the same schema as a database made by this version: columns, codecs, engines and TTLs
    fresh = f"{ch_database}_fresh"
    ch_client.command(f"CREATE DATABASE {fresh}")
    try:
        apply_schema(ch, fresh)
        assert _columns(ch, ch_database) == [(t, *rest) for t, *rest in _columns(ch, fresh)]
        assert _engines(ch, ch_database) == _engines(ch, fresh)
    finally:
        ch_client.command(f"DROP DATABASE {fresh}")

    versions = count(ch, f"SELECT count() FROM {ch_database}.schema_version")
    assert migrate(ch, ch_database) == []  # a second migrate has nothing to do
    assert count(ch, f"SELECT count() FROM {ch_database}.schema_version") == versions
    assert _rows(ch, ch_database) == before
    apply_schema(ch, ch_database)  # and a writer starts on it


def test_a_migration_run_again_after_it_stopped_counts_each_reading_once(  # type: ignore[no-untyped-def]
    chdb_server, ch_client, ch_database
) -> None:
    """Stopped after filling the rollups and before recording the version: run again, it fills them
    again with the same tokens, and the rollups still count each reading once."""
    ch = sink(chdb_server, ch_database)
    _version_1(ch, ch_database)
    migrate(ch, ch_database)
    ch.command(f"DELETE FROM {ch_database}.schema_version WHERE version = {SCHEMA_VERSION}")
    assert count(ch, f"SELECT max(version) FROM {ch_database}.schema_version") == 1
    run = migrate(ch, ch_database)
    assert [s.split("\n")[0] for s in run] == [
        *(f"INSERT INTO {ch_database}.{r.table.name}" for r in ROLLUPS for _ in _months(ch, ch_database)),
        f"INSERT INTO {ch_database}.schema_version (version) VALUES ({SCHEMA_VERSION})",
    ]
    for r in ROLLUPS:
        got = rollup_rows(ch, ch_database, r.table.name, r.bucket)
        assert got == rollup_from_readings(ch, ch_database, r.bucket_of)
        assert sum(x[3] for x in got) == 3000


def _months(ch: Any, db: str) -> list[int]:
    return [int(m) for (m,) in ch.query(f"SELECT DISTINCT toYYYYMM(ts) FROM {db}.readings").result_rows]


def test_apply_refuses_a_version_1_database_and_names_migrate(chdb_server, ch_client, ch_database) -> None:  # type: ignore[no-untyped-def]
    ch = sink(chdb_server, ch_database)
    _version_1(ch, ch_database)
    with pytest.raises(SinkError, match=r"schema version 1, older than this sensorhub \(2\): stop the writers "
                                        r"and run `sensorhub schema migrate`"):
        apply_schema(ch, ch_database)


def test_schema_migrate_command(chdb_server, ch_client, ch_database) -> None:  # type: ignore[no-untyped-def]
    ch = sink(chdb_server, ch_database)
    _version_1(ch, ch_database)
    argv = [sys.executable, "-m", "sensorhub", "schema", "migrate", "--clickhouse", chdb_server.url,
            "--database", ch_database]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"database {ch_database} on {chdb_server.url} is at schema version {SCHEMA_VERSION} (" in first.stdout
    assert "statements)" in first.stdout
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith("(nothing to do)")
