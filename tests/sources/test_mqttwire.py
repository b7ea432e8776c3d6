"""MQTT framing: golden packets, every split point, MQTT 5 properties, malformed input; Cython and twin agree."""

from __future__ import annotations

import importlib
import struct
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.encoders import uvarint

from sensorhub import errors
from sensorhub.sources.mqtt import wire_py as mqttwire_py

IMPLS: list[ModuleType] = [mqttwire_py]
try:
    IMPLS.append(importlib.import_module("sensorhub._ext.mqttwire"))
except ImportError:  # pragma: no cover - extension not built
    pass
IDS = ["twin", "cython"][: len(IMPLS)]


@pytest.fixture(params=IMPLS, ids=IDS)
def w(request: pytest.FixtureRequest) -> ModuleType:
    m: ModuleType = request.param
    return m


_rl = uvarint  # MQTT's remaining length is the unsigned LEB128 varint


def _s(x: bytes) -> bytes:
    return struct.pack(">H", len(x)) + x


def publish(topic: bytes, payload: bytes, pid: int = 0, qos: int = 1, dup: bool = False,
            retain: bool = False, props: bytes | None = None) -> bytes:
    """A PUBLISH written here from the MQTT specification; ``props`` given: MQTT 5."""
    body = _s(topic) + (struct.pack(">H", pid) if qos else b"")
    if props is not None:
        body += _rl(len(props)) + props
    body += payload
    h = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes([h]) + _rl(len(body)) + body


CONNACK5 = b"\x20\x03\x01\x00\x00"  # session present, success, no properties
SUBACK5 = b"\x90\x05\x00\x01\x00\x01\x80"  # packet id 1, no properties, granted 1, refused
PINGRESP = b"\xd0\x00"
DISCONNECT5 = b"\xe0\x02\x8b\x00"  # server shutting down


def stream5() -> bytes:
    return (
        CONNACK5
        + SUBACK5
        + publish(b"sensors/a/d1/json", b'{"v":1}', pid=1, props=b"")
        + publish(b"sensors/a/d2/frame", bytes(range(200)), pid=65535, dup=True, props=b"\x01\x01\x02\x00\x00\x00\x3c")
        + publish(b"q0", b"", qos=0, retain=True, props=b"")
        + PINGRESP
        + publish(b"sensors/a/d3/ilp", b"x" * 300, pid=7, props=b"\x26" + _s(b"k") + _s(b"v") + b"\x0b\x85\x01")
        + DISCONNECT5
    )


# the fifth item: packet_id << 3 | REPLAY << 2 | RETAIN << 1 | DUP; the CONNACK says
# "session present", so the retained message is a live one, not a replay
EXPECTED5_FRAMES = [
    ("sensors/a/d1/json", b'{"v":1}', 9, (5 << 16) + 1, 1 << 3),
    ("sensors/a/d2/frame", bytes(range(200)), 9, (5 << 16) + 65535, 65535 << 3 | 1),
    ("q0", b"", 9, None, 2),
    ("sensors/a/d3/ilp", b"x" * 300, 9, (5 << 16) + 7, 7 << 3),
]
EXPECTED5_CONTROLS = [(2, True, 0, -1), (9, 1, (1, 0x80)), (13,), (14, 0x8B)]


def test_golden_stream_v5(w: ModuleType) -> None:
    r = w.PacketReader(5)
    frames, controls = r.feed(stream5(), 9, w.token_base(5))
    assert frames == EXPECTED5_FRAMES
    assert controls == EXPECTED5_CONTROLS
    assert (r.dups, r.retained, r.packets, r.pending()) == (1, 1, 8, 0)


def test_golden_packets_v311(w: ModuleType) -> None:
    data = (
        b"\x20\x02\x00\x00"  # CONNACK, no session
        + b"\x90\x03\x00\x02\x01"  # SUBACK packet id 2, granted 1
        + publish(b"t/1", b"abc", pid=3)
        + PINGRESP
    )
    r = w.PacketReader(4)
    assert r.feed(data, 1, 0) == ([("t/1", b"abc", 1, 3, 3 << 3)], [(2, False, 0, -1), (9, 2, (1,)), (13,)])
    with pytest.raises(errors.UnknownFormat):  # no DISCONNECT from a 3.1.1 broker
        w.PacketReader(4).feed(b"\xe0\x00")


