"""ClickHouse schema: DDL for every table sensorhub writes, applied idempotently.

Tables use ReplacingMergeTree on the natural key so that a replay can never
double count after merges, and ``non_replicated_deduplication_window`` so that
an INSERT repeated with the same ``insert_deduplication_token`` (a writer
retrying after a crash) does not even create a duplicate part: ``count()``
without FINAL stays exact. For a named cluster the same tables are generated
as Replicated* local tables plus Distributed tables over them.

``SCHEMA_VERSION`` is recorded in ``schema_version``; apply refuses to run
over a newer version.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sensorhub.errors import SinkError

__all__ = ["SCHEMA_VERSION", "TABLES", "Table", "apply_schema", "ddl"]

SCHEMA_VERSION = 1

# Dedup window in inserts (blocks) kept per table; must exceed the number of
# inserts a writer can repeat after a crash (one batch per writer) by a margin.
DEDUP_WINDOW = 10_000


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]
    engine: str
    order_by: str
    partition_by: str | None = None
    ttl: str | None = None
    dedup: bool = True

    def column_names(self) -> list[str]:
        return [c for c, _ in self.columns]


READINGS = Table(
    "readings",
    (
        ("device", "LowCardinality(String)"),
        ("metric", "LowCardinality(String)"),
        ("ts", "DateTime64(6, 'UTC')"),
        ("value", "Float64"),
        ("quality", "UInt8"),
        ("seq", "UInt64"),
        ("recv", "DateTime64(6, 'UTC')"),
        ("source", "LowCardinality(String)"),
        ("inserted", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ),
    "ReplacingMergeTree",
    "(device, metric, ts, seq)",
    partition_by="toYYYYMM(ts)",
)

TRADES = Table(
    "trades",
    (
        ("venue", "LowCardinality(String)"),
        ("symbol", "LowCardinality(String)"),
        ("trade_id", "String"),
        ("price", "Float64"),
        ("amount", "Float64"),
        ("side", "Enum8('unknown' = 0, 'buy' = 1, 'sell' = 2)"),
        ("ts", "DateTime64(6, 'UTC')"),
        ("recv", "DateTime64(6, 'UTC')"),
        ("inserted", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ),
    "ReplacingMergeTree",
    "(venue, symbol, trade_id)",
)

DEAD_LETTERS = Table(
    "dead_letters",
    (
        ("source", "LowCardinality(String)"),
        ("topic", "String"),
        ("payload", "String"),
        ("error", "String"),
        ("recv", "DateTime64(6, 'UTC')"),
        ("entry_id", "String"),
        ("inserted", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ),
    "ReplacingMergeTree",
    "(source, recv, entry_id)",
)

DEAD_LETTER_REPLAYS = Table(
    "dead_letter_replays",
    (
        ("entry_id", "String"),
        ("readings", "UInt32"),
        ("replayed", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ),
    "ReplacingMergeTree",
    "entry_id",
)

INGEST_AUDIT = Table(
    "ingest_audit",
    (
        ("source", "LowCardinality(String)"),
        ("process", "LowCardinality(String)"),
        ("minute", "DateTime('UTC')"),
        ("received", "UInt64"),
        ("decoded", "UInt64"),
        ("dead_lettered", "UInt64"),
        ("xadded", "UInt64"),
        ("inserted", "UInt64"),
        ("written", "DateTime64(6, 'UTC')"),
    ),
    # Each process writes its per-minute counters; a re-written minute
    # replaces the earlier row of the same process.
    "ReplacingMergeTree(written)",
    "(source, minute, process)",
)

HOP_LATENCY = Table(
    "hop_latency",
    (
        ("process", "LowCardinality(String)"),
        ("hop", "LowCardinality(String)"),
        ("interval_start", "DateTime64(3, 'UTC')"),
        ("interval_s", "Float32"),
        ("count", "UInt64"),
        ("p50_ms", "Float64"),
        ("p95_ms", "Float64"),
        ("p99_ms", "Float64"),
        ("max_ms", "Float64"),
    ),
    "ReplacingMergeTree",
    "(hop, interval_start, process)",
)

# One row per alert event: the open row, then the closed row that replaces it on merge
# (version `closed`, 1970-01-01 while open); FINAL or argMax reads one row per alert.
ALERTS = Table(
    "alerts",
    (
        ("id", "String"),
        ("rule", "LowCardinality(String)"),
        ("kind", "LowCardinality(String)"),
        ("device", "LowCardinality(String)"),
        ("metric", "LowCardinality(String)"),
        ("severity", "LowCardinality(String)"),
        ("state", "LowCardinality(String)"),
        ("opened", "DateTime64(6, 'UTC')"),
        ("closed", "DateTime64(6, 'UTC')"),
        ("value", "Float64"),
        ("close_value", "Nullable(Float64)"),
        ("threshold", "Float64"),
        ("inserted", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ),
    "ReplacingMergeTree(closed)",
    "(rule, device, metric, opened, id)",
)

TABLES: tuple[Table, ...] = (
    READINGS, TRADES, DEAD_LETTERS, DEAD_LETTER_REPLAYS, INGEST_AUDIT, HOP_LATENCY, ALERTS,
)


def _engine(t: Table, cluster: str | None) -> str:
    if not cluster:
        return t.engine if "(" in t.engine else f"{t.engine}()"
    base, _, args = t.engine.partition("(")
    args = args.rstrip(")")
    zk = f"'/clickhouse/tables/{{shard}}/{{database}}/{t.name}', '{{replica}}'"
    return f"Replicated{base}({zk}{', ' + args if args else ''})"


def ddl(database: str, cluster: str | None = None) -> list[str]:
    """The statements that create the schema (idempotent: IF NOT EXISTS)."""
    on = f" ON CLUSTER {cluster}" if cluster else ""
    out = [f"CREATE DATABASE IF NOT EXISTS {database}{on}"]
    for t in TABLES:
        local = f"{t.name}_local" if cluster else t.name
        cols = ",\n    ".join(f"`{c}` {typ}" for c, typ in t.columns)
        settings = [f"non_replicated_deduplication_window = {DEDUP_WINDOW}"] if t.dedup and not cluster else []
        if cluster:
            settings.append(f"replicated_deduplication_window = {DEDUP_WINDOW}")
        stmt = (
            f"CREATE TABLE IF NOT EXISTS {database}.{local}{on}\n(\n    {cols}\n)\n"
            f"ENGINE = {_engine(t, cluster)}\n"
            + (f"PARTITION BY {t.partition_by}\n" if t.partition_by else "")
            + f"ORDER BY {t.order_by}\n"
            + (f"SETTINGS {', '.join(settings)}" if settings else "")
        )
        out.append(stmt.rstrip())
        if cluster:
            out.append(
                f"CREATE TABLE IF NOT EXISTS {database}.{t.name}{on} AS {database}.{local}\n"
                f"ENGINE = Distributed({cluster}, {database}, {local}, rand())"
            )
    out.append(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_version{on}\n"
        "(\n    `version` UInt32,\n    `applied` DateTime64(3, 'UTC') DEFAULT now64(3)\n)\n"
        "ENGINE = ReplacingMergeTree(applied)\nORDER BY version"
    )
    return out


def current_version(client: Any, database: str) -> int:
    exists = client.command(f"EXISTS TABLE {database}.schema_version")
    if not int(exists):
        return 0
    v = client.command(f"SELECT max(version) FROM {database}.schema_version")
    return int(v or 0)


def apply_schema(client: Any, database: str, cluster: str | None = None) -> list[str]:
    """Create what is missing; returns the statements run. Safe to run at every start."""
    have = current_version(client, database) if _db_exists(client, database) else 0
    if have > SCHEMA_VERSION:
        raise SinkError(
            f"database {database} has schema version {have}, newer than this sensorhub ({SCHEMA_VERSION})"
        )
    stmts = ddl(database, cluster)
    for s in stmts:
        client.command(s)
    if have < SCHEMA_VERSION:
        client.command(f"INSERT INTO {database}.schema_version (version) VALUES ({SCHEMA_VERSION})")
    return stmts


def _db_exists(client: Any, database: str) -> bool:
    return bool(int(client.command(f"EXISTS DATABASE {database}")))


def statements_text(stmts: Iterable[str]) -> str:
    return ";\n\n".join(stmts) + ";\n"
