# cython: freethreading_compatible = False
"""Firmware frame decoder, version 1 (spec/firmware-frame.md), in Cython.

Twin and readable reference: ``sensorhub.decoders.frame_py``; its docstring
gives the frame layout and the order of the checks, which this module follows
exactly (structure, CRC, trailing bytes, field values, topic device).

Hot path: the frame is read in place from the ``bytes`` object; the CRC is
zlib's ``crc32``; metric names come from the C table of :class:`MetricDict`
with their batch index cached; the device id is turned into a ``str`` and
interned only when it differs from the previous frame's. No Python object is
created per reading.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from sensorhub._ext.batch cimport ReadingBatch
from sensorhub._ext.metricdict cimport MetricDict

from sensorhub.errors import (
    BadDeviceId,
    BadMagic,
    BadQuality,
    ChecksumMismatch,
    CountTooLarge,
    DeviceMismatch,
    InvalidValue,
    ReservedBits,
    TrailingBytes,
    Truncated,
    UnsupportedVersion,
)

cdef extern from "zlib.h":
    unsigned long crc32(unsigned long crc, const unsigned char* buf, unsigned int len) nogil

MAX_ID_LEN = 64
MAX_COUNT = 1024
DEF C_MAX_ID_LEN = 64
DEF C_MAX_COUNT = 1024
DEF FLAG_FLOAT32 = 0x01

# 1 for the bytes a device id may hold: [A-Za-z0-9._-]
cdef uint8_t ID_CHAR[256]
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
for _c in range(256):
    ID_CHAR[_c] = chr(_c) in _ID_CHARS

# Little-endian readers that do not depend on the host's byte order or
# alignment; compilers turn them into single loads on x86 and arm64.
cdef inline uint16_t rd16(const uint8_t* p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))

cdef inline uint32_t rd32(const uint8_t* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)

cdef inline uint64_t rd64(const uint8_t* p) noexcept nogil:
    return rd32(p) | (<uint64_t>rd32(p + 4) << 32)

cdef inline double rdf64(const uint8_t* p) noexcept nogil:
    cdef uint64_t u = rd64(p)
    cdef double d
    memcpy(&d, &u, 8)
    return d

cdef inline double rdf32(const uint8_t* p) noexcept nogil:
    cdef uint32_t u = rd32(p)
    cdef float f
    memcpy(&f, &u, 4)
    return <double>f


cdef int _fail(cls, str detail, Py_ssize_t off) except -1:
    raise cls(detail, off)


cdef int _need(Py_ssize_t n, Py_ssize_t off, Py_ssize_t size, str field) except -1:
    if n < off + size:
        raise Truncated(f"{field} needs {size} bytes, payload has {n}", off)
    return 0


cdef int _truncated_reading(Py_ssize_t n, Py_ssize_t body, Py_ssize_t k) except -1:
    cdef Py_ssize_t i = (n - body) // k
    cdef Py_ssize_t rest = (n - body) % k
    cdef Py_ssize_t r = body + i * k
    if rest < 2:
        _fail(Truncated, f"reading {i} metric_id cut off, payload has {n} bytes", r)
    if rest < 6:
        _fail(Truncated, f"reading {i} ts_delta cut off, payload has {n} bytes", r + 2)
    if rest < 7:
        _fail(Truncated, f"reading {i} quality cut off, payload has {n} bytes", r + 6)
    _fail(Truncated, f"reading {i} value cut off, payload has {n} bytes", r + 7)


cdef class Decoder:
    """Decodes firmware frames (version 1) into a ReadingBatch."""

    def __init__(self, dictionary=None):
        self.metrics = MetricDict(dictionary)
        self.last_id_len = 0
        self.last_dev = None
        self.last_dev_idx = 0

    def decode(self, str topic_device, payload, int64_t recv_ns, ReadingBatch batch not None):
        """Append the frame's readings to ``batch``; return how many.

        Raises a :class:`~sensorhub.errors.DecodeError` subclass naming the
        first rule broken and leaves ``batch`` unchanged.
        """
        cdef Py_buffer view
        if type(payload) is bytes:
            return self.c_decode(topic_device, <const uint8_t*>PyBytes_AS_STRING(payload),
                                 PyBytes_GET_SIZE(payload), recv_ns, batch)
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            return self.c_decode(topic_device, <const uint8_t*>view.buf, view.len, recv_ns, batch)
        finally:
            PyBuffer_Release(&view)

    cdef Py_ssize_t c_decode(self, str topic_device, const uint8_t* p, Py_ssize_t n,
                             int64_t recv_ns, ReadingBatch batch) except -1:
        cdef Py_ssize_t id_len, off, body, crc_off, k, i, r
        cdef uint32_t frame_seq, delta, stored, computed
        cdef int64_t base_ts, recv_us
        cdef Py_ssize_t count
        cdef uint8_t flags, q
        cdef bint f32
        cdef uint32_t dev, met
        cdef uint64_t seq0
        # 1. structure
        _need(n, 0, 2, "magic")
        if p[0] != 0x53 or p[1] != 0x48:
            _fail(BadMagic, f"expected 53 48, got {PyBytes_FromStringAndSize(<char*>p, 2).hex(' ')}", 0)
        _need(n, 2, 1, "version")
        if p[2] != 1:
            _fail(UnsupportedVersion, f"version {p[2]}, only 1 is supported", 2)
        _need(n, 3, 1, "flags")
        flags = p[3]
        if flags & ~FLAG_FLOAT32:
            _fail(ReservedBits, f"flags 0x{flags:02x} set reserved bits 0x{flags & 0xFE:02x}", 3)
        _need(n, 4, 1, "id_len")
        id_len = p[4]
        if id_len < 1 or id_len > C_MAX_ID_LEN:
            _fail(BadDeviceId, f"id_len {id_len} is outside 1..{C_MAX_ID_LEN}", 4)
        _need(n, 5, id_len, "device_id")
        off = 5 + id_len
        _need(n, off, 4, "frame_seq")
        _need(n, off + 4, 8, "base_ts")
        _need(n, off + 12, 2, "count")
        frame_seq = rd32(p + off)
        base_ts = <int64_t>rd64(p + off + 4)
        count = rd16(p + off + 12)
        if count > C_MAX_COUNT:
            _fail(CountTooLarge, f"count {count} exceeds {C_MAX_COUNT}", off + 12)
        f32 = flags & FLAG_FLOAT32
        k = 11 if f32 else 15
        body = off + 14
        crc_off = body + count * k
        if n < crc_off:
            _truncated_reading(n, body, k)
        _need(n, crc_off, 4, "crc32")
        # 2. CRC
        stored = rd32(p + crc_off)
        computed = <uint32_t>crc32(0, p, <unsigned int>crc_off)
        if stored != computed:
            _fail(ChecksumMismatch, f"stored 0x{stored:08x}, computed 0x{computed:08x}", crc_off)
        # 3. trailing bytes
        if n != crc_off + 4:
            _fail(TrailingBytes, f"{n - crc_off - 4} bytes after the crc32", crc_off + 4)
        # 4. field values; the device id is validated and made a str only when
        # it is not the previous frame's (already validated) id
        if id_len != self.last_id_len or memcmp(p + 5, self.last_id, id_len) != 0:
            for i in range(id_len):
                if not ID_CHAR[p[5 + i]]:
                    _fail(BadDeviceId, f"byte 0x{p[5 + i]:02x} is not in [A-Za-z0-9._-]", 5 + i)
            self.last_dev = PyBytes_FromStringAndSize(<char*>p + 5, id_len).decode("ascii")
            memcpy(self.last_id, p + 5, id_len)
            self.last_id_len = id_len
        batch.c_begin()
        if not (<Py_ssize_t>self.last_dev_idx < PyList_GET_SIZE(batch.devices)
                and PyList_GET_ITEM(batch.devices, self.last_dev_idx) == <PyObject*>self.last_dev):
            self.last_dev_idx = <uint32_t>batch.intern_device(self.last_dev)
        dev = self.last_dev_idx
        batch.reserve(count)
        # floor division, as the twin (cdivision would truncate toward zero)
        recv_us = recv_ns // 1000 if recv_ns >= 0 else -((-recv_ns + 999) // 1000)
        seq0 = <uint64_t>frame_seq << 16
        r = body
        for i in range(count):
            delta = rd32(p + r + 2)
            if base_ts > 0 and <int64_t>delta > INT64_MAX - base_ts:
                batch.c_rollback()
                _fail(InvalidValue, f"reading {i}: base_ts + ts_delta exceeds the i64 range", r + 2)
            q = p[r + 6]
            if q > 2:
                batch.c_rollback()
                _fail(BadQuality, f"reading {i} has quality {q}, expected 0, 1 or 2", r + 6)
            met = <uint32_t>self.metrics.index_in(batch, rd16(p + r))
            batch.push(dev, met, base_ts + delta, rdf32(p + r + 7) if f32 else rdf64(p + r + 7),
                       q, seq0 + <uint64_t>i, recv_us)
            r += k
        # 5. topic device
        if topic_device is not None and topic_device != self.last_dev:
            batch.c_rollback()
            _fail(DeviceMismatch, f"frame device {self.last_dev!r}, topic device {topic_device!r}", 5)
        return count
