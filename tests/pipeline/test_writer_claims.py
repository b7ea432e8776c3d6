"""A writer claims entries a dead consumer left pending, with and without an insert intent."""

from __future__ import annotations

import json
import threading
import time

from kit.streams import create_groups, series_entry

from sensorhub.config import load_settings
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.streams import (
    F_BLOCK,
)
from sensorhub.pipeline.writer import Writer


def test_idle_entries_of_a_dead_consumer_are_claimed_and_stored_once(
    redis_client, redis_server, chdb_server, ch_client, ch_database  # type: ignore[no-untyped-def]
) -> None:
    settings = load_settings(
        redis={"url": redis_server.url, "partitions": 2},
        clickhouse={"url": chdb_server.url, "database": ch_database},
        writer={"claim_idle_ms": 200, "consumer": "alive"},
    )
    layout = StreamLayout("sh", 2)
    create_groups(redis_client, layout)
    # "dead-a" read 3 entries and died before writing an intent
    ids_a = [redis_client.xadd(layout.readings(0), series_entry("dev-a", 10, 1_764_072_000_000_000 + k * 100)) for k in range(3)]
    redis_client.xreadgroup("writers", "dead-a", {layout.readings(0): ">"})
    # "dead-b" read 2 entries, wrote its intent, inserted, and died before XACK
    ids_b = [redis_client.xadd(layout.readings(1), series_entry("dev-b", 10, 1_764_072_100_000_000 + k * 100)) for k in range(2)]
    redis_client.xreadgroup("writers", "dead-b", {layout.readings(1): ">"})
    entries = [[layout.readings(1), i.decode()] for i in ids_b]
    redis_client.set(layout.intent("dead-b"), json.dumps({"token": "tok-b", "entries": entries}))
    from sensorhub.pipeline.entrycodec_py import NATIVE_COLUMNS
    from sensorhub.pipeline.streams import native_block
    from sensorhub.sinks.schema import apply_schema

    apply_schema(ch_client, ch_database)
    natives = b"".join(native_block(redis_client.xrange(layout.readings(1), i, i)[0][1][F_BLOCK], "mqtt")[0] for i in ids_b)
    ch_client.raw_insert(
        f"{ch_database}.readings", column_names=[c for c, _ in NATIVE_COLUMNS], insert_block=natives,
        settings={"insert_deduplication_token": "tok-b"}, fmt="Native",
    )
    owners = {
        p["message_id"]: p["consumer"]
        for s in layout.all_streams()
        for p in redis_client.xpending_range(s, "writers", min="-", max="+", count=100)
    }
    assert owners == {**dict.fromkeys(ids_a, b"dead-a"), **dict.fromkeys(ids_b, b"dead-b")}
    time.sleep(0.3)  # both dead consumers' entries are now idle past claim_idle_ms

    w = Writer(settings)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pending = sum(redis_client.xpending(s, "writers")["pending"] for s in layout.all_streams())
            if pending == 0 and not redis_client.exists(layout.intent("dead-b")):
                break
            time.sleep(0.1)
    finally:
        w.stop_event.set()
        t.join(30)
    assert pending == 0
    assert not redis_client.exists(layout.intent("dead-b"))
    rows = ch_client.query(f"SELECT device, count() FROM {ch_database}.readings GROUP BY device ORDER BY device").result_rows
    assert rows == [("dev-a", 30), ("dev-b", 20)]  # dev-b's repeated INSERT was dropped by its token
    assert w.metrics.counters["claimed"] == 5
    # every reading of each claimed entry is stored exactly once
    stored = ch_client.query(f"SELECT device, seq FROM {ch_database}.readings ORDER BY device, seq").result_rows
    want_a = [("dev-a", 1_764_072_000_000_000 + k * 100 + i) for k in range(3) for i in range(10)]
    want_b = [("dev-b", 1_764_072_100_000_000 + k * 100 + i) for k in range(2) for i in range(10)]
    assert stored == want_a + want_b
    # the dead consumers are left owning nothing: their entries went to "alive" and were acknowledged there
    for s in layout.all_streams():
        held = {c["name"]: c["pending"] for c in redis_client.xinfo_consumers(s, "writers")}
        assert held.get(b"dead-a", 0) == 0 and held.get(b"dead-b", 0) == 0, (s, held)


