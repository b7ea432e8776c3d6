"""``sensorhub schema migrate``: move a database an older sensorhub wrote to this schema version.

Version 1 (its DDL frozen below, :func:`v1_ddl`) to 2:

1. create what version 2 adds: the rollup tables ``readings_by_minute`` and
   ``readings_by_hour`` and their materialized views on ``readings``;
2. give the columns of ``readings`` and ``trades`` their codecs
   (``ALTER TABLE ... MODIFY COLUMN ... CODEC``: metadata only; old parts are
   recompressed as they merge, or at once with ``OPTIMIZE TABLE ... FINAL``);
3. fill the rollups from the readings already stored, month by month, each
   INSERT with its own ``insert_deduplication_token`` so that repeating it
   adds nothing; before the TTL, which would expire some of them;
4. give every table its TTL from the retention settings (ClickHouse then
   deletes in the background what has expired);
5. record version 2 in ``schema_version``.

Every step looks at the database first and does only what is missing, so an
interrupted migrate is simply run again, and a migrate of a current database
runs nothing but the TTL changes a retention setting asks for. Stop the
writers first: they refuse a database of an older version, and rows a writer
of the older version inserts while step 3 runs could be counted twice in the
rollups.
"""

from __future__ import annotations

import logging
from typing import Any

from sensorhub.errors import SinkError
from sensorhub.sinks.schema import (
    READINGS,
    ROLLUPS,
    SCHEMA_VERSION,
    Retention,
    apply_schema,
    current_version,
    differences,
    objects,
)