def test_every_split_point_gives_the_same_result(w: ModuleType) -> None:
    data = stream5()
    for cut in range(len(data) + 1):
        r = w.PacketReader(5)
        f1, c1 = r.feed(data[:cut], 9, w.token_base(5))
        f2, c2 = r.feed(data[cut:], 9, w.token_base(5))
        assert (f1 + f2, c1 + c2) == (EXPECTED5_FRAMES, EXPECTED5_CONTROLS), cut
        assert r.pending() == 0


def test_byte_by_byte(w: ModuleType) -> None:
    data = stream5()
    r = w.PacketReader(5, frame=lambda *a: a)
    frames: list[Any] = []
    controls: list[Any] = []
    for i in range(len(data)):
        f, c = r.feed(data[i : i + 1], 9, w.token_base(5))
        frames += f
        controls += c
    assert (frames, controls) == (EXPECTED5_FRAMES, EXPECTED5_CONTROLS)


def test_topic_alias_sets_and_resolves(w: ModuleType) -> None:
    r = w.PacketReader(5)
    data = publish(b"a/b", b"1", pid=1, props=b"\x23\x00\x05") + publish(b"", b"2", pid=2, props=b"\x23\x00\x05")
    frames, _ = r.feed(data)
    assert [f[0] for f in frames] == ["a/b", "a/b"]
    with pytest.raises(errors.InvalidValue, match="unknown topic alias"):
        w.PacketReader(5).feed(publish(b"", b"2", pid=2, props=b"\x23\x00\x06"))
    with pytest.raises(errors.InvalidValue, match="topic alias 0"):
        w.PacketReader(5).feed(publish(b"a", b"2", pid=2, props=b"\x23\x00\x00"))


def test_server_keep_alive_in_connack(w: ModuleType) -> None:
    props = b"\x13\x00\x3c\x21\x00\x10\x12" + _s(b"cid") + b"\x26" + _s(b"a") + _s(b"b")
    body = b"\x00\x00" + _rl(len(props)) + props
    _, controls = w.PacketReader(5).feed(b"\x20" + _rl(len(body)) + body)
    assert controls == [(2, False, 0, 60)]


def test_remaining_length_four_bytes_and_bound(w: ModuleType) -> None:
    payload = b"p" * 2_100_000  # remaining length needs 3 bytes
    pkt = publish(b"big", payload, pid=9)
    frames, _ = w.PacketReader(4).feed(pkt)
    assert frames[0][1] == payload
    with pytest.raises(errors.CountTooLarge):
        w.PacketReader(4, max_packet=1000).feed(pkt[:5])  # refused from the header alone


