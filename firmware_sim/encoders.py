"""Payload encoders for the four device formats, written from the specs alone.

These encoders deliberately share no code with ``sensorhub.decoders``: each side
is built from ``firmware-frame.md`` and ``payloads.md`` independently, so a
round trip through both checks the other. Every encoder is a pure function of
its arguments.

- :func:`encode_frame`: the binary firmware frame, version 1.
- :func:`encode_json_single`, :func:`encode_json_multi`, :func:`encode_json_array`:
  JSON shapes 1, 2 and 3.
- :func:`encode_ilp_line`: one Influx line-protocol line.
- :func:`encode_sparkplug`: an ``org.eclipse.tahu.protobuf.Payload``, hand-encoded
  in the protobuf wire format.

:func:`corrupt_frame` produces a frame that breaks exactly one named rule of the
frame spec, for fault injection.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "FRAME_MAGIC",
    "FRAME_MAX_COUNT",
    "FRAME_RULES",
    "FrameReading",
    "SparkplugMetric",
    "corrupt_frame",
    "encode_frame",
    "encode_frame_columns",
    "encode_ilp_line",
    "encode_json_array",
    "encode_json_multi",
    "encode_json_single",
    "encode_sparkplug",
    "format_json_ts",
    "valid_device_id",
]

FRAME_MAGIC = b"SH"
FRAME_VERSION = 1
FRAME_MAX_COUNT = 1024
FLAG_FLOAT32 = 0x01
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HEAD = struct.Struct("<2sBBB")
_MID = struct.Struct("<IqH")
_READING64 = struct.Struct("<HIBd")
_READING32 = struct.Struct("<HIBf")
_CRC = struct.Struct("<I")

# The rules of firmware-frame.md that an invalid frame can break, in the order
# the spec lists them; ``corrupt_frame`` knows how to break each.
FRAME_RULES = (
    "bad-magic",
    "bad-version",
    "reserved-flags",
    "truncated",
    "bad-device-id",
    "count-too-large",
    "bad-quality",
    "crc",
    "trailing-bytes",
    "topic-mismatch",
)


@dataclass(frozen=True, slots=True)
class FrameReading:
    """One reading inside a frame: metric id, microseconds after base_ts, quality, value."""

    metric_id: int
    ts_delta_us: int
    quality: int
    value: float


def valid_device_id(device_id: str) -> bool:
    """True when ``device_id`` is 1..64 characters of ``[A-Za-z0-9._-]``."""
    return _DEVICE_ID_RE.match(device_id) is not None


def encode_frame(
    device_id: str,
    frame_seq: int,
    base_ts_us: int,
    readings: Sequence[FrameReading],
    *,
    float32: bool = False,
) -> bytes:
    """Encode one valid firmware frame (version 1) with its CRC-32.

    Raises ``ValueError`` for arguments a valid frame cannot carry (the
    simulator never sends those by accident; :func:`corrupt_frame` makes
    invalid frames on purpose).
    """
    dev = device_id.encode("ascii")
    if not valid_device_id(device_id):
        raise ValueError(f"device id {device_id!r} is not 1..64 of [A-Za-z0-9._-]")
    if len(readings) > FRAME_MAX_COUNT:
        raise ValueError(f"{len(readings)} readings exceed {FRAME_MAX_COUNT}")
    rs = _READING32 if float32 else _READING64
    parts = [
        _HEAD.pack(FRAME_MAGIC, FRAME_VERSION, FLAG_FLOAT32 if float32 else 0, len(dev)),
        dev,
        _MID.pack(frame_seq & 0xFFFFFFFF, base_ts_us, len(readings)),
    ]
    for r in readings:
        if r.quality not in (0, 1, 2):
            raise ValueError(f"quality {r.quality} is not 0, 1 or 2")
        parts.append(rs.pack(r.metric_id, r.ts_delta_us, r.quality, r.value))
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


_FAST: dict[tuple[int, int, bool], struct.Struct] = {}


def encode_frame_columns(
    device_id: bytes,
    frame_seq: int,
    base_ts_us: int,
    metric_ids: Sequence[int],
    qualities: Sequence[int],
    values: Sequence[float],
    *,
    float32: bool = False,
) -> bytes:
    """:func:`encode_frame` for the simulator's hot path: one ``struct`` call per frame.

    Reading ``i`` has ts_delta ``i``. The caller guarantees a valid device id,
    qualities in 0..2 and at most 1024 readings; the output equals
    :func:`encode_frame` of the same readings (a property test holds them equal).
    """
    n = len(values)
    key = (len(device_id), n, float32)
    st = _FAST.get(key)
    if st is None:
        st = struct.Struct(f"<2sBBB{len(device_id)}sIqH" + ("HIBf" if float32 else "HIBd") * n)
        if len(_FAST) < 4096:  # bounded: a few id lengths times a few message sizes
            _FAST[key] = st
    args: list[object] = [
        FRAME_MAGIC, FRAME_VERSION, FLAG_FLOAT32 if float32 else 0, len(device_id), device_id,
        frame_seq & 0xFFFFFFFF, base_ts_us, n,
    ]
    for i in range(n):
        args += (metric_ids[i], i, qualities[i], values[i])
    body = st.pack(*args)
    return body + _CRC.pack(zlib.crc32(body))


def corrupt_frame(frame: bytes, rule: str) -> bytes:
    """Return a copy of the valid ``frame`` that breaks exactly ``rule`` (one of :data:`FRAME_RULES`).

    Every rule but ``crc`` and ``trailing-bytes`` recomputes the CRC so that the
    named rule is the first one a decoder meets. ``topic-mismatch`` rewrites the
    device id to another valid id, so the frame itself is valid and only its
    topic disagrees.
    """
    id_len = frame[4]
    body = bytearray(frame[:-4])
    if rule == "bad-magic":
        body[0:2] = b"XH"
    elif rule == "bad-version":
        body[2] = 2
    elif rule == "reserved-flags":
        body[3] |= 0x04
    elif rule == "truncated":
        # Cut inside the last reading (or inside base_ts of an empty frame): the
        # frame ends before a field it must hold, CRC included.
        return frame[: max(5 + id_len + 6, len(frame) - 7)]
    elif rule == "bad-device-id":
        body[5] = ord("/")
    elif rule == "count-too-large":
        off = 5 + id_len + 12
        struct.pack_into("<H", body, off, FRAME_MAX_COUNT + 1)
    elif rule == "bad-quality":
        off = 5 + id_len + 14
        if len(body) <= off:
            raise ValueError("bad-quality needs a frame with at least one reading")
        body[off + 6] = 7
    elif rule == "crc":
        return bytes(body) + _CRC.pack(zlib.crc32(body) ^ 0x00010000)
    elif rule == "trailing-bytes":
        return frame + b"\x00"
    elif rule == "topic-mismatch":
        dev = bytes(body[5 : 5 + id_len])
        other = (dev[:-1] + (b"x" if dev[-1:] != b"x" else b"y"))
        body[5 : 5 + id_len] = other
    else:
        raise ValueError(f"unknown frame rule {rule!r}; one of {', '.join(FRAME_RULES)}")
    return bytes(body) + _CRC.pack(zlib.crc32(body))


# ---------------------------------------------------------------- JSON


def format_json_ts(ts_us: int) -> str:
    """Seconds since the epoch with exactly six decimals, from integer microseconds.

    Formatting from the integer avoids the float rounding a ``ts_us / 1e6``
    would bring in; the decimal text is exact to the microsecond.
    """
    sign = "-" if ts_us < 0 else ""
    a = abs(ts_us)
    return f"{sign}{a // 1_000_000}.{a % 1_000_000:06d}"


def _json_number(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        raise ValueError("JSON cannot carry NaN or infinity")
    return repr(float(value))


def encode_json_single(metric: str, value: float, ts_us: int, seq: int, quality: int = 0) -> bytes:
    """JSON shape 1: one reading."""
    return (
        f'{{"metric":"{metric}","value":{_json_number(value)},"ts":{format_json_ts(ts_us)},'
        f'"seq":{seq},"quality":{quality}}}'
    ).encode()


def encode_json_multi(values: Iterable[tuple[str, float]], ts_us: int, seq: int) -> bytes:
    """JSON shape 2: several metrics at one time, sharing ``seq``."""
    inner = ",".join(f'"{m}":{_json_number(v)}' for m, v in values)
    return f'{{"ts":{format_json_ts(ts_us)},"seq":{seq},"values":{{{inner}}}}}'.encode()


def encode_json_array(objects: Iterable[bytes]) -> bytes:
    """JSON shape 3: an array of shape-1 or shape-2 objects."""
    return b"[" + b",".join(objects) + b"]"


# ---------------------------------------------------------------- Influx line protocol


def _ilp_escape_key(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _ilp_escape_measurement(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,").replace(" ", "\\ ")


def _ilp_field_value(v: float | int | bool | str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}i"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if math.isnan(v) or math.isinf(v):
        raise ValueError("line protocol cannot carry NaN or infinity")
    return repr(float(v))


def encode_ilp_line(
    measurement: str,
    tags: Sequence[tuple[str, str]],
    fields: Sequence[tuple[str, float | int | bool | str]],
    ts_ns: int | None,
) -> bytes:
    """One line: ``measurement[,tag=v...] field=v[,field=v...] [ts_ns]``, escaped as InfluxDB documents."""
    if not fields:
        raise ValueError("a line needs at least one field")
    head = _ilp_escape_measurement(measurement)
    for k, v in tags:
        head += f",{_ilp_escape_key(k)}={_ilp_escape_key(v)}"
    body = ",".join(f"{_ilp_escape_key(k)}={_ilp_field_value(v)}" for k, v in fields)
    line = f"{head} {body}"
    if ts_ns is not None:
        line += f" {ts_ns}"
    return line.encode()


# ---------------------------------------------------------------- Sparkplug B (protobuf wire format)

# Sparkplug B data types (sparkplug_b.proto, enum DataType).
SP_INT64 = 4
SP_UINT64 = 8
SP_DOUBLE = 10
SP_BOOLEAN = 11


@dataclass(frozen=True, slots=True)
class SparkplugMetric:
    """One ``Payload.Metric``: a name (births) and/or an alias, a timestamp in ms, a typed value."""

    name: str | None
    alias: int | None
    timestamp_ms: int | None
    datatype: int
    value: float | int | bool


def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1  # negative int64 values take ten bytes, as protobuf encodes them
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


_DOUBLE = struct.Struct("<d")


def _encode_metric(m: SparkplugMetric) -> bytes:
    out = bytearray()
    if m.name is not None:
        name = m.name.encode()
        out += _key(1, 2) + _varint(len(name)) + name
    if m.alias is not None:
        out += _key(2, 0) + _varint(m.alias)
    if m.timestamp_ms is not None:
        out += _key(3, 0) + _varint(m.timestamp_ms)
    out += _key(4, 0) + _varint(m.datatype)
    if m.datatype == SP_DOUBLE:
        out += _key(13, 1) + _DOUBLE.pack(float(m.value))
    elif m.datatype == SP_BOOLEAN:
        out += _key(14, 0) + (b"\x01" if m.value else b"\x00")
    elif m.datatype in (SP_INT64, SP_UINT64):
        out += _key(11, 0) + _varint(int(m.value))
    else:
        raise ValueError(f"datatype {m.datatype} is not encoded by the simulator")
    return bytes(out)


def encode_sparkplug(timestamp_ms: int, seq: int | None, metrics: Sequence[SparkplugMetric]) -> bytes:
    """Encode ``Payload{timestamp, metrics, seq}`` in protobuf wire format."""
    out = bytearray(_key(1, 0) + _varint(timestamp_ms))
    for m in metrics:
        body = _encode_metric(m)
        out += _key(2, 2) + _varint(len(body)) + body
    if seq is not None:
        out += _key(3, 0) + _varint(seq)
    return bytes(out)
