"""Sparkplug B payloads: the Cython decoder and its twin against payloads made by
the protobuf runtime from the official schema, and against each other."""

from __future__ import annotations

import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.encoders import pb_key, uvarint
from sparkplug_schema import load_schema
from twins import IMPLEMENTATIONS, pair

from sensorhub.decoders import batch_py, sparkplug_py
from sensorhub.errors import DecodeError, InvalidValue, Truncated, UnknownAlias

RECV_NS = 1_764_072_000_123_456_789
RECV_US = RECV_NS // 1000
TS = 1_764_072_000_500


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return load_schema(tmp_path_factory.mktemp("pb"))


_PB: ModuleType | None = None


def pb_module() -> ModuleType:
    """The generated module for hypothesis tests (which cannot take function fixtures)."""
    global _PB
    if _PB is None:
        import tempfile

        _PB = load_schema(Path(tempfile.mkdtemp(prefix="sparkplug-pb-")))
    return _PB


TWIN = "sensorhub.decoders.sparkplug_py"


def _both() -> list[tuple[Any, Any]]:
    return [pair(impl, TWIN, "sparkplug") for impl in IMPLEMENTATIONS]


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return pair(request.param, TWIN, "sparkplug")


def rows_of(batch: Any) -> list[tuple[Any, ...]]:
    return [
        (r["device"], r["metric"], r["ts_us"], r["value"], r["quality"], r["seq"])
        for r in batch.rows()
    ]


def decode(
    impl: tuple[Any, Any],
    payload: bytes,
    aliases: dict[int, tuple[str, int]] | None = None,
    types: dict[str, int] | None = None,
) -> list[tuple[Any, ...]]:
    mod, bmod = impl
    batch = bmod.ReadingBatch()
    d = mod.Decoder()
    if aliases is None and types is None:
        n = d.decode("g/n", payload, RECV_NS, batch)
    else:
        n = d.decode_with("g/n", payload, RECV_NS, batch, aliases, types)
    assert n == len(batch)
    return rows_of(batch)


def payload(pb: ModuleType, *metrics: dict[str, Any], **fields: Any) -> bytes:
    p = pb.Payload(**fields)
    for m in metrics:
        p.metrics.add(**m)
    return p.SerializeToString()  # type: ignore[no-any-return]


# ---------------------------------------------------------------- datatypes

DT = {name: i for i, name in enumerate(sparkplug_py.DATATYPE_NAMES)}

# (datatype, value field, wire value, stored value)
VALUES = [
    ("Int8", "int_value", 127, 127.0),
    ("Int8", "int_value", 255, -1.0),  # N-bit two's complement
    ("Int8", "int_value", 0xFFFFFF80, -128.0),  # sign-extended to 32 bits
    ("Int16", "int_value", 0x8000, -32768.0),
    ("Int16", "int_value", 0xFFFF8000, -32768.0),
    ("Int32", "int_value", 0xFFFFFFFF, -1.0),
    ("Int32", "int_value", 2**31 - 1, 2147483647.0),
    ("Int64", "long_value", 2**64 - 1, -1.0),
    ("Int64", "long_value", 2**63, float(-(2**63))),
    ("Int64", "int_value", 0xFFFFFFFF, 4294967295.0),
    ("Int8", "long_value", 2**64 - 1, -1.0),
    ("UInt8", "int_value", 255, 255.0),
    ("UInt16", "int_value", 65535, 65535.0),
    ("UInt32", "int_value", 2**32 - 1, 4294967295.0),
    ("UInt32", "long_value", 2**32 - 1, 4294967295.0),
    ("UInt64", "long_value", 2**64 - 1, float(2**64 - 1)),
    ("DateTime", "long_value", TS, float(TS)),
    ("Float", "float_value", 1.5, 1.5),
    ("Float", "float_value", 0.1, struct.unpack("<f", struct.pack("<f", 0.1))[0]),
    ("Double", "double_value", -2.25e300, -2.25e300),
    ("Double", "float_value", 0.5, 0.5),
    ("Boolean", "boolean_value", True, 1.0),
    ("Boolean", "boolean_value", False, 0.0),
]


