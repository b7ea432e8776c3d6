"""JSON payload decoder: edge cases and differential tests, both implementations."""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.encoders import RawNumber, encode_json, json_string
from twins import IMPLEMENTATIONS, load

from sensorhub import errors


def classes(impl: str) -> tuple[Any, Any]:
    """``(Decoder, ReadingBatch)`` of one implementation (a missing Cython build fails the test)."""
    decoder = load(impl, "sensorhub.decoders.jsonpayload_py", "jsonpayload").Decoder
    return decoder, load(impl, "sensorhub.decoders.batch_py", "batch").ReadingBatch


RECV_NS = 1_764_072_009_000_000_123
RECV_US = RECV_NS // 1000
TS = 1_764_072_000_123_456


def decode(name: str, payload: bytes, topic: str | None = "dev1") -> list[dict[str, Any]]:
    dec_cls, batch_cls = classes(name)
    b = batch_cls(4)
    n = dec_cls().decode(topic, payload, RECV_NS, b)
    rows = b.rows()
    assert n == len(rows)
    assert all(r.pop("recv_us") == RECV_US for r in rows)
    return rows


def outcome(name: str, payload: bytes, topic: str | None = "dev1") -> tuple[Any, ...]:
    try:
        rows = decode(name, payload, topic)
    except errors.DecodeError as e:
        return ("error", type(e))
    for r in rows:
        r["value"] = struct.pack("<d", r["value"])  # NaN-safe, -0.0-exact comparison
    return ("ok", rows)


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def row(
    metric: str, value: float, ts: int = TS, quality: int = 0, seq: int = 0, device: str = "dev1"
) -> dict[str, Any]:
    return {
        "device": device,
        "metric": metric,
        "ts_us": ts,
        "value": value,
        "quality": quality,
        "seq": seq,
    }


VALID: list[tuple[str, bytes, list[dict[str, Any]]]] = [
    (
        "shape 1",
        b'{"metric": "temp_c", "value": 21.5, "ts": 1764072000.123456, "seq": 17, "quality": 0}',
        [row("temp_c", 21.5, seq=17)],
    ),
    (
        "shape 2",
        b'{"ts": 1764072000.5, "seq": 18, "values": {"temp_c": 21.5, "rh": 40.1}}',
        [
            row("temp_c", 21.5, 1_764_072_000_500_000, seq=18),
            row("rh", 40.1, 1_764_072_000_500_000, seq=18),
        ],
    ),
    (
        "shape 3 mixed",
        b'[{"metric":"a","value":1},{"values":{"b":true,"c":false}, "quality": 2}]',
        [row("a", 1.0, RECV_US), row("b", 1.0, RECV_US, 2), row("c", 0.0, RECV_US, 2)],
    ),
    ("empty array", b" [ ] ", []),
    ("empty values", b'{"values": {}}', []),
    (
        "whitespace, key order, unknown keys of any kind",
        b'\r\n\t{ "x" : [1, {"y": null, "z": [true, "s\\"]"]}] ,"quality":1,"value":-0.0,\n"metric":"m",'
        b'"unit": "\xc2\xb0C", "ts": 1764072000123456e-6 }  ',
        [row("m", -0.0, quality=1)],
    ),
    (
        "escaped keys and names",
        b'{"m\\u0065tric": "t\\u00e9mp\\/\\n", "\\u0076alue": 1E2, "device": "d\\u0065v1", "ts": "2025-11-25T12:00:00Z"}',
        [row("t\u00e9mp/\n", 100.0, 1_764_072_000_000_000)],
    ),
    (
        "astral escapes",
        b'{"metric": "\\ud83d\\ude00 \xf0\x9f\x98\x80", "value": 5}',
        [row("\U0001f600 \U0001f600", 5.0, RECV_US)],
    ),
    (
        "integer forms",
        b'{"metric": "a", "value": 12345678901234567890123, "seq": 18446744073709551615, "quality": -0, "ts": 0}',
        [row("a", 1.2345678901234568e22, 0, seq=18446744073709551615)],
    ),
    (
        "tiny and huge exponents",
        b'{"metric":"a","value":1e-400,"ts":0e999999999999999999999}',
        [row("a", 0.0, 0)],
    ),
]


