"""The schema's codecs, retention (TTL) and rollups: in the DDL, on a cluster, and on the server."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from schemakit import READING_COLS, sink

from sensorhub.config import ClickHouseSettings, load_settings
from sensorhub.errors import ConfigError
from sensorhub.sinks.migrations import migrate
from sensorhub.sinks.schema import (
    READINGS,
    ROLLUPS,
    TABLES,
    Retention,
    apply_schema,
    ddl,
    differences,
)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _statement(stmts: list[str], table: str) -> str:
    return next(s for s in stmts if re.match(rf"CREATE (TABLE|MATERIALIZED VIEW) IF NOT EXISTS db\.{table}\b", s))


def test_every_table_has_its_retention_and_codecs_in_the_ddl() -> None:
    retention = Retention.of(ClickHouseSettings(
        retention_days=45, trades_retention_days=91, dead_letters_retention_days=61, audit_retention_days=401,
        hop_latency_retention_days=31, rollup_minute_retention_days=731, rollup_hour_retention_days=1831,
    ))
    stmts = ddl("db", retention=retention)
    want = {
        "readings": "TTL toDateTime(inserted) + toIntervalDay(45)",
        "trades": "TTL toDateTime(inserted) + toIntervalDay(91)",
        "dead_letters": "TTL toDateTime(inserted) + toIntervalDay(61)",
        "dead_letter_replays": "TTL toDateTime(replayed) + toIntervalDay(61)",
        "ingest_audit": "TTL minute + toIntervalDay(401)",
        "hop_latency": "TTL toDateTime(interval_start) + toIntervalDay(31)",
        "readings_by_minute": "TTL minute + toIntervalDay(731)",
        "readings_by_hour": "TTL hour + toIntervalDay(1831)",
    }
    for table, ttl in want.items():
        assert f"\n{ttl}\n" in _statement(stmts, table), table
    readings = _statement(stmts, "readings")
    for column, codec in READINGS.codecs:
        assert re.search(rf"`{column}` [^\n]* CODEC\({re.escape(codec)}\),?\n", readings), column
    assert "`value` Float64 CODEC(Delta(8), ZSTD(1))" in readings
    assert "`seq` UInt64 CODEC(DoubleDelta, ZSTD(1))" in readings
    for r in ROLLUPS:
        view = _statement(stmts, r.view)
        assert f"TO db.{r.table.name}\nAS SELECT device, metric, {r.bucket_of}(ts) AS {r.bucket}" in view
        assert "\nFROM db.readings\n" in view
    defaults = ddl("db")
    assert "TTL toDateTime(inserted) + toIntervalDay(30)" in _statement(defaults, "readings")
    assert "TTL toDateTime(inserted) + toIntervalDay(60)" in _statement(defaults, "dead_letters")


def test_cluster_ddl_is_the_same_schema_on_replicated_local_tables() -> None:
    """Every local table of the cluster DDL is the single-node table with its engine replicated."""
    single = ddl("db")
    cluster = ddl("db", "c1")
    for t in (*TABLES, *(r.table for r in ROLLUPS)):
        one = _statement(single, t.name)
        local = _statement(cluster, f"{t.name}_local")
        base = t.engine.split("(")[0]
        expect = (
            one.replace(f"db.{t.name}\n", f"db.{t.name}_local ON CLUSTER c1\n", 1)
            .replace(f"ENGINE = {base}(", f"ENGINE = Replicated{base}('/clickhouse/tables/{{shard}}/{{database}}/"
                     f"{t.name}', '{{replica}}'" + ("" if t.engine.endswith(base) else ", "), 1)
            .replace("non_replicated_deduplication_window", "replicated_deduplication_window")
        )
        assert local == expect, t.name
        dist = _statement(cluster, t.name)
        assert dist == (
            f"CREATE TABLE IF NOT EXISTS db.{t.name} ON CLUSTER c1 AS db.{t.name}_local\n"
            f"ENGINE = Distributed(c1, db, {t.name}_local, {t.sharding_key})"
        )
        # a function of the row (a repeated INSERT reaches the same shards), and of its sorting key
        assert "rand" not in t.sharding_key and t.sharding_key.startswith("cityHash64(")
        key_columns = t.sharding_key.removeprefix("cityHash64(").removesuffix(")").split(", ")
        assert t.order_by.strip("()").split(", ")[: len(key_columns)] == key_columns, t.name
    for r in ROLLUPS:
        view = _statement(cluster, r.view)
        assert view.startswith(f"CREATE MATERIALIZED VIEW IF NOT EXISTS db.{r.view} ON CLUSTER c1\n"
                               f"TO db.{r.table.name}_local\nAS SELECT")
        assert "\nFROM db.readings_local\n" in view
        assert view.split("AS SELECT", 1)[1] == _statement(single, r.view).split("AS SELECT", 1)[1].replace(
            "FROM db.readings\n", "FROM db.readings_local\n")


def test_retention_settings_are_checked_with_their_names() -> None:
    with pytest.raises(ConfigError, match=r"clickhouse\.retention_days .*greater than or equal to 1"):
        load_settings(clickhouse={"retention_days": 0})
    with pytest.raises(ConfigError, match=r"clickhouse\.rollup_hour_retention_days .*at least "
                                          r"clickhouse\.retention_days \(60\).*got 30"):
        load_settings(clickhouse={"retention_days": 60, "rollup_hour_retention_days": 30})
    with pytest.raises(ConfigError, match=r"clickhouse\.dead_letters_retention_days .*greater than or equal to 7"):
        load_settings(clickhouse={"dead_letters_retention_days": 1})


def test_a_fresh_database_has_the_codecs_and_ttl_and_nothing_to_change(  # type: ignore[no-untyped-def]
    chdb_server, ch_client, ch_database
) -> None:
    ch = sink(chdb_server, ch_database, retention_days=20)
    apply_schema(ch, ch_database)  # the retention of the settings the client was made from
    codecs = {
        (t, c): codec for t, c, codec in ch.query(
            f"SELECT table, name, compression_codec FROM system.columns WHERE database = '{ch_database}'"
        ).result_rows
    }
    for t in (*TABLES, *(r.table for r in ROLLUPS)):
        for c, _ in t.columns:
            assert codecs[(t.name, c)] == (f"CODEC({t.codec(c)})" if t.codec(c) else ""), (t.name, c)
    engine = ch.command(f"SELECT engine_full FROM system.tables WHERE database = '{ch_database}' AND name = 'readings'")
    assert "TTL toDateTime(inserted) + toIntervalDay(20) SETTINGS" in engine
    assert differences(ch, ch_database, retention=Retention.of(ClickHouseSettings(retention_days=20))) == []
    assert differences(ch, ch_database) == [
        f"ALTER TABLE {ch_database}.readings\n    MODIFY TTL toDateTime(inserted) + toIntervalDay(30)"
    ]


def _reading(device: str, ts: dt.datetime, value: float, seq: int, stored: dt.datetime) -> list[Any]:
    return [device, "temp", ts, value, 0, seq, ts + dt.timedelta(milliseconds=2), "mqtt", stored]


def test_expired_rows_disappear_after_optimize_final_and_the_rollups_keep_them(  # type: ignore[no-untyped-def]
    chdb_server, ch_client, ch_database
) -> None:
    ch = sink(chdb_server, ch_database)
    apply_schema(ch, ch_database)
    old = NOW - dt.timedelta(days=45)
    rows = [
        _reading("stored-45-days-ago", old, 1.0, 1, old),
        _reading("stored-20-days-ago", old, 2.0, 2, NOW - dt.timedelta(days=20)),
        _reading("stored-now", old, 3.0, 3, NOW),  # a reading that arrives late: kept for its days from now
        _reading("stored-now", NOW - dt.timedelta(minutes=5), 4.0, 4, NOW),
    ]
    ch.insert(f"{ch_database}.readings", rows, column_names=READING_COLS)
    ch.insert(
        f"{ch_database}.dead_letters",
        [["mqtt", "t", b"x", "bad", NOW, "1-0", NOW - dt.timedelta(days=65)],
         ["mqtt", "t", b"y", "bad", NOW, "2-0", NOW - dt.timedelta(days=55)]],
        column_names=["source", "topic", "payload", "error", "recv", "entry_id", "inserted"],
    )

    def stored() -> list[tuple[str, int]]:
        ch.command(f"OPTIMIZE TABLE {ch_database}.readings FINAL")
        return [(d, int(s)) for d, s in ch.query(
            f"SELECT device, seq FROM {ch_database}.readings ORDER BY seq").result_rows]

    assert stored() == [("stored-20-days-ago", 2), ("stored-now", 3), ("stored-now", 4)]
    ch.command(f"OPTIMIZE TABLE {ch_database}.dead_letters FINAL")
    assert ch.query(f"SELECT entry_id FROM {ch_database}.dead_letters").result_rows == [("2-0",)]
    # a shorter retention, applied by migrate, expires the reading stored 20 days ago too
    migrate(ch, ch_database, retention=Retention.of(ClickHouseSettings(retention_days=10)))
    assert stored() == [("stored-now", 3), ("stored-now", 4)]
    # the rollups keep every reading they were given, by device time
    for r in ROLLUPS:
        got = ch.query(
            f"SELECT device, countMerge(readings) FROM {ch_database}.{r.table.name} GROUP BY device ORDER BY device"
        ).result_rows
        assert got == [("stored-20-days-ago", 1), ("stored-45-days-ago", 1), ("stored-now", 2)], r.table.name


def test_readings_store_a_sensor_like_reading_in_under_4_bytes(chdb_server, ch_client, ch_database) -> None:  # type: ignore[no-untyped-def]
    """The schema's own codecs on the simulator's walk signal, as the pipeline stores it, after merges
    (docs/performance.md has the figures per column; this guards the goal)."""
    import random

    from firmware_sim.devices import make_devices

    def utc(us: int) -> dt.datetime:
        return dt.datetime.fromtimestamp(us / 1e6, dt.UTC)

    ch = sink(chdb_server, ch_database)
    apply_schema(ch, ch_database)
    rng = random.Random(5)
    devices = make_devices(20, {"frame": 1.0}, seed=5, signal="walk")
    t0 = int((NOW - dt.timedelta(hours=1)).timestamp() * 1e6)
    last_recv = 0
    pending: list[list[Any]] = []
    for k in range(0, 1500, 2):  # 20 devices, 10 readings each every 50 ms: 300,000 readings
        batch = []  # what the writer inserts at once: 100 ms of readings
        for step in (k, k + 1):
            for d in devices:
                msg = d.next_message(10, now_us=t0 + step * 50_000 + d.index * 2500 + rng.randrange(1000))
                last_recv = recv = max(last_recv + 1, msg.readings[0][1] + 300 + int(rng.expovariate(1 / 700)))
                for j, (m, ts, seq, v) in enumerate(msg.readings):
                    quality = msg.payload[27 + 15 * j + 6]  # the frame's, after its 27-byte header
                    batch.append([d.device_id, f"m{m + 1}", utc(ts), v, quality, seq, utc(recv), "mqtt"])
        pending += [[*row, utc(last_recv + 5000)] for row in batch]
        if len(pending) >= 20_000 or k == 1498:
            ch.insert(f"{ch_database}.readings", pending, column_names=READING_COLS)
            pending = []
    ch.command(f"OPTIMIZE TABLE {ch_database}.readings FINAL")
    rows, on_disk = ch.query(
        f"SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE active AND database = '{ch_database}' "
        "AND table = 'readings'"
    ).result_rows[0]
    assert rows == 300_000
    assert on_disk / rows < 4.0  # 2.8 at this size (benchmarks: 13.65 with the default codecs)
