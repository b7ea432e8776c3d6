"""The simulator's encoders against reference decoding written here from the specs.

The frame is parsed with ``struct`` field by field as firmware-frame.md lays it
out, JSON with ``json``, line protocol with a small parser, Sparkplug with the
``protobuf`` runtime and a descriptor of the tahu ``Payload`` built here. The
pipeline's own decoders (``sensorhub.decoders``) must read the same payloads
to the same readings, for every format they implement.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_sim.devices import METRICS, SEQ_UNKNOWN, make_devices, metric_names, parse_mix
from firmware_sim.encoders import (
    FRAME_RULES,
    SP_BOOLEAN,
    SP_DOUBLE,
    SP_INT64,
    FrameReading,
    SparkplugMetric,
    corrupt_frame,
    encode_frame,
    encode_frame_columns,
    encode_ilp_line,
    encode_sparkplug,
    format_json_ts,
)

# ------------------------------------------------------------------ reference frame parser


class FrameInvalid(Exception):
    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


def parse_frame(data: bytes, topic_device: str | None = None) -> dict[str, Any]:
    """Parse a frame exactly as firmware-frame.md reads, naming the first rule broken."""
    if len(data) < 2 or data[:2] != b"SH":
        raise FrameInvalid("bad-magic")
    if len(data) < 3:
        raise FrameInvalid("truncated")
    if data[2] != 1:
        raise FrameInvalid("bad-version")
    if len(data) < 5:
        raise FrameInvalid("truncated")
    flags = data[3]
    if flags & 0xFE:
        raise FrameInvalid("reserved-flags")
    n_id = data[4]
    if len(data) < 5 + n_id:
        raise FrameInvalid("truncated")
    dev = data[5 : 5 + n_id]
    if not 1 <= n_id <= 64 or re.fullmatch(rb"[A-Za-z0-9._-]+", dev) is None:
        raise FrameInvalid("bad-device-id")
    off = 5 + n_id
    if len(data) < off + 14:
        raise FrameInvalid("truncated")
    frame_seq, base_ts, count = struct.unpack_from("<IqH", data, off)
    off += 14
    if count > 1024:
        raise FrameInvalid("count-too-large")
    k = 11 if flags & 1 else 15
    rows = []
    for i in range(count):
        if len(data) < off + k:
            raise FrameInvalid("truncated")
        mid, delta, q = struct.unpack_from("<HIB", data, off)
        v = struct.unpack_from("<f" if flags & 1 else "<d", data, off + 7)[0]
        if q > 2:
            raise FrameInvalid("bad-quality")
        rows.append((mid, base_ts + delta, q, v, frame_seq * 65536 + i))
        off += k
    if len(data) < off + 4:
        raise FrameInvalid("truncated")
    if struct.unpack_from("<I", data, off)[0] != zlib.crc32(data[:off]):
        raise FrameInvalid("crc")
    if len(data) != off + 4:
        raise FrameInvalid("trailing-bytes")
    if topic_device is not None and dev.decode() != topic_device:
        raise FrameInvalid("topic-mismatch")
    return {"device": dev.decode(), "frame_seq": frame_seq, "base_ts": base_ts, "rows": rows}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ------------------------------------------------------------------ frame


def test_frame_layout_by_hand() -> None:
    payload = encode_frame("dev-0001", 7, 1_764_072_000_000_000, [FrameReading(3, 5, 1, 21.5)])
    expected_body = (
        b"SH\x01\x00\x08dev-0001"
        + struct.pack("<IqH", 7, 1_764_072_000_000_000, 1)
        + struct.pack("<HIBd", 3, 5, 1, 21.5)
    )
    assert payload == expected_body + struct.pack("<I", zlib.crc32(expected_body))


def test_frame_empty_and_maximum_count() -> None:
    empty = parse_frame(encode_frame("a", 0, 0, []))
    assert empty["rows"] == []
    full = encode_frame("a" * 64, 0xFFFFFFFF, -5, [FrameReading(i, i, 0, float(i)) for i in range(1024)])
    parsed = parse_frame(full)
    assert len(parsed["rows"]) == 1024
    assert parsed["frame_seq"] == 0xFFFFFFFF
    assert parsed["rows"][-1][4] == 0xFFFFFFFF * 65536 + 1023
    with pytest.raises(ValueError):
        encode_frame("a", 0, 0, [FrameReading(1, 0, 0, 0.0)] * 1025)
    with pytest.raises(ValueError):
        encode_frame("a/b", 0, 0, [])
    with pytest.raises(ValueError):
        encode_frame("a" * 65, 0, 0, [])


@settings(max_examples=150, deadline=None)
@given(
    dev=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    seq=st.integers(0, 0xFFFFFFFF),
    base=st.integers(-(2**62), 2**62),
    f32=st.booleans(),
    readings=st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 2), st.floats(width=32)),
        max_size=40,
    ),
)
def test_frame_round_trip(
    dev: str, seq: int, base: int, f32: bool, readings: list[tuple[int, int, int, float]]
) -> None:
    rs = [FrameReading(*r) for r in readings]
    parsed = parse_frame(encode_frame(dev, seq, base, rs, float32=f32), dev)
    assert parsed["device"] == dev and parsed["frame_seq"] == seq and parsed["base_ts"] == base
    for (mid, delta, q, v), (pm, pts, pq, pv, _pseq) in zip(readings, parsed["rows"], strict=True):
        assert (pm, pts, pq) == (mid, base + delta, q)
        assert same(pv, v)
    assert [r[4] for r in parsed["rows"]] == [seq * 65536 + i for i in range(len(readings))]


@settings(max_examples=100, deadline=None)
@given(
    dev=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    seq=st.integers(0, 2**32 + 5),
    f32=st.booleans(),
    readings=st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2), st.floats(width=32)), max_size=30),
)
def test_fast_frame_encoder_equals_the_plain_one(
    dev: str, seq: int, f32: bool, readings: list[tuple[int, int, float]]
) -> None:
    ids = [r[0] for r in readings]
    qs = [r[1] for r in readings]
    vals = [r[2] for r in readings]
    plain = encode_frame(dev, seq, 123, [FrameReading(m, i, q, v) for i, (m, q, v) in enumerate(readings)],
                         float32=f32)
    assert encode_frame_columns(dev.encode(), seq, 123, ids, qs, vals, float32=f32) == plain


@pytest.mark.parametrize("rule", [r for r in FRAME_RULES])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_each_corruption_breaks_exactly_its_rule(rule: str, n: int) -> None:
    good = encode_frame("dev-0042", 9, 1_700_000_000_000_000, [FrameReading(1, i, 0, 1.5) for i in range(n)])
    parse_frame(good, "dev-0042")
    if rule == "bad-quality" and n == 0:
        with pytest.raises(ValueError):
            corrupt_frame(good, rule)
        return
    with pytest.raises(FrameInvalid) as err:
        parse_frame(corrupt_frame(good, rule), "dev-0042")
    assert err.value.rule == rule


def test_every_truncation_point_is_invalid() -> None:
    good = encode_frame("d1", 1, 2, [FrameReading(1, 0, 0, 2.5), FrameReading(2, 1, 2, math.nan)])
    for cut in range(len(good)):
        with pytest.raises(FrameInvalid):
            parse_frame(good[:cut])


# ------------------------------------------------------------------ devices' messages, per format


def _devices(fmt: str, n: int = 3) -> list[Any]:
    return make_devices(n, parse_mix(fmt), nan_rate=0.2, seed=5)


@pytest.mark.parametrize("per_message", [1, 3, 8, 20])
def test_frame_device_messages_match_their_truth(per_message: int) -> None:
    for d in _devices("frame"):
        for _ in range(20):
            msg = d.next_message(per_message)
            parsed = parse_frame(msg.payload, d.device_id)
            assert msg.topic == f"sensors/{d.line}/{d.device_id}/frame"
            assert len(parsed["rows"]) == per_message == len(msg.readings)
            for (mid, ts, _q, v, seq), (m, tts, tseq, tv) in zip(parsed["rows"], msg.readings, strict=True):
                assert d.names[m] == f"m{mid}"
                assert (ts, seq) == (tts, tseq)
                assert same(v, tv)


def test_device_timestamps_and_keys_are_unique() -> None:
    for fmt in ("frame", "json", "ilp", "sparkplug"):
        seen: set[tuple[int, int, int]] = set()
        for d in _devices(fmt, 2):
            for _ in range(50):
                for m, ts, seq, _v in d.next_message(10, now_us=1_700_000_000_000_000).readings:
                    key = (d.index, m, ts)
                    assert key not in seen, fmt
                    seen.add(key)
                    assert (seq == SEQ_UNKNOWN) == (fmt in ("ilp", "sparkplug"))


def test_json_messages_cover_the_three_shapes() -> None:
    shapes = set()
    for d in _devices("json"):
        for n in (1, 1, 1, 4, 4, 4, 12):
            msg = d.next_message(n)
            doc = json.loads(msg.payload)
            objs = doc if isinstance(doc, list) else [doc]
            shapes.add("array" if isinstance(doc, list) else ("multi" if "values" in doc else "single"))
            got = []
            for o in objs:
                ts_us = round(o["ts"] * 1_000_000)
                if "values" in o:
                    got += [(k, ts_us, o["seq"], v) for k, v in o["values"].items()]
                else:
                    assert o["quality"] in (0, 1, 2)
                    got.append((o["metric"], ts_us, o["seq"], o["value"]))
            want = [(d.names[m], ts, seq, v) for m, ts, seq, v in msg.readings]
            assert got == want
    assert shapes == {"single", "multi", "array"}


def test_json_ts_is_exact_to_the_microsecond() -> None:
    assert format_json_ts(1_764_072_000_123_456) == "1764072000.123456"
    assert format_json_ts(5) == "0.000005"
    assert format_json_ts(-1_500_000) == "-1.500000"


# A small Influx line-protocol parser for the subset the simulator writes, escapes included.
def parse_ilp(text: str) -> list[tuple[str, dict[str, str], dict[str, Any], int | None]]:
    out = []
    for line in text.split("\n"):
        parts = re.split(r"(?<!\\) (?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", line)
        head, fields = parts[0], parts[1]
        ts = int(parts[2]) if len(parts) > 2 else None
        bits = re.split(r"(?<!\\),", head)
        tags = dict(re.split(r"(?<!\\)=", b, maxsplit=1) for b in bits[1:])
        fv: dict[str, Any] = {}
        for f in re.findall(r'((?:[^,=\\]|\\.)+)=("(?:[^"\\]|\\.)*"|[^,]+)', fields):
            k, v = f
            if v.startswith('"'):
                fv[k] = v[1:-1].replace('\\"', '"')
            elif v.endswith("i"):
                fv[k] = int(v[:-1])
            elif v in ("true", "false"):
                fv[k] = v == "true"
            else:
                fv[k] = float(v)
        out.append((bits[0].replace("\\ ", " ").replace("\\,", ","), tags, fv, ts))
    return out


def test_ilp_line_escaping() -> None:
    line = encode_ilp_line("my meas", [("a,b", "c d")], [("f=1", 1.5), ("n", 3), ("s", 'x "y"'), ("b", True)], 10)
    assert line == b'my\\ meas,a\\,b=c\\ d f\\=1=1.5,n=3i,s="x \\"y\\"",b=true 10'
    assert encode_ilp_line("m", [], [("v", 2.0)], None) == b"m v=2.0"
    with pytest.raises(ValueError):
        encode_ilp_line("m", [], [("v", math.nan)], None)


def test_ilp_messages_match_their_truth() -> None:
    for d in _devices("ilp"):
        for n in (1, 5, 8, 17):
            msg = d.next_message(n)
            got = []
            for meas, tags, fields, ts in parse_ilp(msg.payload.decode()):
                assert tags == {"device": d.device_id}
                assert ts is not None
                for k, v in fields.items():
                    if isinstance(v, str):
                        continue  # string fields are not readings
                    got.append((f"{meas}.{k}", ts // 1000, float(v)))
            want = [(d.names[m], t, v) for m, t, _s, v in msg.readings]
            assert sorted(got) == sorted(want)


# ------------------------------------------------------------------ Sparkplug via the protobuf runtime


def sparkplug_payload_class() -> Any:
    """``org.eclipse.tahu.protobuf.Payload`` (the fields the simulator writes), built at run time."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="sim_sparkplug_b.proto", package="org.eclipse.tahu.protobuf")
    fdp.syntax = "proto2"
    payload = fdp.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    F = descriptor_pb2.FieldDescriptorProto
    opt = F.LABEL_OPTIONAL
    for name, num, typ in (
        ("name", 1, F.TYPE_STRING),
        ("alias", 2, F.TYPE_UINT64),
        ("timestamp", 3, F.TYPE_UINT64),
        ("datatype", 4, F.TYPE_UINT32),
        ("int_value", 10, F.TYPE_UINT32),
        ("long_value", 11, F.TYPE_UINT64),
        ("float_value", 12, F.TYPE_FLOAT),
        ("double_value", 13, F.TYPE_DOUBLE),
        ("boolean_value", 14, F.TYPE_BOOL),
        ("string_value", 15, F.TYPE_STRING),
    ):
        metric.field.add(name=name, number=num, type=typ, label=opt)
    payload.field.add(name="timestamp", number=1, type=F.TYPE_UINT64, label=opt)
    payload.field.add(
        name="metrics", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
        type_name=".org.eclipse.tahu.protobuf.Payload.Metric",
    )
    payload.field.add(name="seq", number=3, type=F.TYPE_UINT64, label=opt)
    payload.field.add(name="uuid", number=4, type=F.TYPE_STRING, label=opt)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))


