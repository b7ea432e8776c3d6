"""One slot per transaction and script, on a real Redis Cluster.

Every Lua script sensorhub runs names every key it touches in ``KEYS`` (a
cluster routes a script by them, and refuses one whose keys span slots);
a writer on the cluster claims a dead writer's entries and replays its
per-partition intent; a transaction of keys of two partitions is refused.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import pytest
import redis
from kit.cluster import LocalCluster
from kit.streams import create_groups, series_entry

from sensorhub.alerts import evaluator
from sensorhub.config import load_settings
from sensorhub.metrics import registry
from sensorhub.pipeline import delivery
from sensorhub.pipeline.entrycodec_py import NATIVE_COLUMNS
from sensorhub.pipeline.keys import StreamLayout, hash_tag
from sensorhub.pipeline.redisconn import redis_client
from sensorhub.pipeline.slots import Transactions
from sensorhub.pipeline.streams import (
    F_BLOCK,
    native_block,
)
from sensorhub.pipeline.writer import Writer
from sensorhub.sinks.schema import apply_schema

SCRIPTS = {
    "ack": delivery._ACK_SCRIPT,
    "take": delivery._TAKE_SCRIPT,
    "set": delivery._SET_SCRIPT,
    "metrics": registry._PUBLISH_SCRIPT,
    "alerts emit": evaluator._EMIT_SCRIPT,
    "alerts checkpoint": evaluator._CHECKPOINT_SCRIPT,
}
# commands whose first argument is not a key
_NO_KEY = {"PUBLISH"}


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*out, cur.strip()]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_script_touches_only_the_keys_it_is_given(name: str) -> None:
    """Every ``redis.call`` of a key command takes its key from ``KEYS`` (directly, or through a
    local set from ``KEYS``), never from ``ARGV``."""
    script = SCRIPTS[name]
    from_keys: set[str] = set()
    for names, exprs in re.findall(r"local\s+([A-Za-z_][\w, ]*)=\s*(.+)", script):
        for var, expr in zip(_split_top(names), _split_top(exprs), strict=False):
            if expr.startswith("KEYS["):
                from_keys.add(var)
    calls = re.findall(r"redis\.call\(\s*'([A-Za-z]+)'\s*,\s*([^,)]+)", script)
    assert calls, name
    for command, key in calls:
        if command.upper() in _NO_KEY:
            continue
        key = key.strip()
        assert key.startswith("KEYS[") or key in from_keys, (name, command, key)


def test_hash_tags_put_a_partition_in_one_slot() -> None:
    lay = StreamLayout("sh", 8)
    for p in range(8):
        keys = [*lay.partition_streams(p), lay.audit_key("mqtt", 1, p), lay.acklog("mqtt", p),
                lay.retained("mqtt", p), lay.intent("w-1", p), lay.sync(p)]
        assert {hash_tag(k) for k in keys} == {str(p)}, keys
        assert {lay.partition_of(k) for k in keys} == {p}
    assert lay.parse_audit_key(lay.audit_key("a:b", 7, 3)) == ("a:b", 7)
    assert lay.parse_audit_key(lay.audit_key("a:b", 7, None)) == ("a:b", 7)
    assert lay.partition_of(lay.legacy_dlq) is None and lay.is_dlq(lay.legacy_dlq) and lay.is_dlq(lay.dlq(2))


def test_a_transaction_over_two_partitions_is_refused(cluster: LocalCluster) -> None:
    r = redis_client(load_settings(redis=cluster.settings()).redis)
    lay = StreamLayout("x", 8)
    tx = Transactions(r, None, 1000)
    tx.execute(lay.readings(0), [["XADD", lay.readings(0), "*", "b", b"1"], ["HINCRBY", lay.audit_key("s", 1, 0), "n", 1]])
    # partitions 0 and 3 are on two different masters here, 0 and 1 on one: both refused
    for other in (1, 3):
        with pytest.raises(redis.ResponseError):
            tx.execute(lay.readings(0), [["XADD", lay.readings(0), "*", "b", b"1"],
                                         ["XADD", lay.readings(other), "*", "b", b"1"]])
    assert r.xlen(lay.readings(0)) == 1  # all or nothing


def test_a_writer_claims_a_dead_writers_entries_and_its_partition_intent(
    cluster: LocalCluster, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    settings = load_settings(
        redis=cluster.settings(partitions=2),
        clickhouse={"url": chdb_server.url, "database": ch_database},
        writer={"claim_idle_ms": 200, "consumer": "alive"},
    )
    r = redis_client(settings.redis)
    layout = StreamLayout("sh", 2)
    create_groups(r, layout)
    base = int(time.time() - 3600) * 1_000_000
    # "dead-a" read 3 entries and died before writing an intent
    ids_a = [r.xadd(layout.readings(0), series_entry("dev-a", 10, base + k * 100)) for k in range(3)]
    r.xreadgroup("writers", "dead-a", {layout.readings(0): ">"})
    # "dead-b" read 2 entries, wrote its intent (in their partition), inserted, and died before XACK
    ids_b = [r.xadd(layout.readings(1), series_entry("dev-b", 10, base + 100_000 + k * 100)) for k in range(2)]
    r.xreadgroup("writers", "dead-b", {layout.readings(1): ">"})
    entries = [[layout.readings(1), i.decode()] for i in ids_b]
    r.set(layout.intent("dead-b", 1), json.dumps({"token": "tok-b", "entries": entries}))
    apply_schema(ch_client, ch_database)
    natives = b"".join(native_block(r.xrange(layout.readings(1), i, i)[0][1][F_BLOCK], "mqtt")[0] for i in ids_b)
    ch_client.raw_insert(
        f"{ch_database}.readings", column_names=[c for c, _ in NATIVE_COLUMNS], insert_block=natives,
        settings={"insert_deduplication_token": "tok-b"}, fmt="Native",
    )
    time.sleep(0.3)  # idle past claim_idle_ms

    w = Writer(settings)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pending = sum(r.xpending(s, "writers")["pending"] for s in layout.all_streams())
            if pending == 0 and not r.exists(layout.intent("dead-b", 1)):
                break
            time.sleep(0.1)
    finally:
        w.stop_event.set()
        t.join(30)
    assert pending == 0
    assert not any(r.exists(k) for k in layout.intents("dead-b") + layout.intents("alive"))
    rows = ch_client.query(f"SELECT device, count() FROM {ch_database}.readings GROUP BY device ORDER BY device").result_rows
    assert rows == [("dev-a", 30), ("dev-b", 20)]  # dev-b's repeated INSERT was dropped by its token
    assert w.metrics.counters["claimed"] == 5
    assert len(ids_a) == 3
