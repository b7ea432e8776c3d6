"""Firmware frame decoder: golden vectors for every rule, both implementations.

Frames come from the independent test encoder (``kit.encoders.Frame``); each test
runs against the Cython decoder and its pure-Python twin.
"""

from __future__ import annotations

import math
import random
import struct
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.encoders import DEVICE_CHARS, Frame, Reading, random_frame
from twins import IMPLEMENTATIONS, load

from sensorhub import errors


def classes(impl: str) -> tuple[Any, Any]:
    """``(Decoder, ReadingBatch)`` of one implementation (a missing Cython build fails the test)."""
    decoder = load(impl, "sensorhub.decoders.frame_py", "frame").Decoder
    return decoder, load(impl, "sensorhub.decoders.batch_py", "batch").ReadingBatch


RECV_NS = 1_764_072_001_234_567_891
NAMES = {1: "temp_c", 2: "rh", 65535: "last"}


class Impl:
    def __init__(self, name: str) -> None:
        self.name = name
        self.decoder_cls, self.batch_cls = classes(name)
        self.decoder = self.decoder_cls(NAMES)

    def batch(self) -> Any:
        return self.batch_cls(16)

    def decode(
        self, payload: bytes, topic: str | None = None, batch: Any = None
    ) -> list[dict[str, Any]]:
        b = self.batch() if batch is None else batch
        n = self.decoder.decode(topic, payload, RECV_NS, b)
        rows = b.rows()
        assert n == len(rows)
        return [{k: v for k, v in r.items() if k != "recv_us"} for r in rows]

    def error(self, payload: bytes, topic: str | None = None) -> errors.DecodeError:
        b = self.batch()
        b.append("other", "x", 1, 2.0, 0, 3, 4)
        before = (b.rows(), list(b.devices), list(b.metrics))
        with pytest.raises(errors.DecodeError) as ei:
            self.decoder.decode(topic, payload, RECV_NS, b)
        # the batch is exactly as before the call
        assert (b.rows(), list(b.devices), list(b.metrics)) == before
        return ei.value


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> Impl:
    return Impl(request.param)


def three(float32: bool = False, **kw: Any) -> Frame:
    return Frame(
        readings=[
            Reading(1, 0, 0, 21.5),
            Reading(2, 10, 1, -3.25),
            Reading(7, 4_000_000_000, 2, 0.0),
        ],
        frame_seq=5,
        float32=float32,
        **kw,
    )


# A frame written out by hand from the spec table: device "d1", frame_seq 2,
# base_ts 1_000_000, one float64 reading metric 1, delta 5, quality 0, value 1.5.
GOLDEN = bytes.fromhex("534801000264310200000040420f0000000000010001000500000000000000000000f83f")
GOLDEN += struct.pack("<I", zlib.crc32(GOLDEN))


def test_golden_frame(impl: Impl) -> None:
    assert impl.decode(GOLDEN) == [
        {
            "device": "d1",
            "metric": "temp_c",
            "ts_us": 1_000_005,
            "value": 1.5,
            "quality": 0,
            "seq": 2 * 65536,
        }
    ]


@pytest.mark.parametrize("float32", [False, True])
def test_valid_frame_round_trips(impl: Impl, float32: bool) -> None:
    f = three(float32)
    assert impl.decode(f.encode()) == f.expected_rows(NAMES)


