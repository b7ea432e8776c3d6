"""The test oracle: encoders written from the specs, independently of ``sensorhub.decoders``.

They build firmware frames (spec/firmware-frame.md), JSON payloads
(spec/payloads.md) and Sparkplug B payloads field by field, including
deliberately broken ones, so that the decoders are checked against a second
reading of the spec rather than against themselves. The tests and the
benchmarks take their payloads from here; the simulator has encoders of its
own (``firmware_sim/encoders.py``), so that it checks the decoders too.
Nothing here imports sensorhub.
"""

from __future__ import annotations

import binascii
import json
import random
import struct
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------- varints


def uvarint(n: int) -> bytes:
    """Unsigned LEB128 (protobuf varint, MQTT remaining length): 7 bits a byte, low first."""
    if n < 0:
        raise ValueError(f"a varint is unsigned, got {n}")
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# ---------------------------------------------------------------- frames


@dataclass
class Reading:
    metric_id: int
    ts_delta: int
    quality: int
    value: float


@dataclass
class Frame:
    """A firmware frame; every field can be set to an invalid value on purpose."""

    device: bytes = b"press-01"
    frame_seq: int = 0
    base_ts: int = 1_764_072_000_000_000
    readings: list[Reading] = field(default_factory=list)
    float32: bool = False
    magic: bytes = b"SH"
    version: int = 1
    extra_flags: int = 0  # OR-ed into the flags byte (reserved bits)
    id_len: int | None = None  # None: len(device)
    count: int | None = None  # None: len(readings)
    crc: int | None = None  # None: the correct CRC
    trailing: bytes = b""

    def body(self) -> bytes:
        """Every byte before the CRC."""
        flags = (1 if self.float32 else 0) | self.extra_flags
        id_len = len(self.device) if self.id_len is None else self.id_len
        count = len(self.readings) if self.count is None else self.count
        out = bytearray(self.magic)
        out.append(self.version & 0xFF)
        out.append(flags & 0xFF)
        out.append(id_len & 0xFF)
        out += self.device
        out += (self.frame_seq & 0xFFFFFFFF).to_bytes(4, "little")
        out += self.base_ts.to_bytes(8, "little", signed=True)
        out += (count & 0xFFFF).to_bytes(2, "little")
        for r in self.readings:
            out += r.metric_id.to_bytes(2, "little")
            out += r.ts_delta.to_bytes(4, "little")
            out.append(r.quality & 0xFF)
            out += struct.pack("<f" if self.float32 else "<d", r.value)
        return bytes(out)

    def encode(self) -> bytes:
        b = self.body()
        crc = binascii.crc32(b) if self.crc is None else self.crc
        return b + crc.to_bytes(4, "little") + self.trailing

    def field_starts(self) -> list[tuple[int, int]]:
        """(offset, size) of every field of a well-formed frame, in order."""
        L = len(self.device)
        k = 11 if self.float32 else 15
        out = [(0, 2), (2, 1), (3, 1), (4, 1), (5, L), (5 + L, 4), (9 + L, 8), (17 + L, 2)]
        for i in range(len(self.readings)):
            r = 19 + L + i * k
            out += [(r, 2), (r + 2, 4), (r + 6, 1), (r + 7, k - 7)]
        out.append((19 + L + len(self.readings) * k, 4))
        return out

    def truncation_offset(self, n: int) -> int:
        """The offset of the first field a prefix of ``n`` bytes does not hold whole."""
        for off, size in self.field_starts():
            if n < off + size:
                return off
        raise ValueError("not truncated")

    def expected_rows(self, names: dict[int, str] | None = None) -> list[dict[str, Any]]:
        """The readings a decoder must store for this frame."""
        names = names or {}
        rows = []
        for i, r in enumerate(self.readings):
            v = r.value
            if self.float32:  # what survives the float32 round trip
                v = struct.unpack("<f", struct.pack("<f", v))[0]
            rows.append(
                {
                    "device": self.device.decode(),
                    "metric": names.get(r.metric_id, f"m{r.metric_id}"),
                    "ts_us": self.base_ts + r.ts_delta,
                    "value": v,
                    "quality": r.quality,
                    "seq": self.frame_seq * 65536 + i,
                }
            )
        return rows