@pytest.mark.parametrize(("payload", "want"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid(impl: str, payload: bytes, want: list[dict[str, Any]]) -> None:
    got = decode(impl, payload)
    assert got == want
    for g, w in zip(got, want, strict=True):  # -0.0 == 0.0, so check the sign too
        assert math.copysign(1, g["value"]) == math.copysign(1, w["value"])


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("1764072000.123456", 1_764_072_000_123_456),
        ("1764072000", 1_764_072_000_000_000),
        ("1.764072000123456e9", 1_764_072_000_123_456),
        ("1764072000123456E-6", 1_764_072_000_123_456),
        ("1764072000.1234565", 1_764_072_000_123_456),  # half to even: down
        ("1764072000.1234575", 1_764_072_000_123_458),  # half to even: up
        ("1764072000.12345650000000000000000001", 1_764_072_000_123_457),
        ("-1.5", -1_500_000),
        ("-0.0000005", 0),
        ("-0.0000015", -2_000_000 // 1_000_000 * 1),  # -1.5 µs -> -2 µs
        ("9223372036854.775807", (1 << 63) - 1),
        ("-9223372036854.775808", -(1 << 63)),
        ("0.000001", 1),
        ("1e-7", 0),
    ],
)
def test_ts_seconds_are_exact(impl: str, text: str, us: int) -> None:
    rows = decode(impl, b'{"metric":"a","value":1,"ts":' + text.encode() + b"}")
    assert rows[0]["ts_us"] == us


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("2025-11-25T12:00:00Z", 1_764_072_000_000_000),
        ("2025-11-25t12:00:00.123456z", 1_764_072_000_123_456),
        ("2025-11-25 13:30:00.1234565+01:30", 1_764_072_000_123_456),
        ("2025-11-25T11:00:00.9999995-01:00", 1_764_072_001_000_000),
        ("2024-02-29T00:00:00Z", 1_709_164_800_000_000),
        ("1969-12-31T23:59:59.5Z", -500_000),
        ("2016-12-31T23:59:60Z", 1_483_228_800_000_000),
        ("0000-01-01T00:00:00Z", -62_167_219_200_000_000),
        ("9999-12-31T23:59:59.999999-00:00", 253_402_300_799_999_999),
    ],
)
def test_ts_rfc3339(impl: str, text: str, us: int) -> None:
    rows = decode(impl, b'{"metric":"a","value":1,"ts":"' + text.encode() + b'"}')
    assert rows[0]["ts_us"] == us


