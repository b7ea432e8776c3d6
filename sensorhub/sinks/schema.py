"""ClickHouse schema: DDL for every table sensorhub writes, applied idempotently.

Tables use ReplacingMergeTree on the natural key so that a replay can never
double count after merges, and ``non_replicated_deduplication_window`` so that
an INSERT repeated with the same ``insert_deduplication_token`` (a writer
retrying after a crash) does not even create a duplicate part: ``count()``
without FINAL stays exact. For a named cluster the same tables are generated
as Replicated* local tables plus Distributed tables over them.

Columns of ``readings`` and ``trades`` carry the codecs that stored least in
``benchmarks/storage.py`` (docs/performance.md). Every table but ``alerts``
expires its rows after its retention (a TTL of ``clickhouse.*retention_days``
days after the row was stored). Two rollups, ``readings_by_minute`` and
``readings_by_hour``, hold per device, metric and bucket the count, min, max,
avg and last value, kept by materialized views on every INSERT into
``readings`` and retained longer than the raw rows; an INSERT repeated with
the same token counts once in them too (the sink sends
``deduplicate_blocks_in_dependent_materialized_views``, and they have the
same deduplication window).

``SCHEMA_VERSION`` is recorded in ``schema_version``; apply refuses to run
over a newer version, and over an older one: ``sensorhub schema migrate``
(:mod:`sensorhub.sinks.migrations`) moves it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sensorhub.config import ClickHouseSettings
from sensorhub.errors import SinkError

__all__ = [
    "ROLLUPS",
    "SCHEMA_VERSION",
    "TABLES",
    "Retention",
    "Rollup",
    "Table",
    "apply_schema",
    "ddl",
    "differences",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

# Dedup window in inserts (blocks) kept per table; must exceed the number of
# inserts a writer can repeat after a crash (one batch per writer) by a margin.
DEDUP_WINDOW = 10_000


@dataclass(frozen=True)
class Retention:
    """Days each kind of row is kept (the tables' TTL); see ``clickhouse.*retention_days``."""

    readings: int
    trades: int
    dead_letters: int
    ingest_audit: int
    hop_latency: int
    rollup_minute: int
    rollup_hour: int

    @classmethod
    def of(cls, settings: ClickHouseSettings) -> Retention:
        """The retention configured in ``settings``."""
        return cls(
            readings=settings.retention_days,
            trades=settings.trades_retention_days,
            dead_letters=settings.dead_letters_retention_days,
            ingest_audit=settings.audit_retention_days,
            hop_latency=settings.hop_latency_retention_days,
            rollup_minute=settings.rollup_minute_retention_days,
            rollup_hour=settings.rollup_hour_retention_days,
        )

    @classmethod
    def default(cls) -> Retention:
        """The retention of the default settings."""
        return cls.of(ClickHouseSettings())


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]
    engine: str
    order_by: str
    partition_by: str | None = None
    ttl: str | None = None  # the time its rows expire after (`retention` days), as the server writes it
    dedup: bool = True
    codecs: tuple[tuple[str, str], ...] = ()  # column -> codec chain, as the server writes it (Delta(8))
    retention: str | None = None  # the Retention field that gives the days
    # The Distributed table's sharding key on a cluster: unset, the whole sorting key. It must be a
    # function of the row, never rand(): a repeated INSERT (the same rows, the same dedup token)
    # must reach the shards the first one reached, or its rows would be stored twice.
    shard_by: str | None = None

    @property
    def sharding_key(self) -> str:
        return self.shard_by or f"cityHash64{self.order_by if self.order_by.startswith('(') else f'({self.order_by})'}"

    def column_names(self) -> list[str]:
        return [c for c, _ in self.columns]

    def codec(self, column: str) -> str | None:
        return dict(self.codecs).get(column)

    def ttl_clause(self, retention: Retention) -> str | None:
        """``<time> + toIntervalDay(<days>)``, the TTL as ``system.tables`` shows it."""
        if self.ttl is None or self.retention is None:
            return None
        return f"{self.ttl} + toIntervalDay({getattr(retention, self.retention)})"