def test_sparkplug_payload_decodes_with_protobuf() -> None:
    cls = sparkplug_payload_class()
    raw = encode_sparkplug(
        1_700_000_000_123,
        255,
        [
            SparkplugMetric("bdSeq", None, None, SP_INT64, 3),
            SparkplugMetric("Node Control/Rebirth", None, 5, SP_BOOLEAN, True),
            SparkplugMetric(None, 7, 1_700_000_000_124, SP_DOUBLE, -2.25),
            SparkplugMetric("neg", 1, None, SP_INT64, -1),
        ],
    )
    p = cls.FromString(raw)
    assert p.timestamp == 1_700_000_000_123 and p.seq == 255
    assert (p.metrics[0].name, p.metrics[0].datatype, p.metrics[0].long_value) == ("bdSeq", SP_INT64, 3)
    assert p.metrics[1].boolean_value is True and p.metrics[1].timestamp == 5
    assert p.metrics[2].alias == 7 and p.metrics[2].double_value == -2.25 and not p.metrics[2].HasField("name")
    assert p.metrics[3].long_value == 2**64 - 1  # int64 -1 as protobuf writes it


def test_sparkplug_birth_data_and_death() -> None:
    cls = sparkplug_payload_class()
    d = _devices("sparkplug", 1)[0]
    d.bd_seq = 4
    birth_msg = d.sparkplug_birth()
    birth = cls.FromString(birth_msg.payload)
    assert birth.seq == 0
    # The birth's readings are in the truth: eight metrics, bdSeq and Rebirth.
    assert sorted(d.names[m] for m, _t, _s, _v in birth_msg.readings) == sorted(d.names)
    assert {ts for _m, ts, _s, _v in birth_msg.readings} == {birth.timestamp * 1000}
    names = {m.name: m for m in birth.metrics}
    assert names["bdSeq"].long_value == 4
    aliases = {m.alias: m.name for m in birth.metrics if m.HasField("alias")}
    assert sorted(aliases.values()) == sorted(spec.name for spec in METRICS)
    seqs = []
    for _ in range(300):
        msg = d.next_message(3)
        p = cls.FromString(msg.payload)
        seqs.append(p.seq)
        got = [(aliases[m.alias], m.timestamp * 1000, m.double_value) for m in p.metrics]
        assert got == [(d.names[m], ts, v) for m, ts, _s, v in msg.readings]
    # seq runs 1.. after the birth's 0 and wraps after 255.
    assert seqs[:3] == [1, 2, 3] and seqs[254] == 255 and seqs[255] == 0
    death = cls.FromString(d.sparkplug_death())
    assert death.metrics[0].name == "bdSeq" and death.metrics[0].long_value == 4
    assert msg.topic == f"spBv1.0/{d.line}/NDATA/{d.device_id}"
    assert d.stored_device == f"{d.line}/{d.device_id}"


