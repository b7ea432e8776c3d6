"""What the writer stores besides the data: hop latencies and the audit.

Both are best effort and repeatable: a failed export is logged and tried
again at the next interval, and a row stored twice is harmless (a row per
process, hop and interval; the audit rows collapse on their key).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import redis

from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.audit import export_audit
from sensorhub.pipeline.clickhouse_errors import SINK_FAILURES, sink_boundary
from sensorhub.pipeline.keys import StreamLayout

__all__ = ["HOP_LATENCY_COLS", "store_audit", "store_hop_latency"]

log = logging.getLogger("sensorhub.pipeline.writer")  # these lines are the writer's, for whoever reads its log

HOP_LATENCY_COLS = ["process", "hop", "interval_start", "interval_s", "count", "p50_ms", "p95_ms", "p99_ms", "max_ms"]


def store_hop_latency(metrics: Metrics, client: Any, ch: Any, layout: StreamLayout, db: str) -> None:
    """Per-interval hop percentiles of every process into ``hop_latency``.

    Ingest processes post theirs to the ``<prefix>:hops`` stream every
    interval; the writer adds its own (``metrics``), inserts them, then
    deletes what it inserted (a row per process, hop and interval: replays
    are harmless).
    """
    start, secs, stats = metrics.take_interval()
    rows: list[list[Any]] = [
        [metrics.process, hop, datetime.fromtimestamp(start, UTC), secs,
         st["count"], st["p50_ms"], st["p95_ms"], st["p99_ms"], st["max_ms"]]
        for hop, st in stats.items() if st["count"]
    ]
    posted: list[bytes] = []
    try:
        for entry_id, f in client.xrange(layout.hops, count=10_000):
            posted.append(entry_id)
            doc = json.loads(f[b"d"])
            for hop, st in doc["hops"].items():
                rows.append([doc["process"], hop, datetime.fromtimestamp(doc["start"], UTC), doc["seconds"],
                             st["count"], st["p50_ms"], st["p95_ms"], st["p99_ms"], st["max_ms"]])
    except (redis.RedisError, ValueError, KeyError) as exc:
        log.warning("reading posted hop latencies failed: %s", exc)
    if not rows:
        return
    try:
        with sink_boundary():
            ch.insert(f"{db}.hop_latency", rows, column_names=HOP_LATENCY_COLS)
    except SINK_FAILURES as exc:
        log.warning("hop_latency insert failed: %s", str(exc)[:200])
        return
    if posted:
        try:
            client.xdel(layout.hops, *posted)
        except redis.RedisError as exc:
            log.warning("clearing posted hop latencies failed: %s", exc)


def store_audit(client: Any, ch: Any, layout: StreamLayout, db: str) -> None:
    """The audit counters of Redis into ``ingest_audit``."""
    try:
        with sink_boundary():
            export_audit(client, ch, layout, db)
    except redis.RedisError as exc:
        log.warning("audit export failed: %s", exc)
    except SINK_FAILURES as exc:
        log.warning("audit export failed: %s", str(exc)[:200])