def test_recv_time_is_microseconds(impl: Impl) -> None:
    b = impl.batch()
    impl.decoder.decode(None, three().encode(), RECV_NS, b)
    assert set(b.column("recv_us")) == {RECV_NS // 1000}


@pytest.mark.parametrize("count", [0, 1, 1024])
@pytest.mark.parametrize("float32", [False, True])
def test_count_bounds(impl: Impl, count: int, float32: bool) -> None:
    f = Frame(readings=[Reading(i % 3, i, i % 3, float(i)) for i in range(count)], float32=float32)
    assert impl.decode(f.encode()) == f.expected_rows(NAMES)


def test_count_too_large(impl: Impl) -> None:
    f = Frame(readings=[Reading(1, 0, 0, 1.0)] * 1025)
    e = impl.error(f.encode())
    assert type(e) is errors.CountTooLarge and e.offset == 17 + len(f.device)


@pytest.mark.parametrize("float32", [False, True])
def test_nan_and_infinities_are_kept(impl: Impl, float32: bool) -> None:
    f = Frame(
        readings=[
            Reading(1, 0, 0, math.nan),
            Reading(1, 1, 0, math.inf),
            Reading(1, 2, 0, -math.inf),
        ],
        float32=float32,
    )
    values = [r["value"] for r in impl.decode(f.encode())]
    assert math.isnan(values[0]) and values[1:] == [math.inf, -math.inf]


def test_seq_and_ts_extremes(impl: Impl) -> None:
    f = Frame(
        frame_seq=0xFFFFFFFF,
        base_ts=-(1 << 63),
        readings=[Reading(65535, 0xFFFFFFFF, 2, 1.0), Reading(0, 0, 0, 2.0)],
    )
    rows = impl.decode(f.encode())
    assert [r["seq"] for r in rows] == [0xFFFFFFFF * 65536, 0xFFFFFFFF * 65536 + 1]
    assert rows[0]["ts_us"] == -(1 << 63) + 0xFFFFFFFF
    assert [r["metric"] for r in rows] == ["last", "m0"]


def test_ts_overflow_is_invalid(impl: Impl) -> None:
    f = Frame(base_ts=(1 << 63) - 10, readings=[Reading(1, 9, 0, 1.0), Reading(1, 11, 0, 1.0)])
    e = impl.error(f.encode())
    assert type(e) is errors.InvalidValue and e.offset == 19 + len(f.device) + 15 + 2


@pytest.mark.parametrize("float32", [False, True])
def test_every_truncation_offset(impl: Impl, float32: bool) -> None:
    f = three(float32)
    data = f.encode()
    for n in range(len(data)):
        e = impl.error(data[:n])
        assert type(e) is errors.Truncated, (n, e)
        assert e.offset == f.truncation_offset(n), (n, e)
        assert "truncated" in str(e) and f"offset {e.offset}" in str(e)


def test_bad_magic(impl: Impl) -> None:
    for magic in (b"HS", b"SX", b"\x00\x00"):
        e = impl.error(three(magic=magic).encode())
        assert type(e) is errors.BadMagic and e.offset == 0


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version(impl: Impl, version: int) -> None:
    e = impl.error(three(version=version).encode())
    assert type(e) is errors.UnsupportedVersion and e.offset == 2


@pytest.mark.parametrize("bit", range(1, 8))
@pytest.mark.parametrize("float32", [False, True])
def test_each_reserved_bit(impl: Impl, bit: int, float32: bool) -> None:
    e = impl.error(three(float32, extra_flags=1 << bit).encode())
    assert type(e) is errors.ReservedBits and e.offset == 3


@pytest.mark.parametrize("device", ["a", "Z", "9", ".", "_", "-", DEVICE_CHARS[:64], "x" * 64])
def test_device_ids_accepted(impl: Impl, device: str) -> None:
    rows = impl.decode(three(device=device.encode()).encode(), topic=device)
    assert {r["device"] for r in rows} == {device}


@pytest.mark.parametrize(
    ("device", "bad_at"),
    [
        (b" ", 0),
        (b"ab/c", 2),
        (b"dev\x00", 3),
        ("pr\u00e9ss".encode(), 2),
        (b"a+b", 1),
        (b"\xff", 0),
    ],
)
def test_device_ids_rejected(impl: Impl, device: bytes, bad_at: int) -> None:
    e = impl.error(three(device=device).encode())
    assert type(e) is errors.BadDeviceId and e.offset == 5 + bad_at


@pytest.mark.parametrize("id_len", [0, 65, 255])
def test_id_len_out_of_range(impl: Impl, id_len: int) -> None:
    e = impl.error(three(device=b"x" * 70, id_len=id_len).encode())
    assert type(e) is errors.BadDeviceId and e.offset == 4


@pytest.mark.parametrize("quality", [3, 4, 128, 255])
def test_bad_quality(impl: Impl, quality: int) -> None:
    f = three()
    f.readings[2].quality = quality
    e = impl.error(f.encode())
    assert type(e) is errors.BadQuality and e.offset == 19 + len(f.device) + 2 * 15 + 6


def test_crc_flip(impl: Impl) -> None:
    f = three()
    good = f.encode()
    for i in range(len(good) - 4, len(good)):  # every bit of the stored CRC
        for bit in range(8):
            bad = bytearray(good)
            bad[i] ^= 1 << bit
            e = impl.error(bytes(bad))
            assert type(e) is errors.ChecksumMismatch and e.offset == len(good) - 4
    bad = bytearray(good)
    bad[-6] ^= 0x10  # inside the last value
    assert type(impl.error(bytes(bad))) is errors.ChecksumMismatch


@pytest.mark.parametrize("extra", [b"\x00", b"12345", GOLDEN])
def test_trailing_bytes(impl: Impl, extra: bytes) -> None:
    f = three(trailing=extra)
    e = impl.error(f.encode())
    assert type(e) is errors.TrailingBytes and e.offset == len(f.encode()) - len(extra)


def test_topic_device(impl: Impl) -> None:
    data = three().encode()
    assert len(impl.decode(data, topic="press-01")) == 3
    e = impl.error(data, topic="press-02")
    assert type(e) is errors.DeviceMismatch and e.offset == 5
    assert "press-01" in str(e) and "press-02" in str(e)


def test_first_rule_broken_wins(impl: Impl) -> None:
    """Structure, then CRC, then trailing bytes, then field values, then topic."""
    f = three(device=b"bad/id", crc=0, trailing=b"x")
    f.readings[0].quality = 9
    assert type(impl.error(f.encode(), topic="z")) is errors.ChecksumMismatch
    f.crc = None
    assert type(impl.error(f.encode(), topic="z")) is errors.TrailingBytes
    f.trailing = b""
    assert type(impl.error(f.encode(), topic="z")) is errors.BadDeviceId
    f.device = b"ok"
    assert type(impl.error(f.encode(), topic="z")) is errors.BadQuality
    f.readings[0].quality = 0
    assert type(impl.error(f.encode(), topic="z")) is errors.DeviceMismatch
    assert type(impl.error(three(version=2, extra_flags=2).encode())) is errors.UnsupportedVersion
    assert type(impl.error(three(extra_flags=2, count=2000).encode())) is errors.ReservedBits


def test_batch_accumulates_across_frames_and_devices(impl: Impl) -> None:
    b = impl.batch()
    a = three(device=b"a").encode()
    c = three(device=b"c").encode()
    for payload in (a, c, a, a):
        impl.decoder.decode(None, payload, RECV_NS, b)
    b.begin()
    with pytest.raises(errors.DecodeError):
        impl.decoder.decode(None, a[:-1], RECV_NS, b)
    assert len(b) == 12 and b.devices == ["a", "c"]
    assert b.column("device") == ["a"] * 3 + ["c"] * 3 + ["a"] * 6
    assert b.metrics == ["temp_c", "rh", "m7"]
    b.clear()  # the decoder's cached indexes must not leak into a cleared batch
    impl.decoder.decode(None, c, RECV_NS, b)
    assert b.column("device") == ["c"] * 3 and b.column("metric") == ["temp_c", "rh", "m7"]


def test_buffer_types(impl: Impl) -> None:
    data = three().encode()
    want = impl.decode(data)
    assert impl.decode(bytearray(data)) == want
    assert impl.decode(memoryview(data)) == want  # type: ignore[arg-type]


def _outcome(name: str, payload: bytes, topic: str | None) -> tuple[Any, ...]:
    dec_cls, batch_cls = classes(name)
    b = batch_cls(4)
    try:
        n = dec_cls(NAMES).decode(topic, payload, RECV_NS, b)
    except errors.DecodeError as e:
        return ("error", type(e), e.offset, str(e), len(b))
    rows = b.rows()
    for r in rows:  # NaN != NaN; compare the bits
        r["value"] = struct.pack("<d", r["value"])
    return ("ok", n, rows)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), topic=st.sampled_from([None, "match", "other"]))
