"""Influx line protocol: the Cython decoder and its twin against golden vectors,
an independent encoder (hypothesis) and each other (random bytes, mutations)."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twins import IMPLEMENTATIONS, pair

from sensorhub.decoders import batch_py, lineproto_py
from sensorhub.errors import DecodeError, InvalidValue, SyntaxError_

RECV_NS = 1_764_072_000_123_456_789
RECV_US = RECV_NS // 1000

TWIN = "sensorhub.decoders.lineproto_py"


def _cython() -> tuple[Any, Any]:
    return pair("cython", TWIN, "lineproto")


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return pair(request.param, TWIN, "lineproto")


def decode(
    impl: tuple[Any, Any], payload: bytes, device: str | None = "dev1"
) -> list[tuple[Any, ...]]:
    mod, bmod = impl
    batch = bmod.ReadingBatch()
    n = mod.Decoder().decode(device, payload, RECV_NS, batch)
    rows = [
        (r["device"], r["metric"], r["ts_us"], r["value"], r["quality"], r["seq"])
        for r in batch.rows()
    ]
    assert n == len(rows)
    return rows


# ---------------------------------------------------------------- golden vectors


def test_influx_documentation_example(impl: tuple[Any, Any]) -> None:
    rows = decode(
        impl,
        b'myMeasurement,tag1=value1,tag2=value2 fieldKey="fieldValue",x=1.5 1556813561098000000',
    )
    assert rows == [("dev1", "myMeasurement.x", 1556813561098000, 1.5, 0, 0)]


def test_all_value_kinds(impl: tuple[Any, Any]) -> None:
    payload = (
        b"m a=1,b=-2.5,c=1e3,d=-1.5E-2,e=.5,f=5.,g=3i,h=-9223372036854775808i,"
        b"i=18446744073709551615u,j=t,k=T,l=true,m=True,n=TRUE,o=f,p=F,q=false,r=False,s=FALSE 1000"
    )
    rows = decode(impl, payload)
    values = {r[1]: r[3] for r in rows}
    assert values == {
        "m.a": 1.0, "m.b": -2.5, "m.c": 1000.0, "m.d": -0.015, "m.e": 0.5, "m.f": 5.0,
        "m.g": 3.0, "m.h": float(-(2**63)), "m.i": float(2**64 - 1),
        "m.j": 1.0, "m.k": 1.0, "m.l": 1.0, "m.m": 1.0, "m.n": 1.0,
        "m.o": 0.0, "m.p": 0.0, "m.q": 0.0, "m.r": 0.0, "m.s": 0.0,
    }  # fmt: skip
    assert {r[2] for r in rows} == {1}


def test_escapes(impl: tuple[Any, Any]) -> None:
    payload = b'my\\ meas\\,x=y,device=a\\=b\\,c\\ d,t\\=k=v f\\ \\=\\,k=1i,s="q\\"\\\\" 2000'
    assert decode(impl, payload) == [("a=b,c d", "my meas,x=y.f =,k", 2, 1.0, 0, 0)]


def test_backslash_before_other_characters_is_literal(impl: tuple[Any, Any]) -> None:
    assert decode(impl, b"a\\b,device=c\\d e\\f=1")[0][:2] == ("c\\d", "a\\b.e\\f")


def test_lines_comments_crlf_and_blank(impl: tuple[Any, Any]) -> None:
    payload = b"# header\r\n\r\n  m v=1 5000\r\n   # indented comment\nm v=2 6000\n\n   \nm v=3"
    assert decode(impl, payload) == [
        ("dev1", "m.v", 5, 1.0, 0, 0),
        ("dev1", "m.v", 6, 2.0, 0, 0),
        ("dev1", "m.v", RECV_US, 3.0, 0, 0),
    ]


def test_empty_and_comment_only_payloads(impl: tuple[Any, Any]) -> None:
    assert decode(impl, b"") == []
    assert decode(impl, b"\n\n# only\r\n") == []


def test_device_tag_wins_over_topic_and_last_tag_wins(impl: tuple[Any, Any]) -> None:
    rows = decode(impl, b"m,device=a,device=b v=1\nm v=2", device="topic")
    assert [r[0] for r in rows] == ["b", "topic"]


def test_no_device_anywhere_is_invalid(impl: tuple[Any, Any]) -> None:
    with pytest.raises(InvalidValue, match=r"no device.*offset 17"):
        decode(impl, b"m,device=a v=1\n  m v=2", device=None)
    assert decode(impl, b"m,device=x v=1", device=None) == [("x", "m.v", RECV_US, 1.0, 0, 0)]


def test_names_with_nul_bytes_stay_apart(impl: tuple[Any, Any]) -> None:
    """Measurement "a" with field "\\0b" is not measurement "a\\0" with field "b" (found by fuzzing)."""
    mod, bmod = impl
    d = mod.Decoder()
    batch = bmod.ReadingBatch()
    d.decode("t", b"a \x00b=1\na\x00 b=2", RECV_NS, batch)
    d.decode("t", b"a\x00 b=3\na \x00b=4", RECV_NS, batch)
    assert [(r["metric"], r["value"]) for r in batch.rows()] == [
        ("a.\x00b", 1.0),
        ("a\x00.b", 2.0),
        ("a\x00.b", 3.0),
        ("a.\x00b", 4.0),
    ]


def test_leading_zeros(impl: tuple[Any, Any]) -> None:
    rows = decode(
        impl,
        b"m a=000000000000000000000000042i,b=0000000000000000000000007u,c=-00.50 00000000000000000000001337033642",
    )
    assert rows == [
        ("dev1", "m.a", 1337033, 42.0, 0, 0),
        ("dev1", "m.b", 1337033, 7.0, 0, 0),
        ("dev1", "m.c", 1337033, -0.5, 0, 0),
    ]


def test_timestamp_floors_to_microseconds(impl: tuple[Any, Any]) -> None:
    rows = decode(
        impl,
        b"m v=1 1999\nm v=1 -1\nm v=1 -1000\nm v=1 -9223372036854775808\nm v=1 9223372036854775807",
    )
    assert [r[2] for r in rows] == [1, -1, -1, -9223372036854776, 9223372036854775]


def test_string_fields_are_counted_not_stored(impl: tuple[Any, Any]) -> None:
    mod, bmod = impl
    d = mod.Decoder()
    batch = bmod.ReadingBatch()
    assert d.decode("d", b'm s="a, b=c",v=1,t="" 1000\nm only="x"', RECV_NS, batch) == 1
    assert d.strings_skipped == 3
    # a payload that fails leaves the counter as it was
    with pytest.raises(SyntaxError_):
        d.decode("d", b'm s="a"\nm bad', RECV_NS, batch)
    assert d.strings_skipped == 3
    assert len(batch) == 1


def test_failure_leaves_batch_unchanged(impl: tuple[Any, Any]) -> None:
    mod, bmod = impl
    d = mod.Decoder()
    batch = bmod.ReadingBatch()
    d.decode("d", b"m a=1,b=2", RECV_NS, batch)
    before = (batch.rows(), list(batch.devices), list(batch.metrics))
    with pytest.raises(SyntaxError_):
        d.decode("other", b"new,device=z x=1,y=2\nnew2 q=1\nbroken", RECV_NS, batch)
    assert (batch.rows(), list(batch.devices), list(batch.metrics)) == before
    # and the batch keeps working afterwards, with the names interned anew
    d.decode("other", b"new x=3", RECV_NS, batch)
    assert batch.rows()[-1]["metric"] == "new.x"
    assert batch.devices == ["d", "other"]


ERRORS = [
    (b",t=1 v=1", SyntaxError_, "empty measurement", 0),
    (b"m", SyntaxError_, "missing field set", 1),
    (b"m ", SyntaxError_, "missing field set", 2),
    (b"m,t=1", SyntaxError_, "missing field set", 5),
    (b"m,=1 v=1", SyntaxError_, "empty tag key", 2),
    (b"m,t v=1", SyntaxError_, "tag key without '='", 3),
    (b"m,t= v=1", SyntaxError_, "empty tag value", 4),
    (b"m,t=a=b v=1", SyntaxError_, "unescaped '='", 5),
    (b"m =1", SyntaxError_, "empty field key", 2),
    (b"m v", SyntaxError_, "field key without '='", 3),
    (b"m v=", SyntaxError_, "missing field value", 4),
    (b"m v=1,", SyntaxError_, "empty field key", 6),
    (b"m v=,w=1", SyntaxError_, "missing field value", 4),
    (b'm v="abc', SyntaxError_, "unterminated string", 4),
    (b'm v="abc\\"', SyntaxError_, "unterminated string", 4),
    (b'm v="a"x', SyntaxError_, "expected ','", 7),
    (b"m v=1x", SyntaxError_, "bad field value", 4),
    (b"m v=nan", SyntaxError_, "bad field value", 4),
    (b"m v=inf", SyntaxError_, "bad field value", 4),
    (b"m v=+1", SyntaxError_, "bad field value", 4),
    (b"m v=1e", SyntaxError_, "bad field value", 4),
    (b"m v=.", SyntaxError_, "bad field value", 4),
    (b"m v=-", SyntaxError_, "bad field value", 4),
    (b"m v=yes", SyntaxError_, "bad field value", 4),
    (b"m v=1.5i", SyntaxError_, "bad integer", 4),
    (b"m v=i", SyntaxError_, "bad integer", 4),
    (b"m v=-1u", SyntaxError_, "bad unsigned", 4),
    (b"m v=9223372036854775808i", InvalidValue, "int64 range", 4),
    (b"m v=-9223372036854775809i", InvalidValue, "int64 range", 4),
    (b"m v=99999999999999999999999i", InvalidValue, "int64 range", 4),
    (b"m v=18446744073709551616u", InvalidValue, "uint64 range", 4),
    (b"m v=1e400", InvalidValue, "float field out of range", 4),
    (b"m v=1 12a", SyntaxError_, "bad timestamp", 6),
    (b"m v=1 1.5", SyntaxError_, "bad timestamp", 6),
    (b"m v=1 9223372036854775808", InvalidValue, "timestamp out of int64 range", 6),
    (b"m v=1 1 2", SyntaxError_, "trailing characters", 8),
    (b"m v=1\nm v=2\nbad", SyntaxError_, "missing field set", 15),
    (b"m\xff v=1", InvalidValue, "UTF-8", 0),
    (b"m v\xfe=1", InvalidValue, "UTF-8", 2),
    (b"m,device=\xc3 v=1", InvalidValue, "UTF-8", 9),
    (b"m\xff v=1 bad", SyntaxError_, "bad timestamp", 7),  # syntax before names
]


@pytest.mark.parametrize(("payload", "cls", "words", "offset"), ERRORS)
def test_errors_name_rule_and_offset(
    impl: tuple[Any, Any], payload: bytes, cls: type[DecodeError], words: str, offset: int
) -> None:
    with pytest.raises(cls) as info:
        decode(impl, payload)
    assert words in str(info.value)
    assert info.value.offset == offset
    assert type(info.value) is cls


def test_accepts_bytearray_and_memoryview(impl: tuple[Any, Any]) -> None:
    assert decode(impl, bytearray(b"m v=1 1000")) == decode(impl, memoryview(b"m v=1 1000"))  # type: ignore[arg-type]


def test_make_decoder_serves_ilp() -> None:
    from sensorhub.decoders import decode_to_rows

    rows = decode_to_rows("ilp", b"m,device=x v=2i 3000")
    assert [(r["device"], r["metric"], r["ts_us"], r["value"]) for r in rows] == [
        ("x", "m.v", 3, 2.0)
    ]


# ---------------------------------------------------------------- independent encoder


_NAME_CHARS = st.characters(
    codec="utf-8", exclude_characters="\n\r", categories=("L", "N", "P", "S", "Zs")
)
_names = st.text(_NAME_CHARS, min_size=1, max_size=12).filter(lambda s: not s.endswith("\\"))


def _esc(s: str, chars: str) -> str:
    for c in chars:
        s = s.replace(c, "\\" + c)
    return s


_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: ("float", f)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: ("int", i)),
    st.integers(0, 2**64 - 1).map(lambda u: ("uint", u)),
    st.sampled_from(["t", "T", "true", "True", "TRUE", "f", "F", "false", "False", "FALSE"]).map(
        lambda b: ("bool", b)
    ),
    st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=8).map(
        lambda s: ("str", s)
    ),
)

_line = st.fixed_dictionaries(
    {
        "meas": _names.filter(lambda s: not s.startswith("#") and not s.startswith(" ")),
        "tags": st.lists(st.tuples(_names, _names), max_size=3),
        "device": st.none() | _names,
        "fields": st.lists(st.tuples(_names, _values), min_size=1, max_size=5),
        "ts": st.none() | st.integers(-(2**63), 2**63 - 1),
        "crlf": st.booleans(),
    }
)


def _encode_line(line: dict[str, Any]) -> bytes:
    out = _esc(line["meas"], ", ")
    tags = [t for t in line["tags"] if t[0] != "device"]
    if line["device"] is not None:
        tags.append(("device", line["device"]))
    for k, v in tags:
        out += "," + _esc(k, ",= ") + "=" + _esc(v, ",= ")
    fields = []
    for k, (kind, v) in line["fields"]:
        if kind == "float":
            text = repr(v)
        elif kind == "int":
            text = f"{v}i"
        elif kind == "uint":
            text = f"{v}u"
        elif kind == "bool":
            text = v
        else:
            text = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        fields.append(_esc(k, ",= ") + "=" + text)
    out += " " + ",".join(fields)
    if line["ts"] is not None:
        out += f" {line['ts']}"
    return out.encode() + (b"\r\n" if line["crlf"] else b"\n")


def _expected(lines: list[dict[str, Any]], device: str) -> tuple[list[tuple[Any, ...]], int]:
    rows = []
    strings = 0
    for line in lines:
        dev = line["device"] if line["device"] is not None else device
        ts = RECV_US if line["ts"] is None else line["ts"] // 1000
        for k, (kind, v) in line["fields"]:
            if kind == "str":
                strings += 1
                continue
            value = float(v) if kind != "bool" else float(v in ("t", "T", "true", "True", "TRUE"))
            rows.append((dev, f"{line['meas']}.{k}", ts, value, 0, 0))
    return rows, strings


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_line, max_size=6))
def test_round_trip_from_independent_encoder(lines: list[dict[str, Any]]) -> None:
    payload = b"".join(_encode_line(line) for line in lines)
    want_rows, want_strings = _expected(lines, "topicdev")
    for impl in IMPLEMENTATIONS:
        mod, bmod = pair(impl, TWIN, "lineproto")
        d = mod.Decoder()
        batch = bmod.ReadingBatch()
        assert d.decode("topicdev", payload, RECV_NS, batch) == len(want_rows)
        got = [
            (r["device"], r["metric"], r["ts_us"], r["value"], r["quality"], r["seq"])
            for r in batch.rows()
        ]
        assert got == want_rows
        assert d.strings_skipped == want_strings


# ---------------------------------------------------------------- twin equivalence


# Decoders that live across examples, so that their name caches carry state
# from one payload to the next as in a long-running ingest process.
_LIVE: dict[str, Any] = {}


def _outcome(mod: Any, bmod: Any, payload: bytes, device: str | None, live: bool = False) -> Any:
    d = _LIVE.setdefault(mod.__name__, mod.Decoder()) if live else mod.Decoder()
    strings0 = d.strings_skipped
    batch = bmod.ReadingBatch()
    batch.append("pre", "pre.m", 1, 1.0, 0, 0, 1)
    try:
        n = d.decode(device, payload, RECV_NS, batch)
    except DecodeError as exc:
        assert len(batch) == 1 and batch.devices == ["pre"] and batch.metrics == ["pre.m"]
        assert d.strings_skipped == strings0
        return (type(exc), str(exc))
    # values compare by their bits (-0.0 is not 0.0)
    rows = [
        tuple(struct.pack("<d", v) if isinstance(v, float) else v for v in r.values())
        for r in batch.rows()
    ]
    return (n, d.strings_skipped - strings0, rows)


_ALPHABET = b'mvd,= "\\\n\r#.-+eEiuTtFfa01239\xff\xc3'


@settings(max_examples=400, deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=40),
        st.lists(st.sampled_from(list(_ALPHABET)), max_size=40).map(bytes),
        st.lists(_line, min_size=1, max_size=3)
        .flatmap(
            lambda ls: st.tuples(
                st.just(b"".join(_encode_line(x) for x in ls)),
                st.integers(0, 10**6),
                st.integers(0, 255),
            )
        )
        .map(
            lambda t: (
                t[0][: t[1] % (len(t[0]) + 1)] + bytes([t[2]]) + t[0][t[1] % (len(t[0]) + 1) + 1 :]
            )
        ),
    ),
    device=st.none() | st.just("td"),
)
def test_cython_and_twin_agree(payload: bytes, device: str | None) -> None:
    assert _outcome(*_cython(), payload, device, live=True) == _outcome(
        lineproto_py, batch_py, payload, device, live=True
    )


@settings(max_examples=500, deadline=None)
@given(
    tok=st.from_regex(
        r"\A-?(?:[0-9]{1,25}(?:\.[0-9]{0,25})?|\.[0-9]{1,25})(?:[eE][+-]?[0-9]{1,5})?\Z"
    )
)
def test_float_values_are_correctly_rounded(tok: str) -> None:
    """The Cython fast path for short decimals gives the same double as the full parser."""
    want = float(tok)
    payload = f"m v={tok}".encode()
    if not math.isfinite(want):
        with pytest.raises(InvalidValue):
            decode(_cython(), payload)
        return
    (row,) = decode(_cython(), payload)
    assert math.copysign(1.0, row[3]) == math.copysign(1.0, want)
    assert row[3] == want


def test_many_names_across_batches_clear_and_rollback(impl: tuple[Any, Any]) -> None:
    """Name caches stay right when names outnumber them and batches are cleared or rolled back."""
    mod, bmod = impl
    d = mod.Decoder()
    batch = bmod.ReadingBatch()
    for rnd in range(3):
        for k in range(0, 600, 50):
            lines = [f"m{j % 7},device=d{j % 300} f{j}={j}i" for j in range(k, k + 50)]
            assert d.decode("t", "\n".join(lines).encode(), RECV_NS, batch) == 50
            with pytest.raises(SyntaxError_):
                d.decode("t", f"new{k} x=1\nbad".encode(), RECV_NS, batch)
        rows = batch.rows()
        assert [(r["device"], r["metric"], r["value"]) for r in rows] == [
            (f"d{j % 300}", f"m{j % 7}.f{j}", float(j)) for j in range(600)
        ], rnd
        # round 0 goes on in the cleared batch, round 1 in a new one
        if rnd == 0:
            batch.clear()
        else:
            batch = bmod.ReadingBatch()


GOLDEN = (
    b'# header\r\nweather,location=us\\ west,device=d\\,1 temperature=82,hum=5i,ok=t,s="x\\" y" '
    b"1465839830100400200\r\n  m\\ x,t\\=k=v f\\=1=-1.5e-3,g=18446744073709551615u -1999\n"
)


def test_every_prefix_and_every_deleted_byte_agree() -> None:
    """Boundary values: each truncation point and each one-byte deletion of a golden payload."""
    variants = [GOLDEN[:cut] for cut in range(len(GOLDEN) + 1)]
    variants += [GOLDEN[:i] + GOLDEN[i + 1 :] for i in range(len(GOLDEN))]
    kinds = set()
    for v in variants:
        for device in ("td", None):
            a = _outcome(*_cython(), v, device)
            assert a == _outcome(lineproto_py, batch_py, v, device), v
            kinds.add(a[0] if isinstance(a[0], type) else "ok")
    assert {"ok", SyntaxError_, InvalidValue} <= kinds


def test_many_fields_in_one_line(impl: tuple[Any, Any]) -> None:
    n = 5000
    line = b"m " + b",".join(b"f%d=%di" % (i, i) for i in range(n)) + b" 7000"
    rows = decode(impl, line)
    assert len(rows) == n
    assert rows[-1] == ("dev1", f"m.f{n - 1}", 7, float(n - 1), 0, 0)
