"""Helpers of the schema tests: the sink's own client, and the rollups read back beside readings."""

from __future__ import annotations

from typing import Any

from sensorhub.config import ClickHouseSettings
from sensorhub.sinks.clickhouse import connect

__all__ = ["READING_COLS", "rollup_from_readings", "rollup_rows", "sink"]

READING_COLS = ["device", "metric", "ts", "value", "quality", "seq", "recv", "source", "inserted"]


def sink(chdb_server: Any, database: str, **settings: Any) -> Any:
    """The client sensorhub itself uses (its insert settings and retention), on ``database`` (it exists)."""
    return connect(ClickHouseSettings(url=chdb_server.url, database=database, **settings), database=database)


def rollup_rows(ch: Any, db: str, table: str, bucket: str) -> list[tuple[Any, ...]]:
    """Per device, metric and bucket: count, min, max, avg (6 places), last, merged from a rollup."""
    return [tuple(r) for r in ch.query(
        f"SELECT device, metric, {bucket}, countMerge(readings), minMerge(min_value), maxMerge(max_value), "
        f"round(avgMerge(avg_value), 6), argMaxMerge(last_value) FROM {db}.{table} "
        f"GROUP BY device, metric, {bucket} ORDER BY device, metric, {bucket}"
    ).result_rows]


def rollup_from_readings(ch: Any, db: str, bucket_of: str) -> list[tuple[Any, ...]]:
    """The same aggregates computed from readings: NaN counted, and left out of the values."""
    v = "if(isNaN(value), NULL, value)"
    return [tuple(r) for r in ch.query(
        f"SELECT device, metric, toDateTime({bucket_of}(ts), 'UTC') AS b, count(), min({v}), max({v}), "
        f"round(avg({v}), 6), argMax({v}, ts) FROM {db}.readings GROUP BY device, metric, b ORDER BY device, metric, b"
    ).result_rows]
