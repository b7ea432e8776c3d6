"""MQTT 3.1.1 / 5.0 framing for a subscribing client: the pure-Python twin of ``cython_ext/mqttwire.pyx``.

This module is the readable specification of the Cython module and its test
oracle; both behave identically, raise the same errors, and are chosen by
``sensorhub._impl.load("mqttwire", "sensorhub.sources.mqtt.wire_py")``.

Reading (server → client): :class:`PacketReader` takes the byte stream of one
connection in whatever pieces the socket returns and turns every complete
packet into either a frame (PUBLISH) or a control tuple; a partial packet is
kept for the next read. The checks, in order, for each packet:

1. the first byte: packet type and its flag bits. Only what a broker sends
   to a QoS 1 subscriber is accepted — PUBLISH (QoS 0 or 1), CONNACK,
   SUBACK, PINGRESP and, in MQTT 5, DISCONNECT. Anything else (PUBACK,
   PUBREC, PUBREL, PUBCOMP, UNSUBACK, AUTH, client packets, QoS 2) raises
   :class:`~sensorhub.errors.UnknownFormat`; nonzero flag bits on a packet
   that has none, or QoS 3, raise :class:`~sensorhub.errors.ReservedBits`.
   This check runs as soon as the byte arrives.
2. the remaining length (a varint of at most 4 bytes; a fifth continuation
   raises :class:`~sensorhub.errors.InvalidValue`), then the bound
   ``max_packet`` (:class:`~sensorhub.errors.CountTooLarge`).
3. the body, once complete: fields that run past the packet's end raise
   :class:`~sensorhub.errors.Truncated`; bytes left over in fixed-size
   packets :class:`~sensorhub.errors.TrailingBytes`; bad values (packet id 0,
   topic not UTF-8 or holding NUL, unknown property, unknown topic alias)
   :class:`~sensorhub.errors.InvalidValue`.

Offsets in errors count from the first byte of the offending packet. After an
error the stream is out of step for good: the reader refuses further input
and the connection must be dropped and made again.

MQTT 5 properties are walked by their declared types, so every property is
skipped correctly; the topic alias (PUBLISH) and the server keep alive
(CONNACK) are used. Topic aliases are resolved per connection.

PUBLISH packets become frames through the ``frame`` factory given to the
reader: ``frame(topic, payload, recv_ns, ack_token, delivery)`` (without
one, plain tuples of those five). ``delivery`` is what MQTT says about this
delivery, packed in one int: ``packet_id << PACKET_ID_SHIFT`` (0 for QoS 0)
with :data:`FLAG_DUP` (the broker sends this message again: a redelivery),
:data:`FLAG_RETAIN` (published with the retain flag) and :data:`FLAG_REPLAY`
(the topic's stored retained message, handed over because the subscription
is new: in MQTT 5 the first retained message per topic on a connection
whose CONNACK said "no session"; in 3.1.1, which marks only those, every
retained one). The ack token of a QoS 1
message is ``token_base + packet_id`` with ``token_base = generation << 16``
(:func:`token_base`), so an acknowledgement knows which connection the packet
id belongs to; QoS 0 messages carry ``None``. Control packets come out as
tuples whose first item is the packet type:

- ``(CONNACK, session_present, reason_code, server_keep_alive)`` (``-1``: none given)
- ``(SUBACK, packet_id, (reason_code, ...))``
- ``(PINGRESP,)``
- ``(DISCONNECT, reason_code)`` (MQTT 5)

Writing (client → server): CONNECT, SUBSCRIBE, PINGREQ, DISCONNECT, and
:func:`encode_pubacks`, which turns many ack tokens into one ``bytes`` so a
whole flush of acknowledgements is a single ``send``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from sensorhub.errors import (
    CountTooLarge,
    InvalidValue,
    ReservedBits,
    TrailingBytes,
    Truncated,
    UnknownFormat,
)
from sensorhub.varint import uvarint

__all__ = [
    "CONNACK",
    "DISCONNECT",
    "FLAG_DUP",
    "FLAG_REPLAY",
    "FLAG_RETAIN",
    "MAX_REMAINING_LENGTH",
    "PACKET_ID_SHIFT",
    "PINGRESP",
    "PUBLISH",
    "SUBACK",
    "SUBSCRIBE_OPTIONS_V5",
    "PacketReader",
    "encode_connect",
    "encode_disconnect",
    "encode_pingreq",
    "encode_pubacks",
    "encode_subscribe",
    "token_base",
]

CONNACK = 2
PUBLISH = 3
SUBACK = 9
PINGRESP = 13
DISCONNECT = 14
# Frame delivery bits (see the module doc)
FLAG_DUP = 1  # the broker sends this message again (DUP)
FLAG_RETAIN = 2  # published with the retain flag (RETAIN, with Retain As Published)
FLAG_REPLAY = 4  # a topic's stored retained message, handed to a new subscription
PACKET_ID_SHIFT = 3
SUBSCRIBE_OPTIONS_V5 = 0x18  # Retain Handling 1 (0x10) and Retain As Published (0x08)

#: the largest remaining length a 4-byte varint can express
MAX_REMAINING_LENGTH = 268_435_455

_NAMES = {
    0: "reserved type 0", 1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC",
    6: "PUBREL", 7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

# MQTT 5 property identifiers by value type: 1 byte, 2-byte int, 4-byte int,
# varint, UTF-8 string, binary data, string pair.
_P_BYTE, _P_U16, _P_U32, _P_VARINT, _P_STR, _P_BIN, _P_PAIR = range(7)
_PROPS = {
    0x01: _P_BYTE, 0x02: _P_U32, 0x03: _P_STR, 0x08: _P_STR, 0x09: _P_BIN, 0x0B: _P_VARINT,
    0x11: _P_U32, 0x12: _P_STR, 0x13: _P_U16, 0x15: _P_STR, 0x16: _P_BIN, 0x17: _P_BYTE,
    0x18: _P_U32, 0x19: _P_BYTE, 0x1A: _P_STR, 0x1C: _P_STR, 0x1F: _P_STR, 0x21: _P_U16,
    0x22: _P_U16, 0x23: _P_U16, 0x24: _P_BYTE, 0x25: _P_BYTE, 0x26: _P_PAIR, 0x27: _P_U32,
    0x28: _P_BYTE, 0x29: _P_BYTE, 0x2A: _P_BYTE,
}
_PROP_TOPIC_ALIAS = 0x23
_PROP_SERVER_KEEP_ALIVE = 0x13

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def token_base(generation: int) -> int:
    """The ack-token base of connection number ``generation``: tokens are ``generation << 16 | packet_id``."""
    return generation << 16


def _check_header(h: int, protocol: int, off: int) -> None:
    """Step 1: is this a packet a broker may send a QoS 1 subscriber, with valid flags?"""
    ptype, flags = h >> 4, h & 0x0F
    if ptype == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise ReservedBits("PUBLISH with QoS 3", off)
        if qos == 2:
            raise UnknownFormat("QoS 2 PUBLISH; subscriptions are QoS 1 at most", off)
        return
    if ptype in (CONNACK, SUBACK, PINGRESP) or (ptype == DISCONNECT and protocol == 5):
        if flags:
            raise ReservedBits(f"{_NAMES[ptype]} flags {flags:#x}", off)
        return
    raise UnknownFormat(f"unexpected packet {_NAMES[ptype]}", off)


def _varint(p: bytes | bytearray, i: int, end: int, off: int) -> tuple[int, int]:
    """A property-length or subscription-id varint inside a complete packet: (value, next index)."""
    value = 0
    shift = 0
    for k in range(4):
        if i >= end:
            raise Truncated("varint runs past the packet", i - off)
        b = p[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i
        if k == 3:
            raise InvalidValue("varint longer than 4 bytes", i - 1 - off)
    raise AssertionError("unreachable")  # pragma: no cover


def _props(p: bytes | bytearray, i: int, end: int, off: int) -> tuple[int, int, int]:
    """Walks a property block at ``i``: (index after it, topic alias or 0, server keep alive or -1)."""
    plen, i = _varint(p, i, end, off)
    stop = i + plen
    if stop > end:
        raise Truncated("properties run past the packet", i - off)
    alias = 0
    keep_alive = -1
    while i < stop:
        pid = p[i]
        kind = _PROPS.get(pid)
        if kind is None:
            raise InvalidValue(f"unknown property {pid:#x}", i - off)
        i += 1
        if kind == _P_BYTE:
            need = 1
        elif kind == _P_U16:
            need = 2
        elif kind == _P_U32:
            need = 4
        elif kind == _P_VARINT:
            _v, i = _varint(p, i, stop, off)
            continue
        else:
            need = 0
            for _ in range(2 if kind == _P_PAIR else 1):
                if i + 2 > stop:
                    raise Truncated(f"property {pid:#x} runs past the properties", i - off)
                n = (p[i] << 8) | p[i + 1]
                if i + 2 + n > stop:
                    raise Truncated(f"property {pid:#x} runs past the properties", i - off)
                i += 2 + n
            continue
        if i + need > stop:
            raise Truncated(f"property {pid:#x} runs past the properties", i - off)
        if pid == _PROP_TOPIC_ALIAS:
            alias = (p[i] << 8) | p[i + 1]
            if alias == 0:
                raise InvalidValue("topic alias 0", i - off)
        elif pid == _PROP_SERVER_KEEP_ALIVE:
            keep_alive = (p[i] << 8) | p[i + 1]
        i += need
    return stop, alias, keep_alive


class PacketReader:
    """Incremental parser of the server side of one MQTT connection.

    ``protocol`` is 4 (3.1.1) or 5; ``max_packet`` bounds one packet (and so
    the bytes kept between reads); ``frame`` builds the object handed out per
    PUBLISH. ``dups`` and ``retained`` count PUBLISH packets with those flags.
    """

    def __init__(self, protocol: int = 5, max_packet: int = MAX_REMAINING_LENGTH + 5,
                 frame: Callable[[str, bytes, int, int | None, int], Any] | None = None) -> None:
        if protocol not in (4, 5):
            raise ValueError("protocol must be 4 (MQTT 3.1.1) or 5")
        if max_packet < 2:
            raise ValueError("max_packet must be at least 2")
        self.protocol = protocol
        self.max_packet = max_packet
        self._frame = frame
        self._buf = bytearray()
        self._need = 0
        self._aliases: dict[int, str] = {}
        self._failed = False
        self.dups = 0
        self.retained = 0
        self.packets = 0
        self.new_session = False  # the last CONNACK said no session: retained messages are replays
        self._replayed: set[str] = set()  # topics whose replay was handed out on this connection

    def pending(self) -> int:
        """Bytes of an incomplete packet kept for the next read."""
        return len(self._buf)

    def feed(self, data: bytes, recv_ns: int = 0, token_base: int = 0) -> tuple[list[Any], list[tuple[Any, ...]]]:
        """Parses ``data`` after what was kept: (frames, control packets), each in stream order."""
        if self._failed:
            raise InvalidValue("the stream already failed; reconnect")
        frames: list[Any] = []
        controls: list[tuple[Any, ...]] = []
        buf = self._buf
        if not buf:
            if not data:
                return frames, controls
            try:
                used = self._parse(data, frames, controls, recv_ns, token_base)
            except BaseException:
                self._failed = True
                raise
            if used < len(data):
                buf += data[used:]
            return frames, controls
        buf += data
        if len(buf) < self._need:
            return frames, controls
        try:
            used = self._parse(buf, frames, controls, recv_ns, token_base)
        except BaseException:
            self._failed = True
            raise
        del buf[:used]
        return frames, controls

    def _parse(self, p: bytes | bytearray, frames: list[Any], controls: list[tuple[Any, ...]],
               recv_ns: int, token_base: int) -> int:
        n = len(p)
        pos = 0
        self._need = 0
        while pos < n:
            h = p[pos]
            _check_header(h, self.protocol, 0)
            # remaining length
            rl = 0
            shift = 0
            i = pos + 1
            complete = False
            for k in range(4):
                if i >= n:
                    break
                b = p[i]
                i += 1
                rl |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    complete = True
                    break
                if k == 3:
                    raise InvalidValue("remaining length longer than 4 bytes", i - 1 - pos)
            if not complete:
                self._need = n - pos + 1
                return pos
            total = (i - pos) + rl
            if total > self.max_packet:
                raise CountTooLarge(f"packet of {total} bytes over the bound of {self.max_packet}", 0)
            if pos + total > n:
                self._need = total
                return pos
            self._packet(p, h, pos, i, pos + total, frames, controls, recv_ns, token_base)
            self.packets += 1
            pos += total
        return pos

    def _packet(self, p: bytes | bytearray, h: int, off: int, i: int, end: int, frames: list[Any],
                controls: list[tuple[Any, ...]], recv_ns: int, token_base: int) -> None:
        ptype = h >> 4
        v5 = self.protocol == 5
        if ptype == PUBLISH:
            qos = (h >> 1) & 3
            if i + 2 > end:
                raise Truncated("topic length", i - off)
            tlen = (p[i] << 8) | p[i + 1]
            i += 2
            if i + tlen > end:
                raise Truncated("topic runs past the packet", i - off)
            tstart = i
            i += tlen
            token: int | None = None
            if qos:
                if i + 2 > end:
                    raise Truncated("packet id", i - off)
                pid = (p[i] << 8) | p[i + 1]
                if pid == 0:
                    raise InvalidValue("packet id 0", i - off)
                token = token_base + pid
                i += 2
            alias = 0
            if v5:
                i, alias, _ka = _props(p, i, end, off)
            if tlen:
                raw = bytes(p[tstart:tstart + tlen])
                if 0 in raw:
                    raise InvalidValue("topic holds a NUL character", tstart - off)
                try:
                    topic = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidValue("topic is not UTF-8", tstart - off) from None
                if alias:
                    self._aliases[alias] = topic
            elif alias:
                t = self._aliases.get(alias)
                if t is None:
                    raise InvalidValue(f"unknown topic alias {alias}", tstart - off)
                topic = t
            else:
                raise InvalidValue("empty topic without a topic alias", tstart - off)
            fl = (pid << PACKET_ID_SHIFT) if qos else 0
            if h & 0x08:
                self.dups += 1
                fl |= FLAG_DUP
            if h & 0x01:
                self.retained += 1
                fl |= FLAG_RETAIN
                if not v5:
                    fl |= FLAG_REPLAY  # 3.1.1 flags only what a new subscription is sent
                elif self.new_session and topic not in self._replayed:
                    fl |= FLAG_REPLAY
                    self._replayed.add(topic)
            payload = bytes(p[i:end])
            if self._frame is None:
                frames.append((topic, payload, recv_ns, token, fl))
            else:
                frames.append(self._frame(topic, payload, recv_ns, token, fl))
        elif ptype == CONNACK:
            if i + 2 > end:
                raise Truncated("CONNACK flags and reason", i - off)
            flags, rc = p[i], p[i + 1]
            if flags & 0xFE:
                raise ReservedBits(f"CONNACK acknowledge flags {flags:#x}", i - off)
            i += 2
            keep_alive = -1
            if v5:
                i, _alias, keep_alive = _props(p, i, end, off)
            if i != end:
                raise TrailingBytes("after CONNACK", i - off)
            # without a session every subscription is new: its retained messages are replays
            self.new_session = not (flags & 1)
            self._replayed = set()
            controls.append((CONNACK, bool(flags & 1), rc, keep_alive))
        elif ptype == SUBACK:
            if i + 2 > end:
                raise Truncated("SUBACK packet id", i - off)
            pid = (p[i] << 8) | p[i + 1]
            i += 2
            if v5:
                i, _alias, _ka = _props(p, i, end, off)
            controls.append((SUBACK, pid, tuple(p[i:end])))
        elif ptype == PINGRESP:
            if i != end:
                raise TrailingBytes("after PINGRESP", i - off)
            controls.append((PINGRESP,))
        else:  # DISCONNECT, MQTT 5 (the header check refused it otherwise)
            rc = 0
            if i < end:
                rc = p[i]
                i += 1
                if i < end:
                    i, _alias, _ka = _props(p, i, end, off)
            if i != end:
                raise TrailingBytes("after DISCONNECT", i - off)
            controls.append((DISCONNECT, rc))


# ---- encoders ----

def _remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise InvalidValue(f"packet body of {n} bytes cannot be framed")
    return uvarint(n)


def _str(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    if len(raw) > 0xFFFF:
        raise InvalidValue(f"string of {len(raw)} bytes over 65535")
    return _U16.pack(len(raw)) + raw


def encode_connect(client_id: str, *, protocol: int = 5, clean: bool = False, keepalive: int = 30,
                   session_expiry: int = 0, receive_maximum: int = 65535, maximum_packet_size: int = 0,
                   username: str | None = None, password: bytes | None = None) -> bytes:
    """CONNECT: clean start/session flag, keep alive, and in MQTT 5 Session Expiry Interval,
    Receive Maximum and (when nonzero) Maximum Packet Size."""
    if protocol not in (4, 5):
        raise ValueError("protocol must be 4 (MQTT 3.1.1) or 5")
    if not 0 <= keepalive <= 0xFFFF:
        raise InvalidValue(f"keep alive {keepalive} outside 0..65535")
    flags = 0x02 if clean else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = bytearray(_str("MQTT"))
    body.append(protocol)
    body.append(flags)
    body += _U16.pack(keepalive)
    if protocol == 5:
        props = bytearray()
        if session_expiry:
            props += b"\x11" + _U32.pack(session_expiry)
        if not 1 <= receive_maximum <= 0xFFFF:
            raise InvalidValue(f"receive maximum {receive_maximum} outside 1..65535")
        props += b"\x21" + _U16.pack(receive_maximum)
        if maximum_packet_size:
            props += b"\x27" + _U32.pack(maximum_packet_size)
        body += _remaining_length(len(props)) + props
    body += _str(client_id)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _str(password)
    return b"\x10" + _remaining_length(len(body)) + bytes(body)


def encode_subscribe(packet_id: int, filters: Sequence[tuple[str, int]], protocol: int = 5) -> bytes:
    """SUBSCRIBE of ``(filter, qos)`` pairs.

    In MQTT 5 the options byte is the QoS with Retain Handling 1: the broker
    sends a topic's retained message only when the subscription is new, so
    subscribing again on every reconnect (harmless with a present session,
    needed without one) does not hand the same retained reading over again;
    and Retain As Published, so a live message published with the retain
    flag shows it and its content can be remembered for the next replay. No
    Local stays off, as shared subscriptions require.
    """
    if not 1 <= packet_id <= 0xFFFF:
        raise InvalidValue(f"packet id {packet_id} outside 1..65535")
    if not filters:
        raise InvalidValue("SUBSCRIBE needs at least one filter")
    body = bytearray(_U16.pack(packet_id))
    if protocol == 5:
        body.append(0)  # no properties
    for f, qos in filters:
        if qos not in (0, 1):
            raise InvalidValue(f"subscription QoS {qos}; 0 or 1 only")
        body += _str(f)
        body.append(qos | SUBSCRIBE_OPTIONS_V5 if protocol == 5 else qos)
    return b"\x82" + _remaining_length(len(body)) + bytes(body)


def encode_pingreq() -> bytes:
    """PINGREQ."""
    return b"\xc0\x00"


def encode_disconnect(protocol: int = 5, reason: int = 0) -> bytes:
    """DISCONNECT; in MQTT 5 with ``reason`` (0: normal, the session is kept)."""
    if protocol == 5 and reason:
        return b"\xe0\x01" + bytes((reason,))
    return b"\xe0\x00"


def encode_pubacks(tokens: Sequence[int | None], generation: int) -> tuple[bytes, int, int]:
    """Every PUBACK for ``tokens`` of connection ``generation`` in one ``bytes``.

    ``None`` tokens (QoS 0) are skipped; tokens of another connection are
    counted as stale and skipped (their packet ids mean nothing on this one;
    the broker redelivers those messages). Returns (bytes, acked, stale).
    """
    out = bytearray()
    acked = stale = 0
    for t in tokens:
        if t is None:
            continue
        if t >> 16 != generation:
            stale += 1
            continue
        out += b"\x40\x02"
        out += _U16.pack(t & 0xFFFF)
        acked += 1
    return bytes(out), acked, stale