# Chosen from benchmarks/results/storage.json (docs/performance.md): Delta, not DoubleDelta, on the
# jittering clocks and on the value bits; DoubleDelta on seq, which steps by exactly 65,536 a frame.
_Z1 = "ZSTD(1)"
_DELTA_Z1 = "Delta(8), ZSTD(1)"

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
    shard_by="cityHash64(device)",  # a device's readings on one shard, its rollups too
    # kept for its days after it was stored, not after its device time: a TTL on ts would drop
    # at the INSERT itself a reading that arrives already older than the retention (ClickHouse
    # applies TTL as it writes a part), and count() would no longer equal what was published
    ttl="toDateTime(inserted)",
    retention="readings",
    codecs=(
        ("device", _Z1), ("metric", _Z1), ("ts", _DELTA_Z1), ("value", _DELTA_Z1), ("quality", _Z1),
        ("seq", "DoubleDelta, ZSTD(1)"), ("recv", _DELTA_Z1), ("source", _Z1), ("inserted", _DELTA_Z1),
    ),
)

# A few thousand trades a second: ZSTD(3) costs nothing that shows. recv stays ZSTD alone, since
# rows sorted by trade id (a string) are not in receive order and Delta makes it grow.
_Z3 = "ZSTD(3)"
_DELTA_Z3 = "Delta(8), ZSTD(3)"

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
    ttl="toDateTime(inserted)",
    retention="trades",
    codecs=(
        ("venue", _Z3), ("symbol", _Z3), ("trade_id", _Z3), ("price", _DELTA_Z3), ("amount", _Z3),
        ("side", _Z3), ("ts", _DELTA_Z3), ("recv", _Z3), ("inserted", _DELTA_Z3),
    ),
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
    ttl="toDateTime(inserted)",
    retention="dead_letters",
)

