"""The real ingest, writer and alert evaluator, run in threads of the test against a Redis Cluster.

They are the classes ``sensorhub ingest``, ``sensorhub writer`` and ``sensorhub
alerts evaluate`` run, with the real MQTT source on a real mosquitto; only
the process around them is the test's.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from sensorhub.alerts.evaluator import Evaluator
from sensorhub.config import Settings, load_settings
from sensorhub.pipeline.ingest import Ingest
from sensorhub.pipeline.writer import Writer
from sensorhub.service.lifecycle import Lifecycle
from sensorhub.sources import base

__all__ = ["T0_US", "Pipeline", "publish", "running", "settings_for"]

# device times an hour ago, on a whole second: inside the writer's window
T0_US = (int(time.time()) - 3600) * 1_000_000


def settings_for(
    redis: dict[str, Any], mqtt_port: int, ch_url: str, database: str, **sections: dict[str, Any]
) -> Settings:
    """Settings of one pipeline: a prefix of its own, quick backoff and batching, no Sparkplug host."""
    given = dict(sections)
    return load_settings(
        redis={"prefix": f"t{uuid.uuid4().hex[:8]}", **redis},
        mqtt={"port": mqtt_port, "client_id": f"cluster-{uuid.uuid4().hex[:10]}", "sparkplug": False,
              **given.pop("mqtt", {})},
        clickhouse={"url": ch_url, "database": database},
        ingest={"backoff": {"initial_s": 0.05, "max_s": 0.5}, **given.pop("ingest", {})},
        writer={"batch_ms": 50, "min_batch_ms": 5, "trim_interval_s": 0.5, "claim_idle_ms": 2000,
                "backoff": {"initial_s": 0.05, "max_s": 0.5}, **given.pop("writer", {})},
        metrics={"publish_interval_s": 0.2},
        **given,
    )


class Pipeline:
    """Ingests, writers and (optionally) the alert evaluator of one keyspace, each in a thread."""

    def __init__(self) -> None:
        self.ingests: list[Ingest] = []
        self.writers: list[Writer] = []
        self.evaluators: list[tuple[Evaluator, Lifecycle]] = []
        self.threads: list[threading.Thread] = []

    def _thread(self, name: str, target: Any) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def ingest(self, settings: Settings, source: str = "mqtt") -> Ingest:
        src = base.create("mqtt", source, settings=settings)
        ing = Ingest(settings, src)
        self._thread(f"ingest-{source}", ing.run)
        deadline = time.monotonic() + 20
        while not src.ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert src.ready(), "the MQTT source did not connect"
        time.sleep(0.3)  # SUBACK
        self.ingests.append(ing)
        return ing

    def writer(self, settings: Settings, consumer: str) -> Writer:
        w = Writer(settings, consumer=consumer)
        self._thread(f"writer-{consumer}", w.run)
        self.writers.append(w)
        return w

    def evaluator(self, settings: Settings) -> Evaluator:
        life = Lifecycle("alerts evaluate")
        ev = Evaluator(settings, life)
        self._thread("alerts", lambda: ev.run(with_store=False))
        self.evaluators.append((ev, life))
        return ev

    def stop(self) -> None:
        for ing in self.ingests:
            ing.stop_event.set()
        for w in self.writers:
            w.stop_event.set()
        for _ev, life in self.evaluators:
            life.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), [t.name for t in self.threads if t.is_alive()]


@contextmanager
def running() -> Iterator[Pipeline]:
    p = Pipeline()
    try:
        yield p
    finally:
        p.stop()


def publish(port: int, msgs: list[tuple[str, bytes]], pace: int = 0, pause_s: float = 0.0) -> None:
    """Publish ``msgs`` at QoS 1 and wait until the broker acknowledged each; every ``pace``
    messages, wait ``pause_s``."""
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = []
        for i, (t, p) in enumerate(msgs):
            infos.append(c.publish(t, p, qos=1))
            if pace and i % pace == pace - 1:
                time.sleep(pause_s)
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        c.loop_stop()
        c.disconnect()