@pytest.mark.parametrize(("dtype", "fld", "wire", "want"), VALUES)
def test_numeric_datatypes(
    impl: tuple[Any, Any], pb: ModuleType, dtype: str, fld: str, wire: Any, want: float
) -> None:
    raw = payload(pb, {"name": "m", "datatype": DT[dtype], fld: wire}, timestamp=TS, seq=7)
    assert decode(impl, raw) == [("g/n", "m", TS * 1000, want, 0, TS * 256 + 7)]


@pytest.mark.parametrize(
    ("dtype", "fld", "wire"),
    [
        ("Int8", "int_value", 256),
        ("Int8", "int_value", 0xFFFFFF7F),
        ("Int16", "long_value", 2**32 - 1),
        ("UInt8", "int_value", 256),
        ("UInt16", "long_value", 65536),
        ("UInt32", "long_value", 2**32),
    ],
)
def test_integers_out_of_range(
    impl: tuple[Any, Any], pb: ModuleType, dtype: str, fld: str, wire: int
) -> None:
    raw = payload(pb, {"name": "m", "datatype": DT[dtype], fld: wire})
    with pytest.raises(InvalidValue, match=f"out of range for {dtype}"):
        decode(impl, raw)


@pytest.mark.parametrize(
    ("dtype", "fld", "wire"),
    [
        ("Int32", "double_value", 1.0),
        ("Double", "int_value", 1),
        ("Boolean", "int_value", 1),
        ("Float", "boolean_value", True),
    ],
)
def test_value_field_must_fit_datatype(
    impl: tuple[Any, Any], pb: ModuleType, dtype: str, fld: str, wire: Any
) -> None:
    with pytest.raises(InvalidValue, match="carries value field"):
        decode(impl, payload(pb, {"name": "m", "datatype": DT[dtype], fld: wire}))


def test_non_numeric_and_null_metrics_are_counted_not_stored(
    impl: tuple[Any, Any], pb: ModuleType
) -> None:
    mod, bmod = impl
    p = pb.Payload(timestamp=TS, seq=1)
    p.metrics.add(name="s", datatype=DT["String"], string_value="hello")
    p.metrics.add(name="t", datatype=DT["Text"], string_value="long")
    p.metrics.add(name="u", datatype=DT["UUID"], string_value="0-0")
    p.metrics.add(name="b", datatype=DT["Bytes"], bytes_value=b"\x00\x01")
    p.metrics.add(name="f", datatype=DT["File"], bytes_value=b"file")
    ds = p.metrics.add(name="ds", datatype=DT["DataSet"]).dataset_value
    ds.num_of_columns = 1
    ds.columns.append("c")
    ds.types.append(DT["Int32"])
    ds.rows.add().elements.add(int_value=5)
    tpl = p.metrics.add(name="tpl", datatype=DT["Template"]).template_value
    tpl.version = "1"
    tpl.metrics.add(name="inner", datatype=DT["Int32"], int_value=3)
    p.metrics.add(name="arr", datatype=DT["Int32Array"], bytes_value=b"\x01\x00\x00\x00")
    p.metrics.add(name="nothing", datatype=DT["Int32"])  # declared without a value
    p.metrics.add(name="n1", datatype=DT["Int32"], is_null=True)
    p.metrics.add(alias=99, is_null=True)  # null needs no name
    p.metrics.add(name="x", datatype=DT["Double"], double_value=1.0)
    d = mod.Decoder()
    batch = bmod.ReadingBatch()
    assert d.decode("g/n", p.SerializeToString(), RECV_NS, batch) == 1
    assert rows_of(batch) == [("g/n", "x", TS * 1000, 1.0, 0, TS * 256 + 1)]
    assert (d.metrics_skipped, d.nulls_skipped) == (9, 2)


def test_without_datatype_the_value_field_decides(impl: tuple[Any, Any], pb: ModuleType) -> None:
    raw = payload(
        pb,
        {"name": "i", "int_value": 0xFFFFFFFF},
        {"name": "l", "long_value": 2**64 - 1},
        {"name": "f", "float_value": 2.5},
        {"name": "d", "double_value": 3.5},
        {"name": "b", "boolean_value": True},
        {"name": "s", "string_value": "x"},
    )
    assert [(r[1], r[3]) for r in decode(impl, raw)] == [
        ("i", 4294967295.0),
        ("l", float(2**64 - 1)),
        ("f", 2.5),
        ("d", 3.5),
        ("b", 1.0),
    ]


