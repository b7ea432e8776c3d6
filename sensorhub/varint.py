"""Unsigned LEB128 varints: MQTT's remaining length, ClickHouse Native's string lengths and
protobuf's varints are the same encoding (the pure-Python twins and the Sparkplug host's
rebirth command share this; the Cython modules inline it)."""

from __future__ import annotations

__all__ = ["uvarint"]


def uvarint(n: int) -> bytes:
    """``n`` (>= 0) in 7-bit groups, least significant first, high bit = more follows."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
