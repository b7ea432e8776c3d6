"""The data path on a real Redis Cluster (3 masters, 3 replicas): exactly once, every slot, in order.

Real mosquitto, the real ingest, writers and alert evaluator (in threads),
real ClickHouse over HTTP. Every transaction and script of theirs runs on
the cluster here: one that touched two slots would fail with CROSSSLOT (or a
MOVED inside MULTI) and nothing would be stored.
"""

from __future__ import annotations

import json
import time
from typing import Any

from clusterrun import T0_US, publish, running, settings_for
from kit.cluster import LocalCluster
from kit.encoders import frame
from kit.store import count, wait_count

from sensorhub.metrics.prometheus import SnapshotCollector
from sensorhub.monitor.state import StateCollector
from sensorhub.pipeline.audit import reconcile
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.redisconn import redis_client
from sensorhub.pipeline.streams import F_BLOCK, F_SOURCE, decode_block

DEVICES = [f"cl-{i}" for i in range(48)]


def _devices_on_every_partition(layout: StreamLayout) -> None:
    assert {layout.partition(d) for d in DEVICES} == set(range(layout.partitions))


def test_ingest_two_writers_and_the_evaluator_store_every_reading_once(
    cluster: LocalCluster, mosquitto: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    settings = settings_for(
        cluster.settings(), mosquitto.port, chdb_server.url, ch_database,
        alerts={"rules": [{"name": "hot", "device": "hot-*", "metric": "temp_c", "above": 80.0}],
                "checkpoint_ms": 200, "tick_ms": 100},
    )
    layout = StreamLayout(settings.redis.prefix, settings.redis.partitions)
    _devices_on_every_partition(layout)
    frames = [
        (f"sensors/c1/{d}/frame", frame(d, k, T0_US + k * 1000, [(1, 0, 0, float(k)), (2, 5, 0, -1.0)]))
        for k in range(20) for d in DEVICES
    ]
    bad = [(f"sensors/c1/{d}/json", b"{not json") for d in DEVICES[:8]]
    hot = [("sensors/c1/hot-1/json", json.dumps({"metric": "temp_c", "value": v, "ts": T0_US / 1e6 + i}).encode())
           for i, v in enumerate((20.0, 95.0, 20.0))]
    want = 2 * len(frames) + len(hot)
    with running() as run:
        ingest = run.ingest(settings)
        w1, w2 = run.writer(settings, "cw-1"), run.writer(settings, "cw-2")
        run.evaluator(settings)
        time.sleep(0.5)  # the evaluator's group exists ("$": it sees what comes after)
        # in rounds: both writers find entries to take
        for k in range(0, len(frames), 240):
            publish(mosquitto.port, frames[k : k + 240])
            time.sleep(0.05)
        publish(mosquitto.port, bad + hot)
        assert wait_count(ch_client, f"SELECT count() FROM {ch_database}.readings", want) == want
        assert wait_count(ch_client, f"SELECT count() FROM {ch_database}.dead_letters", len(bad)) == len(bad)
        r = redis_client(settings.redis)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not r.xlen(layout.alerts("events")):
            time.sleep(0.1)
        events = [json.loads(f[b"e"]) for _i, f in r.xrange(layout.alerts("events"))]
        state = StateCollector(r, layout, group=settings.redis.group).collect()
        exported = {f.name: f for f in SnapshotCollector(r, layout).collect()}
        time.sleep(1.0)  # nothing more arrives
        rows = reconcile(r, ch_client, layout, ch_database)
    assert count(ch_client, f"SELECT count() FROM {ch_database}.readings") == want
    assert count(ch_client, f"SELECT uniqExact(device, metric, ts, seq) FROM {ch_database}.readings") == want
    # each transaction waited for the replica of its master
    assert set(ingest.tx.replicas.values()) == {1} and len(ingest.tx.replicas) == 3
    assert ingest.metrics.counters.get("replica_waits_short", 0) == 0
    # lag and the safe trim point were read from every partition's stream
    assert w1.metrics.gauges.get("lag_s") is not None and ingest.metrics.gauges.get("lag_s") is not None
    # the two writers shared the group
    assert w1.metrics.counters.get("rows", 0) > 0 and w2.metrics.counters.get("rows", 0) > 0
    assert w1.metrics.counters["rows"] + w2.metrics.counters["rows"] == want
    # every partition got its readings and the dead letters their device's partition
    for p in range(layout.partitions):
        groups = {g["name"]: g for g in r.xinfo_groups(layout.readings(p))}
        assert int(groups[settings.redis.group.encode()]["entries-read"]) > 0, p
    assert {p for p in range(layout.partitions) if r.exists(layout.dlq(p))} == {
        layout.partition(d) for d in DEVICES[:8]
    }
    # the audit, summed over the partitions of every master, reconciles
    assert rows and all(x["ok"] for x in rows), rows
    assert sum(x["xadded"] for x in rows) == want
    assert sum(x["dead_lettered"] for x in rows) == len(bad)
    # the monitor reads the cluster: every stream, the dead letters, no error
    assert state["redis"]["ok"], state["redis"]
    assert {s["stream"] for s in state["streams"]} >= {layout.readings(p) for p in range(layout.partitions)}
    assert state["dead_letters"]["count_today"] == len(bad)
    # and so does the metrics exporter
    assert exported["sensorhub_exporter_redis_up"].samples[0].value == 1
    # the evaluator read every slot and emitted the alert once
    hot_events = [(e["rule"], e["state"]) for e in events if e["device"] == "hot-1"]
    assert hot_events == [("hot", "open"), ("hot", "closed")], events


def test_order_within_a_device_through_two_ingests_and_two_writers(
    cluster: LocalCluster, mosquitto: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    """Two ingests share the devices (MQTT v5 shared subscription), two writers the group.

    A device's frames go to its partition; each ingest appends what it
    received in the order it received it. Per device and ingest the stream
    holds them in received order, the stored receive times follow it, and
    the table holds the device's readings in the device's own order.
    """
    base = settings_for(cluster.settings(), mosquitto.port, chdb_server.url, ch_database,
                        mqtt={"shared_group": "ingests"})
    second = base.model_copy(update={"mqtt": base.mqtt.model_copy(update={"client_id": base.mqtt.client_id + "-b"})})
    layout = StreamLayout(base.redis.prefix, base.redis.partitions)
    n = 400
    devices = ["ord-1", "ord-2", "ord-3"]  # three: round robin over two ingests splits every device
    msgs = [(f"sensors/c2/{d}/frame", frame(d, i, T0_US + i * 1000, [(1, 0, 0, float(i))]))
            for i in range(n) for d in devices]
    r = redis_client(base.redis)
    for d in devices:  # a group that reads nothing keeps every entry from the trim
        r.xgroup_create(layout.readings(layout.partition(d)), "order-check", id="0", mkstream=True)
    with running() as run:
        a = run.ingest(base, source="mqtt-a")
        b = run.ingest(second, source="mqtt-b")
        run.writer(base, "ow-1")
        run.writer(base, "ow-2")
        publish(mosquitto.port, msgs, pace=50, pause_s=0.01)
        assert wait_count(ch_client, f"SELECT count() FROM {ch_database}.readings", len(msgs)) == len(msgs)
        entries = {d: r.xrange(layout.readings(layout.partition(d))) for d in devices}
    # both ingests received a share of each device
    assert a.metrics.counters["frames"] > 0 and b.metrics.counters["frames"] > 0
    assert a.metrics.counters["frames"] + b.metrics.counters["frames"] == len(msgs)
    for d in devices:
        # in the stream: per ingest, the device's frames in the order that ingest received them
        per_source: dict[str, list[tuple[int, int]]] = {}
        for _id, fields in entries[d]:
            blk = decode_block(fields[F_BLOCK])
            got = per_source.setdefault(fields[F_SOURCE].decode(), [])
            got += [(blk.seq[i], blk.recv_us[i]) for i in range(len(blk)) if blk.devices[blk.dev[i]] == d]
        assert set(per_source) == {"mqtt-a", "mqtt-b"}, d
        for src, got in per_source.items():
            assert [s for s, _ in got] == sorted(s for s, _ in got), (d, src, "stream order is not received order")
            assert [t for _, t in got] == sorted(t for _, t in got), (d, src)
        # stored: every reading once, and per ingest received order is the device's order
        rows = ch_client.query(
            f"SELECT source, seq, toUnixTimestamp64Micro(recv) FROM {ch_database}.readings "
            f"WHERE device = '{d}' ORDER BY ts, seq"
        ).result_rows
        assert [s for _src, s, _ in rows] == [i * 65536 for i in range(n)]
        for src in ("mqtt-a", "mqtt-b"):
            recv = [t for s_, _seq, t in rows if s_ == src]
            assert recv == sorted(recv), (d, src)