def test_timestamps_fall_back_metric_payload_receive(impl: tuple[Any, Any], pb: ModuleType) -> None:
    m = [
        {"name": "a", "datatype": DT["Int32"], "int_value": 1, "timestamp": TS - 5},
        {"name": "b", "datatype": DT["Int32"], "int_value": 2},
    ]
    with_ts = decode(impl, payload(pb, *m, timestamp=TS, seq=3))
    assert [(r[2], r[5]) for r in with_ts] == [
        ((TS - 5) * 1000, TS * 256 + 3),
        (TS * 1000, TS * 256 + 3),
    ]
    without = decode(impl, payload(pb, *m))
    assert [(r[2], r[5]) for r in without] == [((TS - 5) * 1000, 0), (RECV_US, 0)]


def test_historical_and_transient_metrics_are_stored(impl: tuple[Any, Any], pb: ModuleType) -> None:
    raw = payload(
        pb,
        {
            "name": "h",
            "datatype": DT["Double"],
            "double_value": 1.0,
            "is_historical": True,
            "timestamp": 1000,
        },
        {"name": "t", "datatype": DT["Double"], "double_value": 2.0, "is_transient": True},
        timestamp=TS,
    )
    assert [(r[1], r[2]) for r in decode(impl, raw)] == [("h", 1_000_000), ("t", TS * 1000)]


def test_alias_only_metric_needs_state(impl: tuple[Any, Any], pb: ModuleType) -> None:
    raw = payload(pb, {"alias": 7, "int_value": 1}, timestamp=TS, seq=0)
    with pytest.raises(UnknownAlias, match="alias 7"):
        decode(impl, raw)
    rows = decode(impl, raw, aliases={7: ("Temp", DT["Int8"])}, types={})
    assert rows == [("g/n", "Temp", TS * 1000, 1.0, 0, TS * 256)]
    with pytest.raises(UnknownAlias, match="alias 7"):
        decode(impl, raw, aliases={8: ("Other", DT["Int8"])}, types={})


def test_birth_datatype_applies_to_named_data(impl: tuple[Any, Any], pb: ModuleType) -> None:
    raw = payload(pb, {"name": "t", "int_value": 0xFFFFFFFE})
    assert decode(impl, raw)[0][3] == 4294967294.0
    assert decode(impl, raw, aliases={}, types={"t": DT["Int16"]})[0][3] == -2.0


def test_metric_without_name_or_alias(impl: tuple[Any, Any], pb: ModuleType) -> None:
    with pytest.raises(InvalidValue, match="neither name nor alias"):
        decode(impl, payload(pb, {"int_value": 1}))


def test_payload_seq_and_timestamp_ranges(impl: tuple[Any, Any], pb: ModuleType) -> None:
    assert decode(impl, payload(pb, seq=255)) == []
    with pytest.raises(InvalidValue, match=r"seq 256 outside 0\.\.255"):
        decode(impl, payload(pb, seq=256))
    with pytest.raises(InvalidValue, match="payload timestamp out of range"):
        decode(impl, payload(pb, timestamp=2**63))
    with pytest.raises(InvalidValue, match="metric timestamp out of range"):
        decode(impl, payload(pb, {"name": "a", "int_value": 1, "timestamp": 2**64 - 1}))


def test_header(impl: tuple[Any, Any], pb: ModuleType) -> None:
    mod, _ = impl
    assert mod.Decoder().header(payload(pb, {"name": "a"}, timestamp=TS, seq=9)) == (TS, 9)
    assert mod.Decoder().header(b"") == (None, None)
    with pytest.raises(Truncated):
        mod.Decoder().header(b"\x08")


def test_no_device_is_invalid(impl: tuple[Any, Any]) -> None:
    mod, bmod = impl
    with pytest.raises(InvalidValue, match="no device"):
        mod.Decoder().decode(None, b"", RECV_NS, bmod.ReadingBatch())