INVALID: list[tuple[str, bytes, type[errors.DecodeError]]] = [
    ("empty", b"", errors.SyntaxError_),
    ("blank", b" \n", errors.SyntaxError_),
    ("truncated", b'{"metric": "a", "value": 1', errors.SyntaxError_),
    ("trailing data", b'{"metric": "a", "value": 1} x', errors.SyntaxError_),
    ("two documents", b"{}{}", errors.SyntaxError_),
    ("NaN literal", b'{"metric": "a", "value": NaN}', errors.SyntaxError_),
    ("Infinity literal", b'{"metric": "a", "value": -Infinity}', errors.SyntaxError_),
    ("leading zero", b'{"metric": "a", "value": 01}', errors.SyntaxError_),
    ("plus sign", b'{"metric": "a", "value": +1}', errors.SyntaxError_),
    ("bare fraction", b'{"metric": "a", "value": .5}', errors.SyntaxError_),
    ("trailing dot", b'{"metric": "a", "value": 1.}', errors.SyntaxError_),
    ("single quotes", b"{'metric': 'a', 'value': 1}", errors.SyntaxError_),
    ("trailing comma", b'{"metric": "a", "value": 1,}', errors.SyntaxError_),
    ("control char in string", b'{"metric": "a\tb", "value": 1}', errors.SyntaxError_),
    ("bad escape", b'{"metric": "a\\x", "value": 1}', errors.SyntaxError_),
    ("lone high surrogate", b'{"metric": "\\ud800", "value": 1}', errors.SyntaxError_),
    (
        "lone low surrogate in unknown key",
        b'{"\\udc00": 1, "metric": "a", "value": 1}',
        errors.SyntaxError_,
    ),
    ("invalid UTF-8", b'{"metric": "\xff", "value": 1}', errors.SyntaxError_),
    ("overlong UTF-8", b'{"metric": "\xc0\xaf", "value": 1}', errors.SyntaxError_),
    ("UTF-8 surrogate", b'{"metric": "\xed\xa0\x80", "value": 1}', errors.SyntaxError_),
    ("BOM", b'\xef\xbb\xbf{"metric": "a", "value": 1}', errors.SyntaxError_),
    (
        "too deep",
        b'{"metric": "a", "value": 1, "x": ' + b"[" * 64 + b"]" * 64 + b"}",
        errors.SyntaxError_,
    ),
    ("syntax beats content", b'{"metric": null, "value": 1', errors.SyntaxError_),
    ("scalar", b"17", errors.InvalidValue),
    ("string", b'"x"', errors.InvalidValue),
    ("array of scalars", b"[1, 2]", errors.InvalidValue),
    ("nested array", b'[[{"metric": "a", "value": 1}]]', errors.InvalidValue),
    ("value null", b'{"metric": "a", "value": null}', errors.InvalidValue),
    ("value string", b'{"metric": "a", "value": "1"}', errors.InvalidValue),
    ("value object", b'{"metric": "a", "value": {}}', errors.InvalidValue),
    ("value overflow", b'{"metric": "a", "value": 1e309}', errors.InvalidValue),
    ("metric missing", b'{"value": 1}', errors.InvalidValue),
    ("value missing", b'{"metric": "a"}', errors.InvalidValue),
    ("empty object", b"{}", errors.InvalidValue),
    ("metric not a string", b'{"metric": 1, "value": 1}', errors.InvalidValue),
    ("metric empty", b'{"metric": "", "value": 1}', errors.InvalidValue),
    ("both shapes", b'{"metric": "a", "values": {"b": 1}}', errors.InvalidValue),
    ("values not an object", b'{"values": [1]}', errors.InvalidValue),
    ("values entry null", b'{"values": {"a": 1, "b": null}}', errors.InvalidValue),
    ("values empty name", b'{"values": {"": 1}}', errors.InvalidValue),
    ("values duplicate", b'{"values": {"a": 1, "\\u0061": 2}}', errors.InvalidValue),
    ("duplicate key", b'{"metric": "a", "value": 1, "value": 2}', errors.InvalidValue),
    ("seq negative", b'{"metric": "a", "value": 1, "seq": -1}', errors.InvalidValue),
    ("seq fraction", b'{"metric": "a", "value": 1, "seq": 1.0}', errors.InvalidValue),
    ("seq exponent", b'{"metric": "a", "value": 1, "seq": 1e2}', errors.InvalidValue),
    (
        "seq too big",
        b'{"metric": "a", "value": 1, "seq": 18446744073709551616}',
        errors.InvalidValue,
    ),
    ("seq bool", b'{"metric": "a", "value": 1, "seq": true}', errors.InvalidValue),
    ("seq string", b'{"metric": "a", "value": 1, "seq": "1"}', errors.InvalidValue),
    ("quality 3", b'{"metric": "a", "value": 1, "quality": 3}', errors.InvalidValue),
    ("quality null", b'{"metric": "a", "value": 1, "quality": null}', errors.InvalidValue),
    ("ts null", b'{"metric": "a", "value": 1, "ts": null}', errors.InvalidValue),
    ("ts bool", b'{"metric": "a", "value": 1, "ts": true}', errors.InvalidValue),
    ("ts too big", b'{"metric": "a", "value": 1, "ts": 9223372036854.775808}', errors.InvalidValue),
    ("ts exponent too big", b'{"metric": "a", "value": 1, "ts": 1e99999}', errors.InvalidValue),
    ("ts not a date", b'{"metric": "a", "value": 1, "ts": "yesterday"}', errors.InvalidValue),
    (
        "ts Feb 30",
        b'{"metric": "a", "value": 1, "ts": "2025-02-30T00:00:00Z"}',
        errors.InvalidValue,
    ),
    (
        "ts no zone",
        b'{"metric": "a", "value": 1, "ts": "2025-02-03T00:00:00"}',
        errors.InvalidValue,
    ),
    (
        "ts hour 24",
        b'{"metric": "a", "value": 1, "ts": "2025-02-03T24:00:00Z"}',
        errors.InvalidValue,
    ),
    (
        "ts offset 24h",
        b'{"metric": "a", "value": 1, "ts": "2025-02-03T00:00:00+24:00"}',
        errors.InvalidValue,
    ),
    (
        "ts empty fraction",
        b'{"metric": "a", "value": 1, "ts": "2025-02-03T00:00:00.Z"}',
        errors.InvalidValue,
    ),
    ("device mismatch", b'{"metric": "a", "value": 1, "device": "dev2"}', errors.DeviceMismatch),
    ("device not a string", b'{"metric": "a", "value": 1, "device": 7}', errors.InvalidValue),
    (
        "first content error wins",
        b'{"device": "dev2", "value": null, "metric": "a"}',
        errors.DeviceMismatch,
    ),
    (
        "error in a later element",
        b'[{"metric": "a", "value": 1}, {"metric": "b"}]',
        errors.InvalidValue,
    ),
]


