"""Firmware frame decoder, version 1: the pure-Python twin of ``cython_ext/frame.pyx``.

The frame layout is ``spec/firmware-frame.md``; this module is its readable
reference. Integers are little-endian::

    0      2  magic "SH"
    2      1  version (1)
    3      1  flags: bit 0 = float32 values; bits 1-7 reserved (0)
    4      1  id_len L (1..64)
    5      L  device_id  [A-Za-z0-9._-]
    5+L    4  frame_seq  u32
    9+L    8  base_ts    i64 µs since the epoch
    17+L   2  count N    0..1024
    19+L   N×k readings: metric_id u16, ts_delta u32, quality u8, value f64|f32
    end-4  4  crc32 of every byte before it

Order of the checks (the error names the first rule broken in this order):

1. structure, in offset order: magic, version, reserved flag bits, id_len,
   then truncation of each header field, count ≤ 1024, truncation inside the
   readings (the offset is the start of the first incomplete field) and of the
   CRC;
2. the CRC;
3. trailing bytes after the CRC;
4. field values, in offset order: device id characters, then per reading its
   timestamp (``base_ts + ts_delta`` must fit an i64) and its quality;
5. the topic's device against the frame's device.

Why structure before the CRC: until magic, version, flags, id_len and count
are known the CRC's position is not known, and a wrong magic or version means
the bytes are not a version-1 frame at all, which is the more useful reason.
Why the CRC before field values: a CRC mismatch means the bytes are not what
the device sent, so a complaint about a value inside them (a quality of 7
after a bit flip on the wire) would name the wrong cause. Trailing bytes are
checked after the CRC because a CRC that matches at the position the count
gives shows the frame itself is intact and only the message is too long.

Stored reading: device = device_id, metric = dictionary name (``m<id>`` when
the dictionary does not name it), ts = base_ts + ts_delta, value (NaN and ±inf
kept), quality, seq = frame_seq × 65536 + index of the reading in the frame.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Mapping
from typing import Any

from sensorhub.errors import (
    BadDeviceId,
    BadMagic,
    BadQuality,
    ChecksumMismatch,
    CountTooLarge,
    DeviceMismatch,
    InvalidValue,
    ReservedBits,
    TrailingBytes,
    Truncated,
    UnsupportedVersion,
)

__all__ = ["MAX_COUNT", "MAX_ID_LEN", "Decoder", "MetricDict"]

MAGIC = b"SH"
VERSION = 1
FLAG_FLOAT32 = 0x01
MAX_ID_LEN = 64
MAX_COUNT = 1024
HEADER_FIXED = 19  # bytes of header besides the device id
INT64_MAX = (1 << 63) - 1
_DEVICE_ID = re.compile(rb"[A-Za-z0-9._-]*")
_HEAD = struct.Struct("<IqH")  # frame_seq, base_ts, count
_READING64 = struct.Struct("<HIBd")
_READING32 = struct.Struct("<HIBf")
# Offset of each field inside a reading, to name where a frame was cut.
_READING_FIELDS = ((0, 2, "metric_id"), (2, 4, "ts_delta"), (6, 1, "quality"), (7, 0, "value"))


class MetricDict:
    """metric_id → metric name; ids the dictionary does not name are ``m<id>``."""

    __slots__ = ("_names",)

    def __init__(self, dictionary: Mapping[int, str] | None = None) -> None:
        self._names: dict[int, str] = {}
        for k, v in (dictionary or {}).items():
            if not 0 <= k <= 0xFFFF:
                raise ValueError(f"metric id {k} is outside 0..65535")
            if not isinstance(v, str) or not v:
                raise ValueError(f"metric id {k} needs a non-empty name")
            self._names[k] = v

    def name(self, metric_id: int) -> str:
        """The name of ``metric_id``."""
        n = self._names.get(metric_id)
        if n is None:
            n = self._names[metric_id] = f"m{metric_id}"
        return n


def _need(n: int, off: int, size: int, field: str) -> None:
    if n < off + size:
        raise Truncated(f"{field} needs {size} bytes, payload has {n}", off)


class Decoder:
    """Decodes firmware frames into a :class:`ReadingBatch` (twin API)."""

    __slots__ = ("_metrics",)

    def __init__(self, dictionary: Mapping[int, str] | None = None) -> None:
        self._metrics = MetricDict(dictionary)

    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int:
        """Append the frame's readings to ``batch``; return how many.

        Raises a :class:`~sensorhub.errors.DecodeError` subclass naming the
        first rule broken (see the module docstring for the order) and leaves
        ``batch`` unchanged.
        """
        buf = bytes(payload)
        n = len(buf)
        # 1. structure
        _need(n, 0, 2, "magic")
        if buf[0:2] != MAGIC:
            raise BadMagic(f"expected 53 48, got {buf[0:2].hex(' ')}", 0)
        _need(n, 2, 1, "version")
        if buf[2] != VERSION:
            raise UnsupportedVersion(f"version {buf[2]}, only 1 is supported", 2)
        _need(n, 3, 1, "flags")
        flags = buf[3]
        if flags & ~FLAG_FLOAT32:
            raise ReservedBits(f"flags 0x{flags:02x} set reserved bits 0x{flags & 0xFE:02x}", 3)
        _need(n, 4, 1, "id_len")
        id_len = buf[4]
        if not 1 <= id_len <= MAX_ID_LEN:
            raise BadDeviceId(f"id_len {id_len} is outside 1..{MAX_ID_LEN}", 4)
        _need(n, 5, id_len, "device_id")
        off = 5 + id_len
        _need(n, off, 4, "frame_seq")
        _need(n, off + 4, 8, "base_ts")
        _need(n, off + 12, 2, "count")
        head: tuple[int, int, int] = _HEAD.unpack_from(buf, off)
        frame_seq, base_ts, count = head
        if count > MAX_COUNT:
            raise CountTooLarge(f"count {count} exceeds {MAX_COUNT}", off + 12)
        f32 = bool(flags & FLAG_FLOAT32)
        k = 11 if f32 else 15
        body = off + 14
        crc_off = body + count * k
        if n < crc_off:
            i, rest = divmod(n - body, k)
            for foff, size, field in _READING_FIELDS:
                if rest < foff + (size or k - 7):
                    raise Truncated(
                        f"reading {i} {field} cut off, payload has {n} bytes", body + i * k + foff
                    )
        _need(n, crc_off, 4, "crc32")
        # 2. CRC
        stored = int.from_bytes(buf[crc_off : crc_off + 4], "little")
        computed = zlib.crc32(buf[:crc_off])
        if stored != computed:
            raise ChecksumMismatch(f"stored 0x{stored:08x}, computed 0x{computed:08x}", crc_off)
        # 3. trailing bytes
        end = crc_off + 4
        if n != end:
            raise TrailingBytes(f"{n - end} bytes after the crc32", end)
        # 4. field values
        raw_id = buf[5:off]
        m = _DEVICE_ID.match(raw_id)
        assert m is not None  # the pattern accepts the empty prefix
        if m.end() != id_len:
            raise BadDeviceId(f"byte 0x{raw_id[m.end()]:02x} is not in [A-Za-z0-9._-]", 5 + m.end())
        device = raw_id.decode("ascii")
        reading = _READING32 if f32 else _READING64
        decoded = []
        for i in range(count):
            r = body + i * k
            metric_id, delta, quality, value = reading.unpack_from(buf, r)
            if base_ts + delta > INT64_MAX:
                raise InvalidValue(f"reading {i}: base_ts + ts_delta exceeds the i64 range", r + 2)
            if quality > 2:
                raise BadQuality(f"reading {i} has quality {quality}, expected 0, 1 or 2", r + 6)
            decoded.append((metric_id, base_ts + delta, value, quality, frame_seq * 65536 + i))
        # 5. topic device
        if topic_device is not None and topic_device != device:
            raise DeviceMismatch(f"frame device {device!r}, topic device {topic_device!r}", 5)
        # Only a fully valid frame touches the batch, so nothing to roll back
        # here; begin/rollback still guard against a failure inside the batch.
        batch.begin()
        try:
            dev = batch.intern_device(device)
            recv_us = recv_ns // 1000
            names = self._metrics
            for metric_id, ts, value, quality, seq in decoded:
                batch.push(
                    dev,
                    batch.intern_metric(names.name(metric_id)),
                    ts,
                    value,
                    quality,
                    seq,
                    recv_us,
                )
        except BaseException:
            batch.rollback()
            raise
        return count