@pytest.mark.parametrize(
    "data, exc",
    [
        (b"\x30\xff\xff\xff\xff\x01", errors.InvalidValue),  # remaining length of 5 bytes
        (b"\x36\x00", errors.ReservedBits),  # QoS 3
        (b"\x34\x00", errors.UnknownFormat),  # QoS 2
        (b"\x40\x02\x00\x01", errors.UnknownFormat),  # PUBACK
        (b"\x62\x02\x00\x01", errors.UnknownFormat),  # PUBREL
        (b"\xb0\x02\x00\x01", errors.UnknownFormat),  # UNSUBACK
        (b"\xf0\x00", errors.UnknownFormat),  # AUTH
        (b"\x10\x00", errors.UnknownFormat),  # CONNECT
        (b"\x00\x00", errors.UnknownFormat),  # reserved type 0
        (b"\x21\x02\x00\x00", errors.ReservedBits),  # CONNACK with flag bits
        (b"\x20\x03\x02\x00\x00", errors.ReservedBits),  # CONNACK reserved acknowledge flag
        (b"\x20\x01\x00", errors.Truncated),
        (b"\x20\x04\x00\x00\x00\x00", errors.TrailingBytes),
        (b"\xd0\x01\x00", errors.TrailingBytes),
        (b"\x32\x01\x00", errors.Truncated),  # topic length cut
        (b"\x32\x03\x00\x05a", errors.Truncated),  # topic cut
        (b"\x32\x04\x00\x01a\x00", errors.Truncated),  # packet id cut
        (b"\x32\x06\x00\x01a\x00\x00\x00", errors.InvalidValue),  # packet id 0
        (b"\x32\x06\x00\x01a\x00\x01\x05", errors.Truncated),  # properties longer than the packet
        (b"\x32\x07\x00\x01a\x00\x01\x01\x7f", errors.InvalidValue),  # unknown property
        (b"\x32\x08\x00\x01a\x00\x01\x02\x02\x00", errors.Truncated),  # property value cut
        (b"\x32\x07\x00\x01\xff\x00\x01\x00\x00"[:9], errors.InvalidValue),  # topic not UTF-8
        (b"\x32\x07\x00\x01\x00\x00\x01\x00\x00"[:9], errors.InvalidValue),  # NUL in topic
        (b"\x32\x05\x00\x00\x00\x01\x00", errors.InvalidValue),  # empty topic, no alias
    ],
)
def test_malformed_input_is_a_clean_error(w: ModuleType, data: bytes, exc: type[Exception]) -> None:
    r = w.PacketReader(5)
    with pytest.raises(exc):
        r.feed(data)
    with pytest.raises(errors.DecodeError):  # the stream is out of step for good
        r.feed(PINGRESP)


def test_encoders(w: ModuleType) -> None:
    c5 = w.encode_connect("cid", protocol=5, clean=False, keepalive=30, session_expiry=3600,
                          receive_maximum=4096, maximum_packet_size=1 << 24, username="u", password=b"p")
    props = b"\x11\x00\x00\x0e\x10\x21\x10\x00\x27\x01\x00\x00\x00"
    body = _s(b"MQTT") + b"\x05\xc0\x00\x1e" + _rl(len(props)) + props + _s(b"cid") + _s(b"u") + _s(b"p")
    assert c5 == b"\x10" + _rl(len(body)) + body
    c4 = w.encode_connect("cid", protocol=4, clean=True, keepalive=60)
    body = _s(b"MQTT") + b"\x04\x02\x00\x3c" + _s(b"cid")
    assert c4 == b"\x10" + _rl(len(body)) + body
    sub = w.encode_subscribe(1, [("$share/g/a/#", 1), ("b/+", 0)], 5)
    # options byte: QoS | Retain Handling 1 (0x10: retained messages for new subscriptions
    # only) | Retain As Published (0x08)
    body = b"\x00\x01\x00" + _s(b"$share/g/a/#") + b"\x19" + _s(b"b/+") + b"\x18"
    assert sub == b"\x82" + _rl(len(body)) + body
    assert w.encode_subscribe(2, [("x", 1)], 4) == b"\x82\x06\x00\x02\x00\x01x\x01"
    assert w.encode_pingreq() == b"\xc0\x00"
    assert w.encode_disconnect(5) == b"\xe0\x00" and w.encode_disconnect(4) == b"\xe0\x00"
    assert w.encode_disconnect(5, 0x04) == b"\xe0\x01\x04"
    with pytest.raises(errors.InvalidValue):
        w.encode_subscribe(0, [("x", 1)])


def test_pubacks_one_bytes_only_this_connection(w: ModuleType) -> None:
    g = 3
    tokens = [w.token_base(g) + 1, None, w.token_base(2) + 9, w.token_base(g) + 0xABCD, w.token_base(4) + 1]
    data, acked, stale = w.encode_pubacks(tokens, g)
    assert data == b"\x40\x02\x00\x01\x40\x02\xab\xcd"
    assert (acked, stale) == (2, 2)
    assert w.encode_pubacks([], g) == (b"", 0, 0)
    assert w.encode_pubacks(tuple(tokens), g)[0] == data