# As long as the dead letters they replayed: a replay is never repeated while its letter is kept.
DEAD_LETTER_REPLAYS = Table(
    "dead_letter_replays",
    (
        ("entry_id", "String"),
        ("readings", "UInt32"),
        ("replayed", "DateTime64(6, 'UTC') DEFAULT now64(6)"),
    ),
    "ReplacingMergeTree",
    "entry_id",
    ttl="toDateTime(replayed)",
    retention="dead_letters",
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
    ttl="minute",
    retention="ingest_audit",
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
    ttl="toDateTime(interval_start)",
    retention="hop_latency",
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

@dataclass(frozen=True)
class Rollup:
    """Aggregates of ``readings`` per device, metric and time bucket (device time), kept on insert.

    A materialized view (``<table>_mv``) adds each INSERT's aggregate states to
    the AggregatingMergeTree ``table``; read them with the ``-Merge``
    combinators (docs/operations.md). NaN readings are counted in ``readings``
    and left out of the min, max, avg and last value.
    """

    table: Table
    bucket: str  # the bucket column: minute, hour
    bucket_of: str  # the function that makes it from ts: toStartOfMinute, toStartOfHour

    @property
    def view(self) -> str:
        return f"{self.table.name}_mv"

    def select(self, source: str, where: str | None = None) -> str:
        """The aggregation of ``source`` (a readings table) the view runs on each INSERT."""
        aggs = ", ".join(f"{fn} AS {col}" for col, _, fn in _ROLLUP_AGGREGATES)
        return (
            f"SELECT device, metric, {self.bucket_of}(ts) AS {self.bucket}, {aggs}\n"
            f"FROM {source}\n" + (f"WHERE {where}\n" if where else "") + f"GROUP BY device, metric, {self.bucket}"
        )


_VALUE = "if(isNaN(value), NULL, value)"  # aggregate functions skip NULL
_ROLLUP_AGGREGATES = (
    ("readings", "AggregateFunction(count)", "countState()"),
    ("min_value", "AggregateFunction(min, Nullable(Float64))", f"minState({_VALUE})"),
    ("max_value", "AggregateFunction(max, Nullable(Float64))", f"maxState({_VALUE})"),
    ("avg_value", "AggregateFunction(avg, Nullable(Float64))", f"avgState({_VALUE})"),
    ("last_value", "AggregateFunction(argMax, Nullable(Float64), DateTime64(6, 'UTC'))", f"argMaxState({_VALUE}, ts)"),
)


def _rollup(name: str, bucket: str, bucket_of: str, retention: str) -> Rollup:
    cols = (
        ("device", "LowCardinality(String)"),
        ("metric", "LowCardinality(String)"),
        (bucket, "DateTime('UTC')"),
        *((c, t) for c, t, _ in _ROLLUP_AGGREGATES),
    )
    # not measured: ZSTD(1), which beat LZ4 on every readings column, and DoubleDelta on the
    # bucket, a series' regular grid (as on seq)
    codecs = tuple((c, "DoubleDelta, ZSTD(1)" if c == bucket else _Z1) for c, _ in cols)
    table = Table(
        name, cols, "AggregatingMergeTree", f"(device, metric, {bucket})", partition_by=f"toYYYYMM({bucket})",
        ttl=bucket, retention=retention, codecs=codecs,
        # a series' states on one shard, so a repeated INSERT through the Distributed table meets its first
        shard_by="cityHash64(device, metric)",
    )
    return Rollup(table, bucket, bucket_of)


ROLLUPS: tuple[Rollup, ...] = (
    _rollup("readings_by_minute", "minute", "toStartOfMinute", "rollup_minute"),
    _rollup("readings_by_hour", "hour", "toStartOfHour", "rollup_hour"),
)


def _engine(t: Table, cluster: str | None) -> str:
    if not cluster:
        return t.engine if "(" in t.engine else f"{t.engine}()"
    base, _, args = t.engine.partition("(")
    args = args.rstrip(")")
    zk = f"'/clickhouse/tables/{{shard}}/{{database}}/{t.name}', '{{replica}}'"
    return f"Replicated{base}({zk}{', ' + args if args else ''})"


def local_name(name: str, cluster: str | None) -> str:
    """The table that holds the rows: ``<name>_local`` on a cluster (``<name>`` is Distributed)."""
    return f"{name}_local" if cluster else name


# Table settings every MergeTree table gets. old_parts_lifetime: the parts a merge replaced stay
# on disk for 8 minutes (a ClickHouse server's default; chdb's is 0, they go within a second). A
# merge that met a full disk can leave a broken part; reopening the engine then detaches it and
# brings those parts back (sensorhub/chdb_server/engine.py), which it can only do while they exist.
# min_free_disk_ratio_to_perform_insert: with less than 2 % of the data disk free, ClickHouse refuses
# an INSERT (NOT_ENOUGH_SPACE, which the writer waits out) before it writes any of it, so no part
# of an INSERT is written into the last bytes of a disk; a part an INSERT left broken has no
# sources to bring back (benchmarks/full_disk.py measures both).
ENGINE_SETTINGS: dict[str, str] = {"old_parts_lifetime": "480", "min_free_disk_ratio_to_perform_insert": "0.02"}


def _column(t: Table, column: str, typ: str) -> str:
    codec = t.codec(column)
    return f"`{column}` {typ}" + (f" CODEC({codec})" if codec else "")


def objects(database: str, cluster: str | None = None, retention: Retention | None = None) -> list[tuple[str, str]]:
    """``(name, CREATE statement)`` of every table and view, in creation order (idempotent: IF NOT EXISTS)."""
    retention = retention or Retention.default()
    on = f" ON CLUSTER {cluster}" if cluster else ""
    out: list[tuple[str, str]] = []
    for t in (*TABLES, *(r.table for r in ROLLUPS)):
        local = local_name(t.name, cluster)
        cols = ",\n    ".join(_column(t, c, typ) for c, typ in t.columns)
        settings = [f"non_replicated_deduplication_window = {DEDUP_WINDOW}"] if t.dedup and not cluster else []
        if cluster:
            settings.append(f"replicated_deduplication_window = {DEDUP_WINDOW}")
        settings += [f"{k} = {v}" for k, v in ENGINE_SETTINGS.items()]
        ttl = t.ttl_clause(retention)
        stmt = (
            f"CREATE TABLE IF NOT EXISTS {database}.{local}{on}\n(\n    {cols}\n)\n"
            f"ENGINE = {_engine(t, cluster)}\n"
            + (f"PARTITION BY {t.partition_by}\n" if t.partition_by else "")
            + f"ORDER BY {t.order_by}\n"
            + (f"TTL {ttl}\n" if ttl else "")
            + (f"SETTINGS {', '.join(settings)}" if settings else "")
        )
        out.append((local, stmt.rstrip()))
        if cluster:
            out.append((
                t.name,
                f"CREATE TABLE IF NOT EXISTS {database}.{t.name}{on} AS {database}.{local}\n"
                f"ENGINE = Distributed({cluster}, {database}, {local}, {t.sharding_key})",
            ))
    for r in ROLLUPS:
        # on a cluster each shard's view adds its own readings to its own rollup
        out.append((
            r.view,
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.{r.view}{on}\n"
            f"TO {database}.{local_name(r.table.name, cluster)}\nAS "
            + r.select(f"{database}.{local_name(READINGS.name, cluster)}"),
        ))
    out.append((
        "schema_version",
        f"CREATE TABLE IF NOT EXISTS {database}.schema_version{on}\n"
        "(\n    `version` UInt32,\n    `applied` DateTime64(3, 'UTC') DEFAULT now64(3)\n)\n"
        "ENGINE = ReplacingMergeTree(applied)\nORDER BY version",
    ))
    return out


def ddl(database: str, cluster: str | None = None, retention: Retention | None = None) -> list[str]:
    """The statements that create the schema (idempotent: IF NOT EXISTS)."""
    on = f" ON CLUSTER {cluster}" if cluster else ""
    return [f"CREATE DATABASE IF NOT EXISTS {database}{on}", *(s for _, s in objects(database, cluster, retention))]


def current_version(client: Any, database: str) -> int:
    exists = client.command(f"EXISTS TABLE {database}.schema_version")
    if not int(exists):
        return 0
    v = client.command(f"SELECT max(version) FROM {database}.schema_version")
    return int(v or 0)


def _norm(text: str) -> str:
    return re.sub(r"\s+", "", text)


def differences(
    client: Any, database: str, cluster: str | None = None, retention: Retention | None = None,
    kinds: tuple[str, ...] = ("codecs", "ttl"),
) -> list[str]:
    """The ALTER statements that give the existing tables this schema's codecs, TTL and settings.

    ``kinds`` picks ``codecs`` (one ALTER per table, its columns' ``MODIFY
    COLUMN ... CODEC``), ``ttl`` (``MODIFY TTL``) and ``settings`` (``MODIFY
    SETTING`` of :data:`ENGINE_SETTINGS`, metadata only). Codec changes touch only
    metadata: new parts take the new codecs, old parts are recompressed as
    they merge. A changed TTL is materialized in the background (ClickHouse's
    ``materialize_ttl_after_modify``), deleting what the new retention expires.
    """
    retention = retention or Retention.default()
    on = f" ON CLUSTER {cluster}" if cluster else ""
    tables = {local_name(t.name, cluster): t for t in (*TABLES, *(r.table for r in ROLLUPS))}
    names = ", ".join(f"'{n}'" for n in tables)
    have_codec: dict[tuple[str, str], str] = {}
    for table, column, codec in client.query(
        f"SELECT table, name, compression_codec FROM system.columns WHERE database = '{database}' AND table IN ({names})"
    ).result_rows:
        have_codec[(table, column)] = codec
    have_ttl: dict[str, str | None] = {}
    have_settings: dict[str, dict[str, str]] = {}
    for table, engine_full in client.query(
        f"SELECT name, engine_full FROM system.tables WHERE database = '{database}' AND name IN ({names})"
    ).result_rows:
        m = re.search(r"\bTTL (.*?)(?: SETTINGS |$)", engine_full)
        have_ttl[table] = m.group(1) if m else None
        m = re.search(r"\bSETTINGS (.*)$", engine_full)
        have_settings[table] = {
            k.strip(): v.strip() for k, _, v in (kv.partition("=") for kv in (m.group(1).split(",") if m else []))
        }
    out = []
    for local, t in tables.items():
        if local not in have_ttl:
            continue  # not there yet: its CREATE makes it as it should be
        alter = f"ALTER TABLE {database}.{local}{on}\n    "
        changes = [
            f"MODIFY COLUMN `{c}` CODEC({codec})"
            for c, _ in t.columns
            if (codec := t.codec(c)) and (local, c) in have_codec
            and _norm(have_codec[(local, c)]) != _norm(f"CODEC({codec})")
        ]
        if "codecs" in kinds and changes:
            out.append(alter + ",\n    ".join(changes))
        want = t.ttl_clause(retention)
        if "ttl" in kinds and want and _norm(have_ttl[local] or "") != _norm(want):
            out.append(alter + f"MODIFY TTL {want}")
        missing = [f"{k} = {v}" for k, v in ENGINE_SETTINGS.items() if have_settings[local].get(k) != v]
        if "settings" in kinds and missing:
            out.append(alter + "MODIFY SETTING " + ", ".join(missing))
    return out


def apply_schema(
    client: Any, database: str, cluster: str | None = None, retention: Retention | None = None
) -> list[str]:
    """Create what is missing; returns the statements run. Safe to run at every start.

    ``retention`` defaults to that of the settings the client was connected
    with (:func:`sensorhub.sinks.clickhouse.connect`). Raises
    :class:`SinkError` over a database of another schema version; tables
    whose codecs or TTL differ from this schema (a retention setting changed)
    are left as they are, with a warning naming ``sensorhub schema migrate``.
    """
    from sensorhub.sinks.clickhouse import settings_of

    have = current_version(client, database) if _db_exists(client, database) else 0
    if have > SCHEMA_VERSION:
        raise SinkError(
            f"database {database} has schema version {have}, newer than this sensorhub ({SCHEMA_VERSION})"
        )
    if 0 < have < SCHEMA_VERSION:
        raise SinkError(
            f"database {database} has schema version {have}, older than this sensorhub ({SCHEMA_VERSION}): "
            "stop the writers and run `sensorhub schema migrate`"
        )
    if retention is None:
        connected = settings_of(client)
        retention = Retention.of(connected) if connected else Retention.default()
    stmts = ddl(database, cluster, retention)
    for s in stmts:
        client.command(s)
    if have < SCHEMA_VERSION:
        client.command(f"INSERT INTO {database}.schema_version (version) VALUES ({SCHEMA_VERSION})")
    else:
        for stmt in differences(client, database, cluster, retention, kinds=("settings",)):
            log.info("database %s: %s", database, " ".join(stmt.split()))
            client.command(stmt)
            stmts.append(stmt)
        pending = differences(client, database, cluster, retention)
        if pending:
            log.warning(
                "database %s: %d tables differ from the configured codecs or retention; "
                "`sensorhub schema migrate` changes them", database, len(pending),
            )
    return stmts


def _db_exists(client: Any, database: str) -> bool:
    return bool(int(client.command(f"EXISTS DATABASE {database}")))


def statements_text(stmts: Iterable[str]) -> str:
    return ";\n\n".join(stmts) + ";\n"
