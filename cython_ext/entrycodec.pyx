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