# ------------------------------------------------------------------ the pipeline's decoders read the same

_STEMS = {"frame": "frame", "json": "jsonpayload", "ilp": "lineproto", "sparkplug": "sparkplug"}


def _implementations(fmt: str) -> list[tuple[str, Any, Any]]:
    """(name, decoder module, batch class) of each installed implementation: Cython and the twin."""
    import importlib

    out = []
    for name, mod, batch in (
        ("cython", f"sensorhub._ext.{_STEMS[fmt]}", "sensorhub._ext.batch"),
        ("python", f"sensorhub.decoders.{_STEMS[fmt]}_py", "sensorhub.decoders.batch_py"),
    ):
        try:
            out.append((name, importlib.import_module(mod), importlib.import_module(batch).ReadingBatch))
        except ImportError:
            continue
    return out


def _rows(batch: Any) -> list[tuple[str, str, int, float, int]]:
    return [(r["device"], r["metric"], r["ts_us"], r["value"], r["seq"]) for r in batch.rows()]


def _assert_rows(got: list[tuple[str, str, int, float, int]], want: list[tuple[str, str, int, float]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(sorted(got, key=lambda r: r[:3]), sorted(want, key=lambda r: r[:3]), strict=True):
        assert g[:3] == w[:3] and same(g[3], w[3])


@pytest.mark.parametrize("fmt", ["frame", "json", "ilp"])
def test_pipeline_decoders_agree(fmt: str) -> None:
    impls = _implementations(fmt)
    if not impls:
        pytest.skip(f"sensorhub has no {fmt} decoder")
    for _name, mod, batch_cls in impls:
        for d in _devices(fmt):
            dec = mod.Decoder(None)
            for n in (1, 4, 9, 30):
                msg = d.next_message(n)
                batch = batch_cls(64)
                assert dec.decode(d.device_id, msg.payload, 0, batch) == n
                rows = _rows(batch)
                _assert_rows(rows, [(d.stored_device, d.names[m], ts, v) for m, ts, _s, v in msg.readings])
                if fmt != "ilp":
                    assert sorted(r[4] for r in rows) == sorted(s for _m, _t, s, _v in msg.readings)


def test_pipeline_sparkplug_host_agrees_births_data_and_deaths() -> None:
    from sensorhub.decoders.sparkplug_host import SparkplugHost

    impls = _implementations("sparkplug")
    if not impls:
        pytest.skip("sensorhub has no Sparkplug decoder")
    for _name, mod, batch_cls in impls:
        host = SparkplugHost("simtest", mod.Decoder(None))
        for d in _devices("sparkplug", 2):
            for round_ in range(2):
                if round_:
                    # A death by will, then a new connection: new bdSeq, new birth.
                    host.on_message(d.sparkplug_topic("NDEATH"), d.sparkplug_death(), 0, batch_cls(8))
                    d.bd_seq += 1
                birth = d.sparkplug_birth()
                batch = batch_cls(64)
                host.on_message(birth.topic, birth.payload, 0, batch)
                _assert_rows(_rows(batch), [(d.stored_device, d.names[m], ts, v) for m, ts, _s, v in birth.readings])
                for _ in range(300):  # past the seq wrap at 255
                    msg = d.next_message(3)
                    batch = batch_cls(64)
                    host.on_message(msg.topic, msg.payload, 0, batch)
                    _assert_rows(_rows(batch), [(d.stored_device, d.names[m], ts, v) for m, ts, _s, v in msg.readings])
        assert host.seq_gaps == 0 and host.data_before_birth == 0 and host.unknown_aliases == 0
        assert host.ignored_deaths == 0 and host.deaths == 2


def test_pipeline_frame_decoder_rejects_each_corruption() -> None:
    from sensorhub.errors import DecodeError

    impls = _implementations("frame")
    if not impls:
        pytest.skip("sensorhub has no frame decoder")
    good = encode_frame("dev-0001", 1, 1_700_000_000_000_000, [FrameReading(1, 0, 0, 1.0)])
    for _name, mod, batch_cls in impls:
        for rule in FRAME_RULES:
            with pytest.raises(DecodeError):
                mod.Decoder(None).decode("dev-0001", corrupt_frame(good, rule), 0, batch_cls(8))


def test_metric_names_follow_the_dictionary() -> None:
    assert metric_names("frame")[:2] == ["m1", "m2"]
    assert metric_names("frame", {1: "temp_c"})[:2] == ["temp_c", "m2"]
    assert metric_names("ilp")[0] == "line.temp_c"
    assert metric_names("json")[0] == "temp_c"