def _unknowns(fno: int) -> bytes:
    """One unknown field of each wire type, group included (a nested group inside)."""
    key = pb_key
    return (
        key(fno, 0) + uvarint(2**64 - 1)
        + key(fno + 1, 1) + b"\x01" * 8
        + key(fno + 2, 2) + b"\x03abc"
        + key(fno + 3, 5) + b"\x02" * 4
        + key(fno + 4, 3) + key(1, 0) + b"\x05" + key(2, 3) + key(2, 4) + key(fno + 4, 4)
        + key(2**29 - 1, 0) + b"\x00"
    )  # fmt: skip


def test_unknown_fields_are_skipped(impl: tuple[Any, Any], pb: ModuleType) -> None:
    metric = pb.Payload.Metric(name="a", datatype=DT["Int32"], int_value=5, timestamp=TS)
    metric.metadata.content_type = "text/plain"
    metric.properties.keys.append("engUnit")
    metric.properties.values.add(type=DT["String"], string_value="C")
    m_raw = metric.SerializeToString() + _unknowns(40)
    # known fields with another wire type are unknown fields too (field 3 as LEN, 12 as varint)
    m_raw += b"\x1a\x01x" + uvarint(12 << 3) + b"\x07"
    raw = (
        _unknowns(100) + b"\x08" + uvarint(TS) + b"\x12" + uvarint(len(m_raw)) + m_raw
        + b"\x22\x04uuid" + b"\x2a\x02\x00\x01" + b"\x19" + b"\x00" * 8
    )  # fmt: skip
    parsed = pb.Payload.FromString(raw)  # the protobuf runtime agrees it is a valid payload
    assert parsed.metrics[0].int_value == 5
    assert decode(impl, raw) == [("g/n", "a", TS * 1000, 5.0, 0, TS * 256)]


@pytest.mark.parametrize(
    ("raw", "cls", "words"),
    [
        (b"\x08", Truncated, "varint"),
        (b"\x08\x80", Truncated, "varint"),
        (b"\x12\x05ab", Truncated, "length-delimited"),
        (b"\x09\x00", Truncated, "64-bit"),
        (b"\x0d\x00", Truncated, "32-bit"),
        (b"\x00", InvalidValue, "field number 0"),
        (b"\x0e", InvalidValue, "wire type 6"),
        (b"\x0f", InvalidValue, "wire type 7"),
        (b"\x0c", InvalidValue, "end of group without its start"),
        (b"\x0b\x08\x01", Truncated, "group without its end"),
        (b"\x0b\x14", InvalidValue, "does not match"),
        (b"\x0b" * 40, InvalidValue, "nested too deep"),
        (b"\x08" + b"\xff" * 9 + b"\x02", InvalidValue, "overflows 64 bits"),
        (b"\x12\x02\x0a\x05", Truncated, "length-delimited"),
        (b"\x12\x01\x50", Truncated, "varint"),
        (b"\x12\x02\x65\x00", Truncated, "32-bit"),
        (b"\x12\x02\x69\x00", Truncated, "64-bit"),
        (b"\x12\x03\x0a\x01\xff", InvalidValue, "not valid UTF-8"),
        (b"\x12\x05\x0a\x01a\x20\x23", InvalidValue, "unknown datatype 35"),
    ],
)
def test_bad_payloads(
    impl: tuple[Any, Any], raw: bytes, cls: type[DecodeError], words: str
) -> None:
    with pytest.raises(cls, match=words):
        decode(impl, raw)


