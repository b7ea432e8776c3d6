"""Stream entry codec in C (twin: ``sensorhub.pipeline.entrycodec_py``, which documents the layout)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from sensorhub._ext.batch cimport ReadingBatch

from sensorhub.errors import InvalidValue
from sensorhub.pipeline.entrycodec_py import Block, HEADER_SIZE, KIND_READINGS, VERSION
from sensorhub.pipeline.entrycodec_py import decode_block as _decode_block_py


cdef inline void _put_u32(char* p, uint32_t v) noexcept:
    memcpy(p, &v, 4)


def encode_block(ReadingBatch batch, int64_t decode_ns):
    """Pack the whole batch into one block (same bytes as the twin)."""
    cdef Py_ssize_t n = batch.n, size, pos, i
    cdef list encoded = []
    cdef bytes b
    cdef uint16_t ln
    size = HEADER_SIZE
    for name in batch.devices:
        b = (<str>name).encode()
        if len(b) > 0xFFFF:
            raise InvalidValue(f"name longer than 65535 bytes: {name[:40]!r}...")
        encoded.append(b)
        size += 2 + len(b)
    for name in batch.metrics:
        b = (<str>name).encode()
        if len(b) > 0xFFFF:
            raise InvalidValue(f"name longer than 65535 bytes: {name[:40]!r}...")
        encoded.append(b)
        size += 2 + len(b)
    size += n * (4 + 4 + 8 + 8 + 1 + 8 + 8)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = <char>VERSION
    p[1] = <char>KIND_READINGS
    p[2] = 0
    p[3] = 0
    _put_u32(p + 4, <uint32_t>n)
    _put_u32(p + 8, <uint32_t>len(batch.devices))
    _put_u32(p + 12, <uint32_t>len(batch.metrics))
    memcpy(p + 16, &decode_ns, 8)
    pos = HEADER_SIZE
    for b in encoded:
        ln = <uint16_t>len(b)
        memcpy(p + pos, &ln, 2)
        memcpy(p + pos + 2, PyBytes_AS_STRING(b), ln)
        pos += 2 + ln
    memcpy(p + pos, batch.dev, n * 4); pos += n * 4
    memcpy(p + pos, batch.met, n * 4); pos += n * 4
    memcpy(p + pos, batch.ts_us, n * 8); pos += n * 8
    memcpy(p + pos, batch.value, n * 8); pos += n * 8
    memcpy(p + pos, batch.quality, n); pos += n
    memcpy(p + pos, batch.seq, n * 8); pos += n * 8
    memcpy(p + pos, batch.recv_us, n * 8); pos += n * 8
    return out


def decode_block(bytes data):
    """Unpack a block; columns are ``array`` objects filled by memcpy (same checks as the twin)."""
    return _decode_block_py(data)


from sensorhub.pipeline.entrycodec_py import NATIVE_COLUMNS

cdef inline Py_ssize_t _put_varint(char* p, size_t n) noexcept:
    cdef Py_ssize_t i = 0
    while n >= 0x80:
        p[i] = <char>((n & 0x7F) | 0x80)
        n >>= 7
        i += 1
    p[i] = <char>n
    return i + 1


cdef inline Py_ssize_t _varint_len(size_t n) noexcept:
    cdef Py_ssize_t i = 1
    while n >= 0x80:
        n >>= 7
        i += 1
    return i


def native_block(bytes data, str source):
    """One ClickHouse Native block of readings rows from a stream entry block (C; same bytes as the twin)."""
    blk = _decode_block_py(data)
    cdef Py_ssize_t n = blk.n, i, pos, size, k
    cdef list dev_b = [(<str>d).encode() for d in blk.devices]
    cdef list met_b = [(<str>m).encode() for m in blk.metrics]
    cdef bytes src_b = source.encode()
    # string column sizes
    cdef Py_ssize_t n_dev = len(dev_b), n_met = len(met_b)
    cdef const unsigned int[:] dev_idx = blk.dev
    cdef const unsigned int[:] met_idx = blk.met
    cdef list dev_len = [_varint_len(len(b)) + len(b) for b in dev_b]
    cdef list met_len = [_varint_len(len(b)) + len(b) for b in met_b]
    size = _varint_len(len(NATIVE_COLUMNS)) + _varint_len(n)
    for name, typ in NATIVE_COLUMNS:
        size += _varint_len(len(name)) + len(name) + _varint_len(len(typ)) + len(typ)
    for i in range(n):
        size += <Py_ssize_t>dev_len[dev_idx[i]] + <Py_ssize_t>met_len[met_idx[i]]
    size += n * (_varint_len(len(src_b)) + len(src_b))
    size += n * (8 + 8 + 1 + 8 + 8)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    cdef bytes b
    pos = _put_varint(p, len(NATIVE_COLUMNS))
    pos += _put_varint(p + pos, n)
    cdef const char* sp
    cdef Py_ssize_t sl
    for name, typ in NATIVE_COLUMNS:
        b = (<str>name).encode()
        pos += _put_varint(p + pos, len(b))
        memcpy(p + pos, PyBytes_AS_STRING(b), len(b)); pos += len(b)
        b = (<str>typ).encode()
        pos += _put_varint(p + pos, len(b))
        memcpy(p + pos, PyBytes_AS_STRING(b), len(b)); pos += len(b)
        if name == "device" or name == "metric":
            for i in range(n):
                b = dev_b[dev_idx[i]] if name == "device" else met_b[met_idx[i]]
                sl = len(b)
                pos += _put_varint(p + pos, sl)
                memcpy(p + pos, PyBytes_AS_STRING(b), sl); pos += sl
        elif name == "source":
            sl = len(src_b)
            for i in range(n):
                pos += _put_varint(p + pos, sl)
                memcpy(p + pos, PyBytes_AS_STRING(src_b), sl); pos += sl
        else:
            col = {"ts": blk.ts_us, "recv": blk.recv_us, "value": blk.value, "quality": blk.quality, "seq": blk.seq}[name]
            raw = col.tobytes()
            memcpy(p + pos, PyBytes_AS_STRING(raw), len(raw)); pos += len(raw)
    if pos != size:
        raise AssertionError(f"native block size {pos} != {size}")
    return out, blk