__all__ = ["migrate", "v1_ddl"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- version 1, frozen

_V1_TABLES: tuple[tuple[str, tuple[tuple[str, str], ...], str, str, str | None], ...] = (
    ("readings", (
        ("device", "LowCardinality(String)"), ("metric", "LowCardinality(String)"), ("ts", "DateTime64(6, 'UTC')"),
        ("value", "Float64"), ("quality", "UInt8"), ("seq", "UInt64"), ("recv", "DateTime64(6, 'UTC')"),
        ("source", "LowCardinality(String)"), ("inserted", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ), "ReplacingMergeTree", "(device, metric, ts, seq)", "toYYYYMM(ts)"),
    ("trades", (
        ("venue", "LowCardinality(String)"), ("symbol", "LowCardinality(String)"), ("trade_id", "String"),
        ("price", "Float64"), ("amount", "Float64"), ("side", "Enum8('unknown' = 0, 'buy' = 1, 'sell' = 2)"),
        ("ts", "DateTime64(6, 'UTC')"), ("recv", "DateTime64(6, 'UTC')"),
        ("inserted", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ), "ReplacingMergeTree", "(venue, symbol, trade_id)", None),
    ("dead_letters", (
        ("source", "LowCardinality(String)"), ("topic", "String"), ("payload", "String"), ("error", "String"),
        ("recv", "DateTime64(6, 'UTC')"), ("entry_id", "String"), ("inserted", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ), "ReplacingMergeTree", "(source, recv, entry_id)", None),
    ("dead_letter_replays", (
        ("entry_id", "String"), ("readings", "UInt32"), ("replayed", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ), "ReplacingMergeTree", "entry_id", None),
    ("ingest_audit", (
        ("source", "LowCardinality(String)"), ("process", "LowCardinality(String)"), ("minute", "DateTime('UTC')"),
        ("received", "UInt64"), ("decoded", "UInt64"), ("dead_lettered", "UInt64"), ("xadded", "UInt64"),
        ("inserted", "UInt64"), ("written", "DateTime64(6, 'UTC')"),
    ), "ReplacingMergeTree(written)", "(source, minute, process)", None),
    ("hop_latency", (
        ("process", "LowCardinality(String)"), ("hop", "LowCardinality(String)"),
        ("interval_start", "DateTime64(3, 'UTC')"), ("interval_s", "Float32"), ("count", "UInt64"),
        ("p50_ms", "Float64"), ("p95_ms", "Float64"), ("p99_ms", "Float64"), ("max_ms", "Float64"),
    ), "ReplacingMergeTree", "(hop, interval_start, process)", None),
    # added to version 1 without a new version number: a version 1 database may lack it (migrate creates it)
    ("alerts", (
        ("id", "String"), ("rule", "LowCardinality(String)"), ("kind", "LowCardinality(String)"),
        ("device", "LowCardinality(String)"), ("metric", "LowCardinality(String)"),
        ("severity", "LowCardinality(String)"), ("state", "LowCardinality(String)"),
        ("opened", "DateTime64(6, 'UTC')"), ("closed", "DateTime64(6, 'UTC')"), ("value", "Float64"),
        ("close_value", "Nullable(Float64)"), ("threshold", "Float64"),
        ("inserted", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ), "ReplacingMergeTree(closed)", "(rule, device, metric, opened, id)", None),
)
_V1_DEDUP_WINDOW = 10_000


def v1_ddl(database: str, cluster: str | None = None) -> list[str]:
    """The statements schema version 1 created a database with (its ``ddl()``, unchanged)."""
    on = f" ON CLUSTER {cluster}" if cluster else ""
    out = [f"CREATE DATABASE IF NOT EXISTS {database}{on}"]
    for name, columns, engine, order_by, partition_by in _V1_TABLES:
        local = f"{name}_local" if cluster else name
        cols = ",\n    ".join(f"`{c}` {typ}" for c, typ in columns)
        settings = [f"non_replicated_deduplication_window = {_V1_DEDUP_WINDOW}"] if not cluster else []
        if cluster:
            base, _, args = engine.partition("(")
            args = args.rstrip(")")
            zk = f"'/clickhouse/tables/{{shard}}/{{database}}/{name}', '{{replica}}'"
            full = f"Replicated{base}({zk}{', ' + args if args else ''})"
            settings.append(f"replicated_deduplication_window = {_V1_DEDUP_WINDOW}")
        else:
            full = engine if "(" in engine else f"{engine}()"
        stmt = (
            f"CREATE TABLE IF NOT EXISTS {database}.{local}{on}\n(\n    {cols}\n)\n"
            f"ENGINE = {full}\n"
            + (f"PARTITION BY {partition_by}\n" if partition_by else "")
            + f"ORDER BY {order_by}\n"
            + (f"SETTINGS {', '.join(settings)}" if settings else "")
        )
        out.append(stmt.rstrip())
        if cluster:
            out.append(
                f"CREATE TABLE IF NOT EXISTS {database}.{name}{on} AS {database}.{local}\n"
                f"ENGINE = Distributed({cluster}, {database}, {local}, rand())"
            )
    out.append(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_version{on}\n"
        "(\n    `version` UInt32,\n    `applied` DateTime64(3, 'UTC') DEFAULT now64(3)\n)\n"
        "ENGINE = ReplacingMergeTree(applied)\nORDER BY version"
    )
    return out


# ---------------------------------------------------------------- the migration


def migrate(
    client: Any, database: str, cluster: str | None = None, retention: Retention | None = None
) -> list[str]:
    """Bring ``database`` to this schema version; returns the statements run (none when it is current).

    A database without a sensorhub schema gets the current one, as ``schema
    apply`` makes it. Raises :class:`SinkError` over a newer version.
    """
    retention = retention or Retention.default()
    if not int(client.command(f"EXISTS DATABASE {database}")) or current_version(client, database) == 0:
        return apply_schema(client, database, cluster, retention)
    have = current_version(client, database)
    if have > SCHEMA_VERSION:
        raise SinkError(
            f"database {database} has schema version {have}, newer than this sensorhub ({SCHEMA_VERSION})"
        )
    run: list[str] = []

    def do(stmt: str) -> None:
        log.info("migrate: %s", stmt.splitlines()[0])
        client.command(stmt)
        run.append(stmt)

    existing = {
        r[0] for r in client.query(f"SELECT name FROM system.tables WHERE database = '{database}'").result_rows
    }
    for name, stmt in objects(database, cluster, retention):
        if name not in existing:
            do(stmt)
    for stmt in differences(client, database, cluster, retention, kinds=("codecs",)):
        do(stmt)
    if have < 2:
        for stmt in _backfill(client, database, cluster):
            do(stmt)
    for stmt in differences(client, database, cluster, retention, kinds=("ttl", "settings")):
        do(stmt)
    if have < SCHEMA_VERSION:
        do(f"INSERT INTO {database}.schema_version (version) VALUES ({SCHEMA_VERSION})")
    return run


def _backfill(client: Any, database: str, cluster: str | None) -> list[str]:
    """The INSERTs that add the readings stored before the views existed to the rollups, a month each.

    Each carries a token naming the version, rollup and month: run again
    (an interrupted migrate), an INSERT whose blocks are already in the
    rollup is deduplicated there. ``max_threads = 1`` keeps the blocks of a
    repeat the same as those of the first run.
    """
    months = [
        int(r[0])
        for r in client.query(f"SELECT DISTINCT toYYYYMM(ts) AS m FROM {database}.{READINGS.name} ORDER BY m").result_rows
    ]
    out = []
    for r in ROLLUPS:
        for m in months:
            token = f"sensorhub-schema-{SCHEMA_VERSION}-{r.table.name}-{m}"
            select = r.select(f"{database}.{READINGS.name}", where=f"toYYYYMM(ts) = {m}")
            out.append(
                f"INSERT INTO {database}.{r.table.name}\n{select}\n"
                f"ORDER BY device, metric, {r.bucket}\n"
                f"SETTINGS insert_deduplication_token = '{token}', insert_deduplicate = 1, max_threads = 1"
                + (", distributed_foreground_insert = 1" if cluster else "")
            )
    return out