@pytest.mark.parametrize(("payload", "cls"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid(impl: str, payload: bytes, cls: type[errors.DecodeError]) -> None:
    dec_cls, batch_cls = classes(impl)
    b = batch_cls(4)
    b.append("keep", "me", 1, 2.0, 0, 3, 4)
    before = (b.rows(), list(b.devices), list(b.metrics))
    with pytest.raises(errors.DecodeError) as ei:
        dec_cls().decode("dev1", payload, RECV_NS, b)
    assert type(ei.value) is cls, ei.value
    assert (b.rows(), list(b.devices), list(b.metrics)) == before


def test_device_from_payload_without_topic(impl: str) -> None:
    rows = decode(
        impl,
        b'[{"device": "a", "metric": "x", "value": 1}, {"device": "b", "values": {"y": 2}}]',
        None,
    )
    assert [(r["device"], r["metric"]) for r in rows] == [("a", "x"), ("b", "y")]
    with pytest.raises(errors.InvalidValue):
        decode(impl, b'{"metric": "x", "value": 1}', None)


def test_syntax_error_names_offset(impl: str) -> None:
    with pytest.raises(errors.SyntaxError_) as ei:
        decode(impl, b'{"metric": "a", "value": 1,}')
    assert ei.value.offset == 27 and "offset 27" in str(ei.value)


@pytest.mark.parametrize(
    "impl",
    [
        pytest.param(
            "python",
            marks=pytest.mark.xfail(strict=True, reason="the twin gives a value of the wrong type no offset (-1)"),
        ),
        "cython",
    ],
)
def test_invalid_value_names_offset(impl: str) -> None:
    with pytest.raises(errors.InvalidValue) as ei:
        decode(impl, b'{"metric": "a", "value": null}')
    assert ei.value.offset == 25


def test_batch_accumulates_and_names_are_reused(impl: str) -> None:
    dec_cls, batch_cls = classes(impl)
    d, b = dec_cls(), batch_cls(4)
    for _ in range(3):
        d.decode("dev1", b'{"values": {"a": 1, "b": 2}}', RECV_NS, b)
        d.decode("dev2", b'{"metric": "a", "value": 3}', RECV_NS, b)
    assert len(b) == 9 and b.devices == ["dev1", "dev2"] and b.metrics == ["a", "b"]
    b.clear()
    d.decode("dev2", b'{"metric": "b", "value": 3}', RECV_NS, b)
    assert b.column("device") == ["dev2"] and b.column("metric") == ["b"]


def test_name_cache_is_bounded_and_correct(impl: str) -> None:
    dec_cls, batch_cls = classes(impl)
    d, b = dec_cls(), batch_cls(16)
    for i in range(5000):  # more distinct names than the cache holds
        d.decode(None, b'{"device": "d%d", "metric": "m%d", "value": 1}' % (i % 7, i), RECV_NS, b)
    assert b.column("metric") == [f"m{i}" for i in range(5000)]
    assert b.column("device") == [f"d{i % 7}" for i in range(5000)]


# ---------------------------------------------------------------- properties

names = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)
finite = st.floats(allow_nan=False, allow_infinity=False)
us_values = st.integers(-(10**17), 10**17)


def ts_text(us: int, form: int) -> RawNumber:
    sign = "-" if us < 0 else ""
    a = abs(us)
    if form == 0:
        return RawNumber(f"{sign}{a // 10**6}.{a % 10**6:06d}")
    if form == 1:
        return RawNumber(f"{sign}{a}e-6")
    return RawNumber(f"{sign}{a * 10}E-7")


reading_obj = st.fixed_dictionaries(
    {"metric": names, "value": st.one_of(finite, st.booleans(), st.integers(-(2**70), 2**70))},
    optional={
        "ts": st.tuples(us_values, st.integers(0, 2)),
        "seq": st.integers(0, 2**64 - 1),
        "quality": st.integers(0, 2),
        "device": st.just("dev1"),
        "extra": st.recursive(st.none() | st.booleans() | names, lambda c: st.lists(c, max_size=3)),
    },
)
values_obj = st.fixed_dictionaries(
    {"values": st.dictionaries(names, st.one_of(finite, st.booleans()), max_size=5)},
    optional={"ts": st.tuples(us_values, st.integers(0, 2)), "seq": st.integers(0, 2**64 - 1)},
)


def expected(obj: dict[str, Any]) -> list[dict[str, Any]]:
    ts = obj["ts"][0] if "ts" in obj else RECV_US
    common = {"ts": ts, "seq": obj.get("seq", 0), "quality": obj.get("quality", 0)}
    pairs = obj["values"].items() if "values" in obj else [(obj["metric"], obj["value"])]
    return [row(m, float(v), **common) for m, v in pairs]


def to_doc(obj: dict[str, Any]) -> dict[str, Any]:
    out = dict(obj)
    if "ts" in out:
        out["ts"] = ts_text(*out["ts"])
    return out


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=150, deadline=None)
@given(
    objs=st.lists(st.one_of(reading_obj, values_obj), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
    top=st.booleans(),
)
def test_property_valid_payloads_round_trip(
    impl: str, objs: list[dict[str, Any]], seed: int, top: bool
) -> None:
    rng = random.Random(seed)
    doc: Any = to_doc(objs[0]) if top else [to_doc(o) for o in objs]
    payload = encode_json(doc, rng)
    want = expected(objs[0]) if top else [r for o in objs for r in expected(o)]
    for r in want:
        r["value"] = struct.pack("<d", r["value"])
    got = outcome(impl, payload)
    assert got == outcome("python", payload), payload
    # the encoder shuffles keys, so "values" entries come in any order
    assert got[0] == "ok" and sorted(got[1], key=repr) == sorted(want, key=repr), payload


json_any = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.sampled_from(
        [
            "metric",
            "value",
            "values",
            "ts",
            "seq",
            "quality",
            "device",
            "dev1",
            "2025-11-25T12:00:00Z",
        ]
    ),
    lambda c: (
        st.lists(c, max_size=4)
        | st.dictionaries(
            st.sampled_from(["metric", "value", "values", "ts", "seq", "quality", "device", "x"]),
            c,
            max_size=5,
        )
    ),
    max_leaves=12,
)


