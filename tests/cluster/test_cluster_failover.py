"""kill -9 of a Redis Cluster master under load: its replica takes over, and nothing is lost or doubled.

Redis replicates asynchronously; the ingest acknowledges a frame upstream
only after ``WAIT`` confirmed its transaction on the master's replica, and
the writer waits for its insert intent the same way, so what the dead master
had acknowledged is on the promoted replica. To make the window certain,
the replica is stopped (SIGSTOP) and its link to the master cut (``CLIENT
KILL TYPE replica``) for a second and a half before the master is killed:
what the master took meanwhile never reached it. Without ``WAIT`` the ingest
would have acknowledged those frames and they would be gone (``redis.min_replicas
= 0`` loses them); with it they were not acknowledged, and are written again to
the new master. Runs in ``make faults`` only (``SENSORHUB_FAULT_REDIS_FAILOVER=1``):
about 25 s.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
from clusterrun import T0_US, running, settings_for
from kit.encoders import frame
from kit.store import count, wait_count
from paho.mqtt.enums import CallbackAPIVersion

from sensorhub.pipeline.audit import reconcile
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.redisconn import redis_client

pytestmark = pytest.mark.fault

RATE = int(os.environ.get("SENSORHUB_FAULT_FAILOVER_RATE", "3000"))  # readings/s, frames of 10
SECONDS = float(os.environ.get("SENSORHUB_FAULT_FAILOVER_SECONDS", "12"))
PER_FRAME = 10


class _Publisher(threading.Thread):
    """Frames of 10 readings from 40 devices at ``RATE`` readings/s; counts what the broker acknowledged."""

    def __init__(self, port: int) -> None:
        super().__init__(name="publisher", daemon=True)
        self.port = port
        self.acked = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def _on_publish(self, *_a: Any) -> None:
        with self._lock:
            self.acked += 1

    def run(self) -> None:
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"fo-{uuid.uuid4().hex[:8]}")
        c.max_inflight_messages_set(2000)
        c.on_publish = self._on_publish
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        per_s = RATE / PER_FRAME
        start = time.monotonic()
        k = 0
        while not self.stop.is_set() and time.monotonic() - start < SECONDS:
            due = int((time.monotonic() - start) * per_s)
            while k < due:
                d = f"fo-{k % 40}"
                seq = k // 40
                c.publish(f"sensors/fo/{d}/frame",
                          frame(d, seq, T0_US + seq * 1000, [(m, 0, 0, float(k)) for m in range(1, PER_FRAME + 1)]),
                          qos=1)
                k += 1
            time.sleep(0.005)
        self.sent = k
        deadline = time.monotonic() + 60
        while self.acked < k and time.monotonic() < deadline:
            time.sleep(0.05)
        c.loop_stop()
        c.disconnect()


@pytest.mark.skipif(not os.environ.get("SENSORHUB_FAULT_REDIS_FAILOVER"),
                    reason="make faults only (SENSORHUB_FAULT_REDIS_FAILOVER=1)")
def test_master_killed_under_load_loses_and_doubles_nothing(
    own_cluster: Any, mosquitto: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    cluster = own_cluster()
    settings = settings_for(cluster.settings(), mosquitto.port, chdb_server.url, ch_database)
    layout = StreamLayout(settings.redis.prefix, settings.redis.partitions)
    # the master that serves the most partitions
    masters = [cluster.master_of(layout.readings(p)) for p in range(layout.partitions)]
    victim = max(set(masters), key=masters.count)
    with running() as run:
        ingest = run.ingest(settings)
        run.writer(settings, "fo-w1")
        pub = _Publisher(mosquitto.port)
        pub.start()
        time.sleep(SECONDS / 3)
        replica = cluster.nodes[cluster.replica_of(victim)]
        replica.stop()  # SIGSTOP, and the link cut: the master's writes from now on reach no replica
        admin = redis.Redis(host=cluster.host, port=victim)
        admin.client_kill_filter(_type="replica")
        admin.close()
        time.sleep(1.5)  # longer than a WAIT waits: the ingest holds back its acknowledgements
        killed_at = time.monotonic()
        cluster.kill(victim)
        replica.cont()
        cluster.wait_failover(victim)
        failover_s = time.monotonic() - killed_at
        pub.join(SECONDS + 90)
        assert pub.acked == pub.sent, (pub.acked, pub.sent)
        published = pub.acked * PER_FRAME
        stored = wait_count(ch_client, f"SELECT count() FROM {ch_database}.readings", published, timeout=120)
        time.sleep(1.0)
        rows = reconcile(redis_client(settings.redis), ch_client, layout, ch_database)
    assert stored == published, (stored, published)
    assert count(ch_client, f"SELECT count() FROM {ch_database}.readings") == published
    assert count(ch_client, f"SELECT uniqExact(device, metric, ts, seq) FROM {ch_database}.readings") == published
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert ingest.metrics.counters.get("redis_errors", 0) > 0  # the failover was seen, and waited out
    assert ingest.metrics.counters.get("replica_waits_short", 0) > 0  # WAIT held back the acknowledgements
    print(f"failover in {failover_s:.1f} s; {published} readings published and stored once")