def test_every_truncation_of_a_payload(pb: ModuleType) -> None:
    raw = payload(
        pb,
        {
            "name": "temperature",
            "alias": 1,
            "datatype": DT["Double"],
            "double_value": 21.5,
            "timestamp": TS,
        },
        {"name": "count", "alias": 2, "datatype": DT["UInt64"], "long_value": 2**40},
        {"name": "ok", "datatype": DT["Boolean"], "boolean_value": True},
        {"name": "f", "datatype": DT["Float"], "float_value": 1.25},
        timestamp=TS,
        seq=42,
    )
    # cut at the end of a top-level field: a shorter valid payload; anywhere else: truncated
    boundaries, i = {0}, 0
    while i < len(raw):
        t0 = i
        fno, wt, i = sparkplug_py._tag(raw, i, len(raw))
        i = sparkplug_py._skip(raw, i, len(raw), fno, wt, t0)
        boundaries.add(i)
    assert len(boundaries) == 7
    for cut in range(len(raw) + 1):
        outcomes = {_outcome(m, b, raw[:cut]) for m, b in _both()}
        assert len(outcomes) == 1, (cut, outcomes)
        (o,) = outcomes
        if cut in boundaries:
            assert isinstance(o[0], int), cut
        else:
            assert o[0] is Truncated, (cut, o)


# Decoders that live across examples, so that their name caches carry state
# from one payload to the next as in a long-running ingest process.
_LIVE: dict[str, Any] = {}


def _outcome(
    mod: Any,
    bmod: Any,
    raw: bytes,
    aliases: dict[int, tuple[str, int]] | None = None,
    live: bool = False,
) -> Any:
    d = _LIVE.setdefault(mod.__name__, mod.Decoder()) if live else mod.Decoder()
    counts0 = (d.metrics_skipped, d.nulls_skipped)
    batch = bmod.ReadingBatch()
    batch.append("pre", "pre.m", 1, 1.0, 0, 0, 1)
    try:
        n = d.decode_with("g/n", raw, RECV_NS, batch, aliases, {} if aliases is not None else None)
    except DecodeError as exc:
        assert len(batch) == 1 and batch.devices == ["pre"] and batch.metrics == ["pre.m"]
        assert (d.metrics_skipped, d.nulls_skipped) == counts0
        return (type(exc), str(exc))
    # values compare by their bits (NaN, -0.0)
    rows = tuple(
        tuple(struct.pack("<d", v) if isinstance(v, float) else v for v in r)
        for r in rows_of(batch)
    )
    return (n, d.metrics_skipped - counts0[0], d.nulls_skipped - counts0[1], rows)


# ---------------------------------------------------------------- independent encoder (the protobuf runtime)

_INT_RANGES = {
    "Int8": (-(2**7), 2**7 - 1, True), "Int16": (-(2**15), 2**15 - 1, True),
    "Int32": (-(2**31), 2**31 - 1, True), "Int64": (-(2**63), 2**63 - 1, True),
    "UInt8": (0, 2**8 - 1, False), "UInt16": (0, 2**16 - 1, False),
    "UInt32": (0, 2**32 - 1, False), "UInt64": (0, 2**64 - 1, False),
}  # fmt: skip


@st.composite
def _metric(draw: st.DrawFn) -> tuple[dict[str, Any], float | None]:
    """A metric as the protobuf runtime's kwargs and the value it must store (None: none)."""
    kind = draw(st.sampled_from([*_INT_RANGES, "Float", "Double", "Boolean", "String", "null"]))
    m: dict[str, Any] = {"name": draw(st.text(min_size=1, max_size=10))}
    if draw(st.booleans()):
        m["timestamp"] = draw(st.integers(0, 2**43))
    if draw(st.booleans()):
        m["alias"] = draw(st.integers(0, 2**64 - 1))
    if kind == "null":
        m.update(datatype=DT["Int32"], is_null=True)
        return m, None
    m["datatype"] = DT[kind]
    if kind in _INT_RANGES:
        lo, hi, _ = _INT_RANGES[kind]
        v = draw(st.integers(lo, hi))
        wide = kind in ("Int64", "UInt64") or (kind == "UInt32" and draw(st.booleans()))
        if wide:
            m["long_value"] = v % 2**64
        else:
            m["int_value"] = v % 2**32  # the 32-bit two's complement, as Tahu's Java encoder does
        return m, float(v)
    if kind == "Float":
        f = draw(st.floats(width=32, allow_nan=False))
        m["float_value"] = f
        return m, f
    if kind == "Double":
        d = draw(st.floats(allow_nan=False))
        m["double_value"] = d
        return m, d
    if kind == "Boolean":
        b = draw(st.booleans())
        m["boolean_value"] = b
        return m, float(b)
    m["string_value"] = draw(st.text(max_size=5))
    return m, None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    metrics=st.lists(_metric(), max_size=8),
    ts=st.none() | st.integers(0, 2**43),
    seq=st.none() | st.integers(0, 255),
)
def test_round_trip_from_protobuf_runtime(
    metrics: list[tuple[dict[str, Any], float | None]], ts: int | None, seq: int | None
) -> None:
    pbm = pb_module()
    fields = {k: v for k, v in (("timestamp", ts), ("seq", seq)) if v is not None}
    raw = payload(pbm, *(m for m, _ in metrics), **fields)
    want = []
    for m, value in metrics:
        if value is None:
            continue
        t = m.get("timestamp", ts)
        want.append(
            (
                "g/n",
                m["name"],
                RECV_US if t is None else t * 1000,
                value,
                0,
                (ts or 0) * 256 + (seq or 0),
            )
        )
    for impl in _both():
        assert decode(impl, raw) == want


