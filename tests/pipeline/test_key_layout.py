"""A single Redis that holds keys under the names of earlier releases keeps working.

The dead-letter stream ``<prefix>:dlq`` is drained by the writer, audit
counters ``<prefix>:audit:<source>:<minute>`` are added to the partitioned
ones, and a restarted ingest loads the fingerprints of ``<prefix>:acklog:<source>``
and ``<prefix>:retained:<source>``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sensorhub.config import load_settings
from sensorhub.pipeline.audit import audit_rows, reconcile
from sensorhub.pipeline.ingest import Ingest
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.writer import Writer
from sensorhub.sinks.schema import apply_schema
from sensorhub.sources import base


def _dead_letter(n: int, recv_ns: int) -> dict[bytes, bytes]:
    return {b"src": b"mqtt", b"topic": f"sensors/l1/d{n}/json".encode(), b"payload": b"{nope",
            b"error": b"SyntaxError_: bad", b"recv_ns": str(recv_ns).encode()}


def test_old_dead_letters_and_audit_counters_are_still_read(
    redis_client: Any, redis_server: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    settings = load_settings(
        redis={"url": redis_server.url},
        clickhouse={"url": chdb_server.url, "database": ch_database},
        writer={"consumer": "w-legacy", "batch_ms": 50},
    )
    lay = StreamLayout()
    recv_ns = time.time_ns()
    minute = recv_ns // 60_000_000_000
    # one dead letter under the old names, one under the new ones
    redis_client.xadd(lay.legacy_dlq, _dead_letter(1, recv_ns))
    redis_client.hset(lay.audit_key("mqtt", minute, None), mapping={"received": 1, "dead_lettered": 1})
    p = lay.partition("d2")
    redis_client.xadd(lay.dlq(p), _dead_letter(2, recv_ns))
    redis_client.hset(lay.audit_key("mqtt", minute, p), mapping={"received": 1, "dead_lettered": 1})
    apply_schema(ch_client, ch_database)
    w = Writer(settings)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and int(ch_client.command(f"SELECT count() FROM {ch_database}.dead_letters")) < 2:
            time.sleep(0.1)
    finally:
        w.stop_event.set()
        t.join(30)
    topics = sorted(r[0] for r in ch_client.query(f"SELECT topic FROM {ch_database}.dead_letters").result_rows)
    assert topics == ["sensors/l1/d1/json", "sensors/l1/d2/json"]
    # each counted where it was written, and read back as one source-minute
    assert int(redis_client.hget(lay.audit_key("mqtt", minute, None), "dead_inserted")) == 1
    assert int(redis_client.hget(lay.audit_key("mqtt", minute, p), "dead_inserted")) == 1
    (row,) = audit_rows(redis_client, lay)
    assert (row["source"], row["minute"], row["received"], row["dead_lettered"], row["dead_inserted"]) == (
        "mqtt", minute, 2, 2, 2)
    (rec,) = reconcile(redis_client, ch_client, lay, ch_database)
    assert rec["ok"] and rec["dead_stored"] == 2, rec


def test_a_restarted_ingest_loads_the_old_dedup_log(redis_client: Any, redis_server: Any) -> None:
    settings = load_settings(redis={"url": redis_server.url}, mqtt={"sparkplug": False})
    lay = StreamLayout()
    old_fp, new_fp = b"o" * 12, b"n" * 12
    redis_client.xadd(lay.legacy_acklog("mqtt"), {b"d": old_fp, b"c": b"", b"tx": b"t1"})
    redis_client.xadd(lay.acklog("mqtt", 5), {b"d": new_fp, b"c": old_fp, b"tx": b"t2"})
    redis_client.hset(lay.legacy_retained("mqtt"), mapping={"sensors/l1/a/json": b"r" * 12})
    redis_client.hset(lay.retained("mqtt", 2), mapping={"sensors/l1/b/json": b"s" * 12})
    ingest = Ingest(settings, base.create("mqtt", "mqtt", settings=settings))
    ingest._load_acklog()
    assert list(ingest._delivered.items) == [old_fp, new_fp]  # in the order they were written
    assert old_fp in ingest._contents
    assert ingest._retained == {"sensors/l1/a/json": b"r" * 12, "sensors/l1/b/json": b"s" * 12}
    assert ingest.tx.replicas == {"": 0} and ingest.tx.required("") == 0  # no replica: no WAIT
