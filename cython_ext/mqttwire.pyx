# cython: freethreading_compatible = False
"""MQTT 3.1.1 / 5.0 framing for a subscribing client, in Cython.

Twin and readable reference: ``sensorhub.sources.mqttwire_py``; its docstring
gives the packets accepted, the order of the checks and the errors, which this
module follows exactly.

Hot path: a read from the socket is parsed in place (from the ``bytes`` the
socket returned, or from the kept partial packet plus the new bytes); per
PUBLISH the only Python objects made are the topic ``str``, the payload
``bytes``, the ack token and the frame. :func:`encode_pubacks` writes all the
acknowledgements of one flush into a single ``bytes`` without a Python object
per packet.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memchr

import struct

from sensorhub.errors import CountTooLarge, InvalidValue, ReservedBits, TrailingBytes, Truncated, UnknownFormat

CONNACK = 2
PUBLISH = 3
SUBACK = 9
PINGRESP = 13
DISCONNECT = 14
MAX_REMAINING_LENGTH = 268_435_455

DEF C_FLAG_DUP = 1
DEF C_FLAG_RETAIN = 2
DEF C_FLAG_REPLAY = 4
DEF C_PACKET_ID_SHIFT = 3
FLAG_DUP = C_FLAG_DUP
FLAG_RETAIN = C_FLAG_RETAIN
FLAG_REPLAY = C_FLAG_REPLAY
PACKET_ID_SHIFT = C_PACKET_ID_SHIFT
SUBSCRIBE_OPTIONS_V5 = 0x18  # Retain Handling 1 (0x10) and Retain As Published (0x08)
DEF C_CONNACK = 2
DEF C_PUBLISH = 3
DEF C_SUBACK = 9
DEF C_PINGRESP = 13
DEF C_DISCONNECT = 14

_NAMES = {
    0: "reserved type 0", 1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC",
    6: "PUBREL", 7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

# MQTT 5 property value types (see the twin): 0 unknown id, then byte, u16,
# u32, varint, string, binary, string pair.
DEF P_NONE = 0
DEF P_BYTE = 1
DEF P_U16 = 2
DEF P_U32 = 3
DEF P_VARINT = 4
DEF P_STR = 5
DEF P_BIN = 6
DEF P_PAIR = 7
cdef uint8_t PROP_KIND[256]
for _i in range(256):
    PROP_KIND[_i] = P_NONE
for _ids, _kind in (
    ((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), P_BYTE),
    ((0x13, 0x21, 0x22, 0x23), P_U16),
    ((0x02, 0x11, 0x18, 0x27), P_U32),
    ((0x0B,), P_VARINT),
    ((0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F), P_STR),
    ((0x09, 0x16), P_BIN),
    ((0x26,), P_PAIR),
):
    for _i in _ids:
        PROP_KIND[_i] = _kind

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def token_base(generation):
    """The ack-token base of connection number ``generation``: tokens are ``generation << 16 | packet_id``."""
    return generation << 16


cdef inline uint16_t rd16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef int check_header(uint8_t h, int protocol) except -1:
    cdef int ptype = h >> 4
    cdef int flags = h & 0x0F
    cdef int qos
    if ptype == C_PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise ReservedBits("PUBLISH with QoS 3", 0)
        if qos == 2:
            raise UnknownFormat("QoS 2 PUBLISH; subscriptions are QoS 1 at most", 0)
        return 0
    if ptype == C_CONNACK or ptype == C_SUBACK or ptype == C_PINGRESP or (ptype == C_DISCONNECT and protocol == 5):
        if flags:
            raise ReservedBits(f"{_NAMES[ptype]} flags {flags:#x}", 0)
        return 0
    raise UnknownFormat(f"unexpected packet {_NAMES[ptype]}", 0)


cdef Py_ssize_t varint(const uint8_t* p, Py_ssize_t i, Py_ssize_t end, uint32_t* out) except -1:
    """A varint inside a complete packet (p points at the packet start); returns the next index."""
    cdef uint32_t value = 0
    cdef int shift = 0
    cdef int k
    cdef uint8_t b
    for k in range(4):
        if i >= end:
            raise Truncated("varint runs past the packet", i)
        b = p[i]
        i += 1
        value |= (<uint32_t>(b & 0x7F)) << shift
        shift += 7
        if not b & 0x80:
            out[0] = value
            return i
        if k == 3:
            raise InvalidValue("varint longer than 4 bytes", i - 1)
    return -1  # unreachable


cdef Py_ssize_t props(const uint8_t* p, Py_ssize_t i, Py_ssize_t end, int* alias, int* keep_alive) except -1:
    """Walks a property block at i (p points at the packet start); returns the index after it."""
    cdef uint32_t plen, v
    cdef Py_ssize_t stop, n
    cdef uint8_t pid, kind
    cdef int need, rep
    i = varint(p, i, end, &plen)
    stop = i + plen
    if stop > end:
        raise Truncated("properties run past the packet", i)
    while i < stop:
        pid = p[i]
        kind = PROP_KIND[pid]
        if kind == P_NONE:
            raise InvalidValue(f"unknown property {pid:#x}", i)
        i += 1
        if kind == P_BYTE:
            need = 1
        elif kind == P_U16:
            need = 2
        elif kind == P_U32:
            need = 4
        elif kind == P_VARINT:
            i = varint(p, i, stop, &v)
            continue
        else:
            for rep in range(2 if kind == P_PAIR else 1):
                if i + 2 > stop:
                    raise Truncated(f"property {pid:#x} runs past the properties", i)
                n = rd16(p + i)
                if i + 2 + n > stop:
                    raise Truncated(f"property {pid:#x} runs past the properties", i)
                i += 2 + n
            continue
        if i + need > stop:
            raise Truncated(f"property {pid:#x} runs past the properties", i)
        if pid == 0x23:
            alias[0] = rd16(p + i)
            if alias[0] == 0:
                raise InvalidValue("topic alias 0", i)
        elif pid == 0x13:
            keep_alive[0] = rd16(p + i)
        i += need
    return stop


cdef class PacketReader:
    """Incremental parser of the server side of one MQTT connection (see the twin)."""

    def __init__(self, int protocol=5, Py_ssize_t max_packet=MAX_REMAINING_LENGTH + 5, frame=None):
        if protocol != 4 and protocol != 5:
            raise ValueError("protocol must be 4 (MQTT 3.1.1) or 5")
        if max_packet < 2:
            raise ValueError("max_packet must be at least 2")
        self.protocol = protocol
        self.max_packet = max_packet
        self._frame = frame
        self._buf = bytearray()
        self._need = 0
        self._aliases = {}
        self._failed = False
        self.dups = 0
        self.retained = 0
        self.packets = 0
        self.new_session = False
        self._replayed = set()

    def pending(self):
        """Bytes of an incomplete packet kept for the next read."""
        return PyByteArray_GET_SIZE(self._buf)

    def feed(self, data, recv_ns=0, token_base=0):
        """Parses ``data`` after what was kept: (frames, control packets), each in stream order."""
        cdef list frames = []
        cdef list controls = []
        cdef Py_ssize_t used, n
        cdef int64_t base = token_base
        cdef bytes b
        if self._failed:
            raise InvalidValue("the stream already failed; reconnect")
        if PyByteArray_GET_SIZE(self._buf) == 0:
            if isinstance(data, bytes):
                b = <bytes>data
            else:
                b = bytes(data)
            n = PyBytes_GET_SIZE(b)
            if n == 0:
                return frames, controls
            try:
                used = self.c_parse(<const uint8_t*>PyBytes_AS_STRING(b), n, frames, controls, recv_ns, base)
            except BaseException:
                self._failed = True
                raise
            if used < n:
                self._buf += b[used:]
            return frames, controls
        self._buf += data
        n = PyByteArray_GET_SIZE(self._buf)
        if n < self._need:
            return frames, controls
        try:
            used = self.c_parse(<const uint8_t*>PyByteArray_AS_STRING(self._buf), n, frames, controls, recv_ns, base)
        except BaseException:
            self._failed = True
            raise
        del self._buf[:used]
        return frames, controls

    cdef Py_ssize_t c_parse(self, const uint8_t* p, Py_ssize_t n, list frames, list controls,
                            object recv_ns, int64_t token_base) except -1:
        cdef Py_ssize_t pos = 0, i, total, end, tstart
        cdef uint32_t rl
        cdef int shift, k, qos, alias, keep_alive, fl
        cdef uint16_t tlen, pid = 0
        cdef uint8_t h, b, flags, rc
        cdef bint complete
        cdef object token, topic, payload
        cdef const uint8_t* q
        cdef int v5 = self.protocol == 5
        self._need = 0
        while pos < n:
            h = p[pos]
            check_header(h, self.protocol)
            rl = 0
            shift = 0
            i = pos + 1
            complete = False
            for k in range(4):
                if i >= n:
                    break
                b = p[i]
                i += 1
                rl |= (<uint32_t>(b & 0x7F)) << shift
                shift += 7
                if not b & 0x80:
                    complete = True
                    break
                if k == 3:
                    raise InvalidValue("remaining length longer than 4 bytes", i - 1 - pos)
            if not complete:
                self._need = n - pos + 1
                return pos
            total = (i - pos) + <Py_ssize_t>rl
            if total > self.max_packet:
                raise CountTooLarge(f"packet of {total} bytes over the bound of {self.max_packet}", 0)
            if pos + total > n:
                self._need = total
                return pos
            # the packet is p[pos:pos+total]; offsets below count from its start
            end = total
            i = i - pos
            q = p + pos
            if h >> 4 == C_PUBLISH:
                qos = (h >> 1) & 3
                if i + 2 > end:
                    raise Truncated("topic length", i)
                tlen = rd16(q + i)
                i += 2
                if i + tlen > end:
                    raise Truncated("topic runs past the packet", i)
                tstart = i
                i += tlen
                token = None
                if qos:
                    if i + 2 > end:
                        raise Truncated("packet id", i)
                    pid = rd16(q + i)
                    if pid == 0:
                        raise InvalidValue("packet id 0", i)
                    token = token_base + pid
                    i += 2
                alias = 0
                if v5:
                    keep_alive = -1
                    i = props(q, i, end, &alias, &keep_alive)
                if tlen:
                    if memchr(q + tstart, 0, tlen) != NULL:
                        raise InvalidValue("topic holds a NUL character", tstart)
                    try:
                        topic = PyUnicode_DecodeUTF8(<const char*>(q + tstart), tlen, NULL)
                    except UnicodeDecodeError:
                        raise InvalidValue("topic is not UTF-8", tstart) from None
                    if alias:
                        self._aliases[alias] = topic
                elif alias:
                    topic = self._aliases.get(alias)
                    if topic is None:
                        raise InvalidValue(f"unknown topic alias {alias}", tstart)
                else:
                    raise InvalidValue("empty topic without a topic alias", tstart)
                fl = (<int>pid << C_PACKET_ID_SHIFT) if qos else 0
                if h & 0x08:
                    self.dups += 1
                    fl |= C_FLAG_DUP
                if h & 0x01:
                    self.retained += 1
                    fl |= C_FLAG_RETAIN
                    if not v5:
                        fl |= C_FLAG_REPLAY  # 3.1.1 flags only what a new subscription is sent
                    elif self.new_session and topic not in self._replayed:
                        fl |= C_FLAG_REPLAY
                        self._replayed.add(topic)
                payload = PyBytes_FromStringAndSize(<const char*>(q + i), end - i)
                if self._frame is None:
                    frames.append((topic, payload, recv_ns, token, fl))
                else:
                    frames.append(self._frame(topic, payload, recv_ns, token, fl))
            elif h >> 4 == C_CONNACK:
                if i + 2 > end:
                    raise Truncated("CONNACK flags and reason", i)
                flags = q[i]
                rc = q[i + 1]
                if flags & 0xFE:
                    raise ReservedBits(f"CONNACK acknowledge flags {flags:#x}", i)
                i += 2
                keep_alive = -1
                if v5:
                    i = props(q, i, end, &alias, &keep_alive)
                if i != end:
                    raise TrailingBytes("after CONNACK", i)
                # without a session every subscription is new: its retained messages are replays
                self.new_session = not (flags & 1)
                self._replayed = set()
                controls.append((CONNACK, bool(flags & 1), rc, keep_alive))
            elif h >> 4 == C_SUBACK:
                if i + 2 > end:
                    raise Truncated("SUBACK packet id", i)
                pid = rd16(q + i)
                i += 2
                if v5:
                    i = props(q, i, end, &alias, &keep_alive)
                controls.append((SUBACK, pid, tuple(PyBytes_FromStringAndSize(<const char*>(q + i), end - i))))
            elif h >> 4 == C_PINGRESP:
                if i != end:
                    raise TrailingBytes("after PINGRESP", i)
                controls.append((PINGRESP,))
            else:  # DISCONNECT, MQTT 5 (the header check refused it otherwise)
                rc = 0
                if i < end:
                    rc = q[i]
                    i += 1
                    if i < end:
                        i = props(q, i, end, &alias, &keep_alive)
                if i != end:
                    raise TrailingBytes("after DISCONNECT", i)
                controls.append((DISCONNECT, rc))
            self.packets += 1
            pos += total
        return pos


# ---- encoders (cold path except encode_pubacks; same code as the twin) ----

def _remaining_length(Py_ssize_t n):
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise InvalidValue(f"packet body of {n} bytes cannot be framed")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str(s):
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    if len(raw) > 0xFFFF:
        raise InvalidValue(f"string of {len(raw)} bytes over 65535")
    return _U16.pack(len(raw)) + raw


def encode_connect(client_id, *, protocol=5, clean=False, keepalive=30, session_expiry=0,
                   receive_maximum=65535, maximum_packet_size=0, username=None, password=None):
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
        props_ = bytearray()
        if session_expiry:
            props_ += b"\x11" + _U32.pack(session_expiry)
        if not 1 <= receive_maximum <= 0xFFFF:
            raise InvalidValue(f"receive maximum {receive_maximum} outside 1..65535")
        props_ += b"\x21" + _U16.pack(receive_maximum)
        if maximum_packet_size:
            props_ += b"\x27" + _U32.pack(maximum_packet_size)
        body += _remaining_length(len(props_)) + props_
    body += _str(client_id)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _str(password)
    return b"\x10" + _remaining_length(len(body)) + bytes(body)


def encode_subscribe(packet_id, filters, protocol=5):
    """SUBSCRIBE of ``(filter, qos)`` pairs (see the twin for the MQTT 5 options)."""
    if not 1 <= packet_id <= 0xFFFF:
        raise InvalidValue(f"packet id {packet_id} outside 1..65535")
    if not filters:
        raise InvalidValue("SUBSCRIBE needs at least one filter")
    body = bytearray(_U16.pack(packet_id))
    if protocol == 5:
        body.append(0)
    for f, qos in filters:
        if qos not in (0, 1):
            raise InvalidValue(f"subscription QoS {qos}; 0 or 1 only")
        body += _str(f)
        body.append(qos | SUBSCRIBE_OPTIONS_V5 if protocol == 5 else qos)
    return b"\x82" + _remaining_length(len(body)) + bytes(body)


def encode_pingreq():
    """PINGREQ."""
    return b"\xc0\x00"


def encode_disconnect(protocol=5, reason=0):
    """DISCONNECT; in MQTT 5 with ``reason`` (0: normal, the session is kept)."""
    if protocol == 5 and reason:
        return b"\xe0\x01" + bytes((reason,))
    return b"\xe0\x00"


def encode_pubacks(tokens, generation):
    """Every PUBACK for ``tokens`` of connection ``generation`` in one ``bytes`` (see the twin)."""
    cdef list seq = tokens if type(tokens) is list else list(tokens)
    cdef Py_ssize_t n = PyList_GET_SIZE(seq), k, acked = 0, stale = 0
    cdef object t
    cdef long long v, gen = generation
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 4 * n)
    cdef uint8_t* w = <uint8_t*>PyBytes_AS_STRING(out)
    for k in range(n):
        t = <object>PyList_GET_ITEM(seq, k)
        if t is None:
            continue
        v = t
        if (v >> 16) != gen:
            stale += 1
            continue
        w[0] = 0x40
        w[1] = 0x02
        w[2] = (v >> 8) & 0xFF
        w[3] = v & 0xFF
        w += 4
        acked += 1
    return out[:4 * acked], acked, stale