def test_property_random_valid_frames_round_trip(impl: str, seed: int, topic: str | None) -> None:
    f = random_frame(random.Random(seed))
    t = f.device.decode() if topic == "match" else topic
    out = _outcome(impl, f.encode(), t)
    assert out == _outcome("python", f.encode(), t)
    if t is None or t == f.device.decode():
        want = f.expected_rows(NAMES)
        for r in want:
            r["value"] = struct.pack("<d", r["value"])
        assert out[0] == "ok"
        assert [{k: v for k, v in r.items() if k != "recv_us"} for r in out[2]] == want
    else:
        assert out[1] is errors.DeviceMismatch


# For "python" these check the twin alone: any input decodes or is a DecodeError, nothing else.
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    edits=st.lists(
        st.tuples(st.integers(0, 400), st.integers(0, 255), st.sampled_from("xdi")), max_size=4
    ),
    fix_crc=st.booleans(),
)
def test_property_mutations_same_outcome(
    impl: str, seed: int, edits: list[tuple[int, int, str]], fix_crc: bool
) -> None:
    data = bytearray(random_frame(random.Random(seed), max_count=5).encode())
    for pos, byte, op in edits:
        pos = pos % (len(data) + 1)
        if op == "x" and pos < len(data):
            data[pos] = byte
        elif op == "d":
            del data[pos : pos + byte % 8]
        else:
            data[pos:pos] = bytes([byte])
    if fix_crc and len(data) > 4:  # so mutations reach the field rules behind the CRC
        data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])))
    assert _outcome(impl, bytes(data), None) == _outcome("python", bytes(data), None)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=64))
def test_property_random_bytes_same_outcome(impl: str, payload: bytes) -> None:
    assert _outcome(impl, payload, None) == _outcome("python", payload, None)
    assert _outcome(impl, b"SH\x01" + payload, "d") == _outcome("python", b"SH\x01" + payload, "d")


@pytest.mark.parametrize("recv_ns", [0, 999, 1000, -1, -1000, -1001])
def test_recv_ns_to_us_floors(impl: Impl, recv_ns: int) -> None:
    b = impl.batch()
    impl.decoder.decode(None, GOLDEN, recv_ns, b)
    assert b.column("recv_us") == [recv_ns // 1000]