def test_acks_parse_as_pubacks_on_the_server_side() -> None:
    """Round trip through an independent reader: paho's own packet constants."""
    from paho.mqtt.client import PUBACK

    data, n, _ = mqttwire_py.encode_pubacks([(1 << 16) + i for i in range(1, 1001)], 1)
    assert n == 1000 and len(data) == 4000
    assert all(data[i] == PUBACK and data[i + 1] == 2 for i in range(0, 4000, 4))
    assert [struct.unpack_from(">H", data, i + 2)[0] for i in range(0, 4000, 4)] == list(range(1, 1001))


def _outcome(m: ModuleType, protocol: int, chunks: list[bytes]) -> Any:
    r = m.PacketReader(protocol, max_packet=4096)
    out: list[Any] = []
    try:
        for c in chunks:
            out.append(r.feed(c, 1, 1 << 16))
    except errors.DecodeError as exc:
        return out, type(exc), exc.offset
    return out, r.dups, r.retained, r.pending()


_packet = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda t, p, i, d, r: publish(t, p, pid=i, dup=d, retain=r, props=b""),
              st.binary(max_size=12), st.binary(max_size=30), st.integers(0, 65535), st.booleans(), st.booleans()),
    st.sampled_from([CONNACK5, SUBACK5, PINGRESP, DISCONNECT5]),
)


@pytest.mark.skipif(len(IMPLS) < 2, reason="Cython extension not built")
@settings(max_examples=400, deadline=None)
@given(st.lists(_packet, max_size=6), st.integers(0, 200), st.sampled_from([4, 5]))
def test_cython_and_twin_agree(packets: list[bytes], cut: int, protocol: int) -> None:
    data = b"".join(packets)
    chunks = [data[:cut], data[cut:]]
    assert _outcome(IMPLS[0], protocol, chunks) == _outcome(IMPLS[1], protocol, chunks)


def test_retained_replays_of_a_new_session(w: ModuleType) -> None:
    """After a CONNACK without a session, the first retained message per topic is the replay."""
    conn_new = b"\x20\x03\x00\x00\x00"  # no session present, success, no properties
    data = (
        conn_new
        + publish(b"t/a", b"1", pid=1, retain=True, props=b"")  # replay of t/a
        + publish(b"t/a", b"2", pid=2, retain=True, props=b"")  # published retained, live
        + publish(b"t/b", b"3", pid=3, retain=True, dup=True, props=b"")  # replay of t/b, redelivered
        + publish(b"t/a", b"4", pid=4, props=b"")  # not retained
    )
    frames, _ = w.PacketReader(5).feed(data, 1, 0)
    assert [f[4] for f in frames] == [
        1 << w.PACKET_ID_SHIFT | w.FLAG_RETAIN | w.FLAG_REPLAY,
        2 << w.PACKET_ID_SHIFT | w.FLAG_RETAIN,
        3 << w.PACKET_ID_SHIFT | w.FLAG_RETAIN | w.FLAG_REPLAY | w.FLAG_DUP,
        4 << w.PACKET_ID_SHIFT,
    ]
    # with the session present, nothing is a replay (subscriptions are not new)
    frames, _ = w.PacketReader(5).feed(CONNACK5 + publish(b"t/a", b"1", pid=1, retain=True, props=b""), 1, 0)
    assert frames[0][4] == 1 << w.PACKET_ID_SHIFT | w.FLAG_RETAIN
    # MQTT 3.1.1 sets RETAIN only on what a new subscription is sent
    conn4 = b"\x20\x02\x01\x00"
    frames, _ = w.PacketReader(4).feed(conn4 + publish(b"t/a", b"1", pid=1, retain=True), 1, 0)
    assert frames[0][4] == 1 << w.PACKET_ID_SHIFT | w.FLAG_RETAIN | w.FLAG_REPLAY
