"""Redis key names: the streams, their partitions, and every other key sensorhub writes.

Every key a transaction or a script writes together carries the same Redis
Cluster hash tag, the partition ``{<p>}``, so that on a cluster each one
touches a single slot (a single Redis ignores the braces):

- per partition ``p`` (``0 <= p < partitions``), all under the tag ``{<p>}``:

  * readings ``<prefix>:readings:{<p>}``, trades ``<prefix>:trades:{<p>}``;
  * dead letters ``<prefix>:dlq:{<p>}`` (a frame's dead letter goes to the
    partition of the device its topic names, or of the topic);
  * audit counters ``<prefix>:audit:{<p>}:<source>:<minute>`` (hashes): ingest
    counts a frame in its partition, the writer counts an entry in the
    partition of its stream, so both count in the slot they write;
  * the ingest's dedup log ``<prefix>:acklog:{<p>}:<source>`` and the
    fingerprints of retained messages ``<prefix>:retained:{<p>}:<source>``;
  * a writer's insert intent ``<prefix>:intent:{<p>}:<consumer>`` (on a
    cluster a writer's batch holds the entries of one partition);
  * ``<prefix>:sync:{<p>}``, written only so that ``WAIT`` can confirm the
    replicas hold what was written before it (expires after a minute).

- a partition is chosen by CRC-32 of the partition key (the device the topic
  names, or the topic itself; for trades venue+symbol), the same in every
  process and every run. Order within a partition is the order received.
- keys written alone (any slot): on a single Redis the writer's insert intent
  ``<prefix>:intent:<consumer>`` (a batch spans partitions there); process
  metrics ``<prefix>:metrics:<process>``; hop latencies ``<prefix>:hops``;
  operator events ``<prefix>:events``.
- alerts: ``<prefix>:{alerts}:<name>`` (events stream, pub/sub channel, open alerts,
  counts, the evaluator's checkpoint; one hash tag, as one script writes them together),
  see :mod:`sensorhub.alerts`.

Names of earlier releases, still read so that a deployed single Redis keeps
what it holds: the dead-letter stream ``<prefix>:dlq`` (the writer drains it),
audit counters ``<prefix>:audit:<source>:<minute>`` (the audit and the monitor
add them up with the partitioned ones), the dedup log ``<prefix>:acklog:<source>``
and ``<prefix>:retained:<source>`` (loaded by a restarted ingest).

Only names live here, so that the monitor, the metrics exporter and tests read
the layout without loading the entry codec (:mod:`sensorhub.pipeline.streams`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["StreamLayout", "hash_tag"]


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: the first ``{...}`` with something inside, else all."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


@dataclass(frozen=True)
class StreamLayout:
    """The names of every Redis key under ``prefix``, for ``partitions`` stream partitions."""

    prefix: str = "sh"
    partitions: int = 8

    def partition(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.partitions

    def partition_of(self, key: str) -> int | None:
        """The partition whose hash tag ``key`` carries (``<prefix>:<kind>:{<p>}...``), or None."""
        if not key.startswith(self.prefix + ":"):
            return None
        rest = key[len(self.prefix) + 1 :]
        kind, sep, tail = rest.partition(":{")
        if not sep or ":" in kind:
            return None
        digits, close, _ = tail.partition("}")
        if not close or not digits.isdigit():
            return None
        return int(digits)

    # ---- per partition, hash tag {p} ----
    def readings(self, p: int) -> str:
        return f"{self.prefix}:readings:{{{p}}}"

    def trades(self, p: int) -> str:
        return f"{self.prefix}:trades:{{{p}}}"

    def dlq(self, p: int) -> str:
        """Dead letters of the frames of partition ``p``."""
        return f"{self.prefix}:dlq:{{{p}}}"

    def is_dlq(self, stream: str) -> bool:
        """True for a dead-letter stream (a partition's, or the one of earlier releases)."""
        return stream == self.legacy_dlq or stream.startswith(f"{self.prefix}:dlq:{{")

    def partition_streams(self, p: int) -> list[str]:
        """The streams of partition ``p`` (one slot on a cluster: one XREADGROUP reads them all)."""
        return [self.readings(p), self.trades(p), self.dlq(p)]

    def all_streams(self) -> list[str]:
        """Every partition's streams, readings first, then trades, then dead letters."""
        return (
            [self.readings(p) for p in range(self.partitions)]
            + [self.trades(p) for p in range(self.partitions)]
            + [self.dlq(p) for p in range(self.partitions)]
        )

    def dlq_streams(self) -> list[str]:
        """Every dead-letter stream, the partitioned ones and the one of earlier releases."""
        return [self.dlq(p) for p in range(self.partitions)] + [self.legacy_dlq]

    def audit_key(self, source: str, minute: int, p: int | None) -> str:
        """Audit counters of ``source`` and ``minute`` counted in partition ``p`` (None: the old name)."""
        if p is None:
            return f"{self.prefix}:audit:{source}:{minute}"
        return f"{self.prefix}:audit:{{{p}}}:{source}:{minute}"

    @property
    def audit_pattern(self) -> str:
        """Matches the audit keys of every partition and those of earlier releases."""
        return f"{self.prefix}:audit:*"

    def parse_audit_key(self, key: str) -> tuple[str, int] | None:
        """``(source, minute)`` of an audit key (partitioned or old), None if it is not one."""
        head = f"{self.prefix}:audit:"
        if not key.startswith(head):
            return None
        rest = key[len(head) :]
        if rest.startswith("{"):
            close = rest.find("}:")
            if close < 0:
                return None
            rest = rest[close + 2 :]
        source, sep, minute = rest.rpartition(":")
        if not sep or not minute.isdigit():
            return None
        return source, int(minute)

    def acklog(self, source: str, p: int) -> str:
        """The ingest's dedup log of the frames of partition ``p`` (capped)."""
        return f"{self.prefix}:acklog:{{{p}}}:{source}"

    def retained(self, source: str, p: int) -> str:
        """Per topic of partition ``p``, the content fingerprint of the last retained message stored."""
        return f"{self.prefix}:retained:{{{p}}}:{source}"

    def intent(self, consumer: str, p: int | None = None) -> str:
        """A writer's insert intent: of a batch of partition ``p`` (cluster), or of any batch."""
        if p is None:
            return f"{self.prefix}:intent:{consumer}"
        return f"{self.prefix}:intent:{{{p}}}:{consumer}"

    def sync(self, p: int) -> str:
        """A key of partition ``p`` written only to ``WAIT`` for what came before it."""
        return f"{self.prefix}:sync:{{{p}}}"

    def intents(self, consumer: str) -> list[str]:
        """Every key an intent of ``consumer`` may be under."""
        return [self.intent(consumer)] + [self.intent(consumer, p) for p in range(self.partitions)]

    # ---- names of earlier releases, read only ----
    @property
    def legacy_dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def legacy_acklog(self, source: str) -> str:
        return f"{self.prefix}:acklog:{source}"

    def legacy_retained(self, source: str) -> str:
        return f"{self.prefix}:retained:{source}"

    # ---- keys written alone ----
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