# ---------------------------------------------------------------- twin equivalence


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=48),
        st.lists(
            st.sampled_from(
                list(b"\x08\x0a\x12\x18\x20\x50\x58\x65\x69\x70\x0b\x0c\x01\x02\x05\xff\x80")
            ),
            max_size=40,
        ).map(bytes),
        st.tuples(
            st.lists(_metric(), min_size=1, max_size=4),
            st.integers(0, 10**6),
            st.integers(0, 255),
            st.booleans(),
        ),
    ),
    use_aliases=st.booleans(),
)
def test_cython_and_twin_agree(data: Any, use_aliases: bool) -> None:
    if isinstance(data, tuple):
        metrics, pos, byte, insert = data
        raw = payload(pb_module(), *(m for m, _ in metrics), timestamp=TS)
        pos %= len(raw) + 1
        raw = raw[:pos] + bytes([byte]) + raw[pos + (0 if insert else 1) :]
    else:
        raw = data
    aliases = (
        {0: ("zero", DT["Int8"]), 1: ("one", 0), 5: ("five", DT["Double"])} if use_aliases else None
    )
    assert _outcome(*pair("cython", TWIN, "sparkplug"), raw, aliases, live=True) == _outcome(
        sparkplug_py, batch_py, raw, aliases, live=True
    )


def test_make_decoder_serves_sparkplug(pb: ModuleType) -> None:
    from sensorhub.decoders import decode_to_rows

    raw = payload(pb, {"name": "a", "datatype": DT["Int16"], "int_value": 65535}, timestamp=TS)
    rows = decode_to_rows("sparkplug", raw, device="g/n")
    assert [(r["device"], r["metric"], r["ts_us"], r["value"]) for r in rows] == [
        ("g/n", "a", TS * 1000, -1.0)
    ]


def test_golden_vector(impl: tuple[Any, Any]) -> None:
    """A DDATA as bytes: Int16 -2 sign-extended to 32 bits, a Double at its own time, seq 200."""
    raw = bytes.fromhex(
        "08" "80948ad7ab33"  # timestamp 1764072000000
        "12" "0b" "0a0161" "2002" "50feffffff0f"  # metric a: Int16, int_value 0xFFFFFFFE
        "12" "15" "0a0162" "18988c8ad7ab33" "200a" "690000000000803540"  # b: ts 1764071999000, Double 21.5
        "18" "c801"  # seq 200
    )  # fmt: skip
    assert decode(impl, raw) == [
        ("g/n", "a", 1_764_072_000_000_000, -2.0, 0, 1_764_072_000_000 * 256 + 200),
        ("g/n", "b", 1_764_071_999_000_000, 21.5, 0, 1_764_072_000_000 * 256 + 200),
    ]


def test_many_metrics(impl: tuple[Any, Any], pb: ModuleType) -> None:
    n = 5000
    raw = payload(
        pb,
        *({"name": f"m{i}", "datatype": DT["Int32"], "int_value": i} for i in range(n)),
        timestamp=TS,
    )
    rows = decode(impl, raw)
    assert len(rows) == n and rows[-1] == ("g/n", f"m{n - 1}", TS * 1000, float(n - 1), 0, TS * 256)