# For "python" these check the twin alone: any input decodes or is a DecodeError, nothing else.
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=300, deadline=None)
@given(doc=json_any)
def test_property_arbitrary_json_same_outcome(impl: str, doc: Any) -> None:
    payload = json.dumps(doc).encode()
    assert outcome(impl, payload) == outcome("python", payload), payload


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    edits=st.lists(
        st.tuples(
            st.integers(0, 200), st.sampled_from(list(b' {}[]",:-.0123456789eEtfnu\\\x00\xc3\xff'))
        ),
        max_size=3,
    ),
)
def test_property_mutations_same_outcome(impl: str, seed: int, edits: list[tuple[int, int]]) -> None:
    rng = random.Random(seed)
    doc = [
        {"metric": "a", "value": rng.random(), "ts": RawNumber("1764072000.5"), "quality": 1},
        {"values": {"b": 1, "c": True}, "seq": 5, "ts": "2025-11-25T12:00:00Z"},
    ]
    data = bytearray(encode_json(doc, rng))
    for pos, byte in edits:
        pos %= len(data) + 1
        if rng.random() < 0.5 and pos < len(data):
            data[pos] = byte
        else:
            data[pos:pos] = bytes([byte])
    assert outcome(impl, bytes(data)) == outcome("python", bytes(data)), bytes(data)


def test_json_string_encoder_escapes_round_trip() -> None:
    rng = random.Random(1)
    s = 'a"\\/\x00\x1f\u00e9\U0001f600'
    assert json.loads(json_string(s, rng)) == s
