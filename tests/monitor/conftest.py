"""Fixtures for the monitor and exporter tests: snapshots published by real Metrics objects."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.keys import StreamLayout

LAYOUT = StreamLayout()


def _publish_stale(redis: Any, m: Metrics, age_s: float) -> None:
    """Publish ``m`` as if its last heartbeat was ``age_s`` ago (a process that hangs)."""
    snap = m.snapshot()
    snap["heartbeat"] = time.time() - age_s
    redis.hset(LAYOUT.metrics_key(m.process), mapping={"state": json.dumps(snap)})
    redis.expire(LAYOUT.metrics_key(m.process), 60)


@pytest.fixture
def fleet(redis_client: Any) -> dict[str, Any]:
    """Two live ingest processes, one stale, one writer in lag alert, a DLQ entry, audit counters.

    Rates come from two counts 0.6 s apart, as a running process publishes them.
    """
    ing = Metrics("ingest", "line-1")
    ing2 = Metrics("ingest", "okx")
    stale = Metrics("ingest", "line-9")
    wr = Metrics("writer", "writer-1")
    ing.process += ":a"  # same pid in one test process: keep the keys apart
    ing2.process += ":b"
    stale.process += ":c"
    ing.inc("frames", 10)
    ing.inc("readings", 80)
    ing2.inc("frames", 5)
    ing2.inc("trades", 5)
    wr.inc("rows", 50)
    time.sleep(0.6)
    ing.inc("frames", 100)
    ing.inc("readings", 800)
    ing.inc("dead_letters", 2)
    ing.set("connected", True)
    ing.set("kind", "reading")
    ing.set("last_frame_age_s", 0.1)
    ing.set("redis_ok", True)
    ing.set("reconnects", 1)
    ing.record_us("recv_to_xadd", 1500, 100)
    ing.record_us("decode_to_xadd", 700, 100)
    ing2.inc("frames", 30)
    ing2.inc("trades", 30)
    ing2.set("connected", True)
    ing2.set("kind", "trade")
    ing2.set("gaps", 2)
    ing2.set("last_frame_age_s", 0.4)
    stale.set("connected", True)
    wr.inc("rows", 700)
    wr.inc("inserts", 3)
    wr.inc("retries", 1)
    wr.set("state", "inserting")
    wr.set("lag_s", 9.0)
    wr.set("lag_alert", True)
    wr.set("backlog_entries", 12)
    wr.set("clickhouse_ok", True)
    wr.set("last_batch_rows", 300)
    wr.record_us("read_to_insert", 4000, 10)
    wr.record_us("insert", 3000, 3)
    for m in (ing, ing2, wr):
        m.publish(redis_client, LAYOUT.metrics_key(m.process), 30)
    _publish_stale(redis_client, stale, 30.0)
    redis_client.xadd(
        LAYOUT.dlq(0),
        {b"src": b"line-1", b"topic": b"sensors/a/dev-3/frame", b"payload": b"\x01\x02",
         b"error": b"ChecksumMismatch: crc mismatch", b"recv_ns": str(time.time_ns()).encode()},
    )
    minute = int(time.time() // 60)
    redis_client.hset(LAYOUT.audit_key("line-1", minute, 0),
                      mapping={"received": 110, "decoded": 880, "dead_lettered": 2, "xadded": 880, "inserted": 870})
    # yesterday's counters are not today's totals
    redis_client.hset(LAYOUT.audit_key("line-1", minute - 2 * 1440, None), mapping={"received": 5, "xadded": 5})
    # a readings stream with a consumer group, one entry delivered and one not yet read
    s = LAYOUT.readings(0)
    redis_client.xgroup_create(s, "writers", id="0", mkstream=True)
    redis_client.xadd(s, {b"b": b"x"})
    redis_client.xreadgroup("writers", "writer-1", {s: ">"}, count=1)
    redis_client.xadd(s, {b"b": b"y"})
    return {"ingest": ing, "okx": ing2, "stale": stale, "writer": wr, "minute": minute}