def frame(
    device: str, frame_seq: int, base_ts: int, readings: list[tuple[int, int, int, float]], float32: bool = False
) -> bytes:
    """A valid frame of ``(metric_id, ts_delta, quality, value)`` readings."""
    return Frame(
        device=device.encode(),
        frame_seq=frame_seq,
        base_ts=base_ts,
        readings=[Reading(*r) for r in readings],
        float32=float32,
    ).encode()


DEVICE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"


def random_frame(rng: random.Random, max_count: int = 20) -> Frame:
    """A random valid frame."""
    f32 = rng.random() < 0.5
    readings = []
    for _ in range(rng.randint(0, max_count)):
        if f32:
            value = struct.unpack("<f", rng.randbytes(4))[0]
        else:
            value = rng.choice([rng.uniform(-1e6, 1e6), float("nan"), float("inf"), -0.0, 1e308])
        readings.append(
            Reading(rng.randrange(65536), rng.randrange(1 << 32), rng.randrange(3), value)
        )
    return Frame(
        device="".join(rng.choice(DEVICE_CHARS) for _ in range(rng.randint(1, 64))).encode(),
        frame_seq=rng.randrange(1 << 32),
        base_ts=rng.randrange(-(1 << 62), 1 << 62),
        readings=readings,
        float32=f32,
    )


# ---------------------------------------------------------------- JSON

_WS = ["", " ", "\n", "\t", "\r\n  "]


def _ws(rng: random.Random) -> str:
    return rng.choice(_WS) if rng.random() < 0.3 else ""


def json_string(s: str, rng: random.Random) -> str:
    """A JSON string literal for ``s``, with random (valid) escaping."""
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif cp < 0x20 or rng.random() < 0.1:
            if cp > 0xFFFF:
                cp -= 0x10000
                out.append(f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04X}")
            else:
                out.append(f"\\u{cp:04x}")
        elif ch == "/" and rng.random() < 0.5:
            out.append("\\/")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def json_value(v: Any, rng: random.Random) -> str:
    """Serialise plain data with random whitespace and escapes (numbers as given)."""
    if isinstance(v, RawNumber):
        return v.text
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if rng.random() < 0.7 else f"{v:.17e}".replace("e+", "E")
    if isinstance(v, str):
        return json_string(v, rng)
    if isinstance(v, list):
        return "[" + ",".join(_ws(rng) + json_value(x, rng) + _ws(rng) for x in v) + "]"
    if isinstance(v, dict):
        items = list(v.items())
        rng.shuffle(items)
        parts = [
            _ws(rng)
            + json_string(k, rng)
            + _ws(rng)
            + ":"
            + _ws(rng)
            + json_value(x, rng)
            + _ws(rng)
            for k, x in items
        ]
        return "{" + ",".join(parts) + "}"
    raise TypeError(type(v))


@dataclass(frozen=True)
class RawNumber:
    """A JSON number written exactly as ``text``."""

    text: str


def encode_json(doc: Any, rng: random.Random | None = None) -> bytes:
    """UTF-8 JSON for ``doc`` with random formatting; stdlib-checked to be valid JSON."""
    text = json_value(doc, rng or random.Random(0))
    json.loads(text)  # the encoder must only produce valid JSON
    return text.encode("utf-8")


# ---------------------------------------------------------------- Sparkplug B (protobuf, by hand)


def pb_key(field_number: int, wire_type: int) -> bytes:
    """A protobuf field key."""
    return uvarint(field_number << 3 | wire_type)


def sparkplug_metric(name: bytes | None, alias: int | None, datatype: int, value: bytes) -> bytes:
    """One ``Payload.metrics`` field: name, alias and datatype when given, then ``value``.

    ``value`` is the value field already encoded with its key, e.g.
    ``b"\\x69" + struct.pack("<d", 1.5)`` for ``double_value``.
    """
    m = b""
    if name is not None:
        m += b"\x0a" + uvarint(len(name)) + name
    if alias is not None:
        m += b"\x10" + uvarint(alias)
    if datatype:
        m += b"\x20" + uvarint(datatype)
    return b"\x12" + uvarint(len(m + value)) + m + value


def sparkplug_payload(timestamp_ms: int, metrics: list[bytes], seq: int) -> bytes:
    """A ``Payload``: timestamp, the ``metrics`` fields (from :func:`sparkplug_metric`), seq."""
    return b"\x08" + uvarint(timestamp_ms) + b"".join(metrics) + b"\x18" + uvarint(seq)
