"""Fuzz the Sparkplug B decoders and host: Cython against the twin (see _harness.py for usage).

Input layout: the first byte picks the mode: bit 0, birth tables (aliases
0, 1, 5) or none (stateless); bit 1, also feed the payload to a
:class:`SparkplugHost` of each implementation as the message type of bits
2-4, which must agree too. The rest is the payload. Outcomes must match
exactly: the same rows, or the same error class, offset and message.
"""

from __future__ import annotations

import random
import struct
import sys
from typing import Any

import _harness
from kit.encoders import sparkplug_metric, uvarint

from sensorhub import errors
from sensorhub._ext import batch as cy_batch
from sensorhub._ext import sparkplug as cy_sparkplug
from sensorhub.decoders import batch_py, sparkplug_py
from sensorhub.decoders.sparkplug_host import SparkplugHost

ALIASES = {0: ("zero", 1), 1: ("one", 0), 5: ("five", 10)}
TYPES = {"zero": 1, "one": 0, "five": 10, "a": 3}
KINDS = ("NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH", "NBIRTH", "NDATA")


class _WithTables:
    """A decoder whose ``decode`` uses fixed birth tables (for _harness.outcome)."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder

    def decode(self, topic: str | None, payload: bytes, recv_ns: int, batch: Any) -> int:
        n: int = self.decoder.decode_with(topic, payload, recv_ns, batch, ALIASES, TYPES)
        return n


plain_check = _harness.make_check(cy_sparkplug.Decoder(), sparkplug_py.Decoder(), exact=True)
tables_check = _harness.make_check(
    _WithTables(cy_sparkplug.Decoder()), _WithTables(sparkplug_py.Decoder()), exact=True
)
hosts = (
    SparkplugHost("fuzz", cy_sparkplug.Decoder()),
    SparkplugHost("fuzz", sparkplug_py.Decoder()),
)
batches = (cy_batch.ReadingBatch(), batch_py.ReadingBatch())


def _host_outcome(host: SparkplugHost, batch: Any, topic: str, payload: bytes) -> Any:
    before = len(batch)
    try:
        n = host.on_message(topic, payload, _harness.RECV_NS, batch)
    except errors.DecodeError as e:
        if len(batch) != before:
            raise AssertionError("a failed message changed the batch") from e
        return ("error", type(e), e.offset, str(e), host.counters())
    rows = batch.rows()[before:]
    for r in rows:
        r["value"] = struct.pack("<d", r["value"])
    if len(batch) > 10_000:
        batch.clear()
    return ("ok", n, rows, host.counters(), host.take_outgoing())


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, payload = data[0], data[1:]
    (tables_check if mode & 1 else plain_check)(payload, "g/n")
    if mode & 2:
        kind = KINDS[(mode >> 2) & 7]
        topic = f"spBv1.0/g/{kind}/n" + ("/d" if kind[0] == "D" else "")
        a = _host_outcome(hosts[0], batches[0], topic, payload)
        b = _host_outcome(hosts[1], batches[1], topic, payload)
        if a != b:
            raise AssertionError(
                f"hosts differ on {topic} {payload!r}:\n  cython {a}\n  python {b}"
            )


_SEEDS = [
    b"\x08" + uvarint(1_764_072_000_000)
    + sparkplug_metric(b"bdSeq", None, 4, b"\x58\x03")
    + sparkplug_metric(b"temp", 1, 9, b"\x65" + struct.pack("<f", 21.5))
    + sparkplug_metric(b"count", 5, 8, b"\x58" + uvarint(2**64 - 1))
    + sparkplug_metric(b"ok", None, 11, b"\x70\x01")
    + sparkplug_metric(b"s", None, 12, b"\x7a\x02hi")
    + b"\x18\x00",
    b"\x08" + uvarint(1_764_072_000_001) + sparkplug_metric(None, 0, 0, b"\x50\xff\x01") + sparkplug_metric(None, 5, 0, b"\x69" + struct.pack("<d", -2.5)) + b"\x18\x01",
    b"\x08\x01" + sparkplug_metric(b"a", None, 3, b"\x50\xff\xff\xff\xff\x0f\x38\x01") + b"\x22\x04uuid\x2b\x08\x01\x2c\x18\xff\x01",
    sparkplug_metric(b"h", None, 10, b"\x18" + uvarint(1000) + b"\x28\x01\x69" + struct.pack("<d", 1.0)),
]  # fmt: skip
_ALPHABET = (
    b"\x08\x0a\x10\x12\x18\x20\x22\x28\x38\x50\x58\x65\x69\x70\x7a\x0b\x0c\x0e\x80\xff\x00\x01"
)


def plain_input(rng: random.Random) -> bytes:
    return bytes([rng.randrange(32)]) + _harness.mutate(rng, rng.choice(_SEEDS), _ALPHABET)


if __name__ == "__main__":
    sys.exit(_harness.main("sparkplug", one_input, plain_input))
