"""Redis key names: the streams, their partitions, and every other key sensorhub writes.

- readings: ``P`` streams ``<prefix>:readings:{<p>}``; trades likewise
  ``<prefix>:trades:{<p>}``. The braces are Redis Cluster hash tags, so each
  partition can live on its own node while its keys stay together.
- a partition is chosen by CRC-32 of the partition key (the device the topic
  names, or the topic itself; for trades venue+symbol), the same in every
  process and every run. Order within a partition is the order received.
- dead letters: ``<prefix>:dlq``; audit counters: ``<prefix>:audit:<source>:<minute>``
  hashes; ingest dedup log: ``<prefix>:acklog:<source>``; writer insert intents:
  ``<prefix>:intent:<consumer>``; process metrics: ``<prefix>:metrics:<process>``.
- alerts: ``<prefix>:{alerts}:<name>`` (events stream, pub/sub channel, open alerts,
  counts, the evaluator's checkpoint; one hash tag, as one script writes them together),
  see :mod:`sensorhub.alerts`.

Only names live here, so that the monitor, the metrics exporter and tests read
the layout without loading the entry codec (:mod:`sensorhub.pipeline.streams`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["StreamLayout"]


@dataclass(frozen=True)
class StreamLayout:
    """The names of every Redis key under ``prefix``, for ``partitions`` stream partitions."""

    prefix: str = "sh"
    partitions: int = 8

    def partition(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.partitions

    def readings(self, p: int) -> str:
        return f"{self.prefix}:readings:{{{p}}}"

    def trades(self, p: int) -> str:
        return f"{self.prefix}:trades:{{{p}}}"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def all_streams(self) -> list[str]:
        return (
            [self.readings(p) for p in range(self.partitions)]
            + [self.trades(p) for p in range(self.partitions)]
            + [self.dlq]
        )

    def audit_key(self, source: str, minute: int) -> str:
        return f"{self.prefix}:audit:{source}:{minute}"

    @property
    def audit_pattern(self) -> str:
        return f"{self.prefix}:audit:*"

    def acklog(self, source: str) -> str:
        return f"{self.prefix}:acklog:{source}"

    def retained(self, source: str) -> str:
        """Per topic, the content fingerprint of the last retained message stored."""
        return f"{self.prefix}:retained:{source}"

    def intent(self, consumer: str) -> str:
        return f"{self.prefix}:intent:{consumer}"

    def metrics_key(self, process: str) -> str:
        return f"{self.prefix}:metrics:{process}"

    @property
    def metrics_pattern(self) -> str:
        return f"{self.prefix}:metrics:*"

    @property
    def hops(self) -> str:
        """Per-interval hop percentiles posted by ingest processes (capped)."""
        return f"{self.prefix}:hops"

    def alerts(self, name: str) -> str:
        """A key of the alert evaluator and gateway (``events``, ``open``, ``counts``, ...)."""
        return f"{self.prefix}:{{alerts}}:{name}"

    @property
    def events(self) -> str:
        """Operator-visible events (lag alerts, reconciliation results), bounded."""
        return f"{self.prefix}:events"
