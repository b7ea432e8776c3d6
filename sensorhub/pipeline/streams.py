"""Redis Streams layout: stream names, partitioning, and the entry codec in use.

- readings: ``P`` streams ``<prefix>:readings:{<p>}``; trades likewise
  ``<prefix>:trades:{<p>}``. The braces are Redis Cluster hash tags, so each
  partition can live on its own node while its keys stay together.
- a partition is chosen by CRC-32 of the partition key (the device the topic
  names, or the topic itself; for trades venue+symbol), the same in every
  process and every run. Order within a partition is the order received.
- dead letters: ``<prefix>:dlq``; audit counters: ``<prefix>:audit:<source>:<minute>``
  hashes; ingest dedup log: ``<prefix>:acklog:<source>``; writer insert intents:
  ``<prefix>:intent:<consumer>``; process metrics: ``<prefix>:metrics:<process>``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from sensorhub import _impl

codec = _impl.load("entrycodec", "sensorhub.pipeline.entrycodec_py")
encode_block = codec.encode_block
decode_block = codec.decode_block
native_block = codec.native_block

__all__ = ["StreamLayout", "decode_block", "encode_block", "native_block"]

# Stream entry field names (short: they are stored with every entry).
F_BLOCK = b"b"
F_SOURCE = b"s"
F_KIND = b"k"
KIND_READINGS = b"r"
KIND_TRADES = b"t"


@dataclass(frozen=True)
class StreamLayout:
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

    @property
    def events(self) -> str:
        """Operator-visible events (lag alerts, reconciliation results), bounded."""
        return f"{self.prefix}:events"