def test_a_writer_that_woke_up_inserts_only_entries_it_still_owns(
    redis_client, redis_server, chdb_server, ch_client, ch_database  # type: ignore[no-untyped-def]
) -> None:
    """A writer stopped with a batch in memory; meanwhile another claimed part of it.

    On waking the first writer must not insert the claimed entries again
    (they would be duplicates under another token).
    """
    from sensorhub.pipeline.columns import Batch
    from sensorhub.sinks.schema import apply_schema

    settings = load_settings(
        redis={"url": redis_server.url, "partitions": 1},
        clickhouse={"url": chdb_server.url, "database": ch_database},
        writer={"consumer": "sleepy"},
    )
    layout = StreamLayout("sh", 1)
    create_groups(redis_client, layout)
    stream = layout.readings(0)
    ids = [redis_client.xadd(stream, series_entry(f"dev-{k}", 5, 1_764_072_000_000_000 + k * 10)) for k in range(4)]
    apply_schema(ch_client, ch_database)
    w = Writer(settings)
    w.ch = ch_client
    batch = Batch()
    for entry_id, fields in redis_client.xreadgroup("writers", "sleepy", {stream: ">"})[0][1]:
        w.columns.add(batch, stream, entry_id.decode(), fields, time.time_ns())
    assert len(batch.entries) == 4
    # while "sleepy" was stopped, another writer claimed the first two
    redis_client.xclaim(stream, "writers", "other", 0, ids[:2], justid=True)
    w.delivery.flush(batch)
    rows = ch_client.query(f"SELECT device FROM {ch_database}.readings GROUP BY device ORDER BY device").result_rows
    assert rows == [("dev-2",), ("dev-3",)]
    pend = redis_client.xpending_range(stream, "writers", min="-", max="+", count=10)
    assert [p["consumer"] for p in pend] == [b"other", b"other"]  # still theirs, untouched
    assert w.metrics.counters["entries_lost_to_claims"] == 2


def test_an_intent_left_behind_is_finished_before_a_take_could_write_over_it(
    redis_client, redis_server, chdb_server, ch_client, ch_database  # type: ignore[no-untyped-def]
) -> None:
    """A failover can bring back an intent whose acknowledgement and deletion it lost.

    The next take of that consumer finds it there: it replays it (same entries,
    same token) before it writes its own, so neither batch is lost or doubled.
    """
    from sensorhub.pipeline.columns import Batch
    from sensorhub.sinks.schema import apply_schema

    settings = load_settings(
        redis={"url": redis_server.url, "partitions": 1},
        clickhouse={"url": chdb_server.url, "database": ch_database},
        writer={"consumer": "w1"},
    )
    layout = StreamLayout("sh", 1)
    create_groups(redis_client, layout)
    stream = layout.readings(0)
    old = [redis_client.xadd(stream, series_entry("dev-old", 5, 1_764_072_000_000_000 + k * 10)) for k in range(2)]
    redis_client.xreadgroup("writers", "w1", {stream: ">"})
    redis_client.set(layout.intent("w1"), json.dumps({"token": "tok-old", "entries": [[stream, i.decode()] for i in old]}))
    for k in range(3):
        redis_client.xadd(stream, series_entry("dev-new", 5, 1_764_072_100_000_000 + k * 10))
    apply_schema(ch_client, ch_database)
    w = Writer(settings)
    w.ch = ch_client
    batch = Batch()
    for entry_id, fields in redis_client.xreadgroup("writers", "w1", {stream: ">"})[0][1]:
        w.columns.add(batch, stream, entry_id.decode(), fields, time.time_ns())
    w.delivery.flush(batch)
    rows = ch_client.query(f"SELECT device, count() FROM {ch_database}.readings GROUP BY device ORDER BY device").result_rows
    assert rows == [("dev-new", 15), ("dev-old", 10)]
    assert redis_client.xpending(stream, "writers")["pending"] == 0
    assert not redis_client.exists(layout.intent("w1"))
    assert w.metrics.counters["intents_replayed"] == 1
