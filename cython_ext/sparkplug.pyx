# cython: freethreading_compatible = False
"""Sparkplug B payload decoder (Cython): a protobuf wire-format reader over the
payload bytes in place. The contract, the rules and the order in which errors
are found are those of the twin, ``sensorhub.decoders.sparkplug_py``; this
module must give the same readings, error class and message for every input.

No Python object is made per reading except the metric name lookup key (names
are decoded once per distinct name, bounded cache) and, with birth tables, the
alias lookup."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from sensorhub._ext.batch cimport ReadingBatch

from sensorhub.errors import InvalidValue, Truncated, UnknownAlias

DEF NAME_CACHE_MAX = 4096
DEF MAX_GROUP_DEPTH = 32
DEF MAX_DATATYPE = 34
DEF MAX_FIELD = 536870911  # 2**29 - 1
cdef uint64_t MAX_MS = 9223372036854775ULL  # (2**63 - 1) // 1000

DATATYPE_NAMES = (
    "Unknown", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
    "Float", "Double", "Boolean", "String", "DateTime", "Text", "UUID", "DataSet", "Bytes",
    "File", "Template", "PropertySet", "PropertySetList", "Int8Array", "Int16Array",
    "Int32Array", "Int64Array", "UInt8Array", "UInt16Array", "UInt32Array", "UInt64Array",
    "FloatArray", "DoubleArray", "BooleanArray", "StringArray", "DateTimeArray",
)


cdef inline int64_t _floor_div_1000(int64_t ns) noexcept:
    cdef int64_t q = ns / 1000
    if ns % 1000 < 0:
        q -= 1
    return q


cdef int _varint(const unsigned char* p, Py_ssize_t* ip, Py_ssize_t end, uint64_t* out) except -1:
    cdef Py_ssize_t i = ip[0]
    cdef Py_ssize_t start = i
    cdef uint64_t r = 0
    cdef int shift = 0
    cdef unsigned char b
    if i < end and p[i] < 0x80:  # the common one-byte case
        out[0] = p[i]
        ip[0] = i + 1
        return 0
    while True:
        if i >= end:
            raise Truncated("varint", start)
        b = p[i]
        i += 1
        if shift == 63 and b > 1:
            raise InvalidValue("varint overflows 64 bits", start)
        r |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            break
        shift += 7
    ip[0] = i
    out[0] = r
    return 0


cdef int _tag(const unsigned char* p, Py_ssize_t* ip, Py_ssize_t end,
              uint64_t* fno, int* wt) except -1:
    cdef Py_ssize_t start = ip[0]
    cdef uint64_t tag
    _varint(p, ip, end, &tag)
    fno[0] = tag >> 3
    wt[0] = <int>(tag & 7)
    if fno[0] == 0:
        raise InvalidValue("field number 0", start)
    if fno[0] > MAX_FIELD:
        raise InvalidValue("field number too large", start)
    return 0


cdef int _len_span(const unsigned char* p, Py_ssize_t* ip, Py_ssize_t end,
                   Py_ssize_t* a) except -1:
    # On return a[0] is the start of the value and ip[0] its end.
    cdef Py_ssize_t i0 = ip[0]
    cdef uint64_t n
    _varint(p, ip, end, &n)
    if n > <uint64_t>(end - ip[0]):
        raise Truncated("length-delimited field", i0)
    a[0] = ip[0]
    ip[0] += <Py_ssize_t>n
    return 0


cdef int _skip(const unsigned char* p, Py_ssize_t* ip, Py_ssize_t end, uint64_t fno, int wt,
               Py_ssize_t start, int depth) except -1:
    cdef uint64_t v, f2
    cdef int w2
    cdef Py_ssize_t a, t0
    if wt == 0:
        _varint(p, ip, end, &v)
    elif wt == 1:
        if end - ip[0] < 8:
            raise Truncated("64-bit field", ip[0])
        ip[0] += 8
    elif wt == 2:
        _len_span(p, ip, end, &a)
    elif wt == 5:
        if end - ip[0] < 4:
            raise Truncated("32-bit field", ip[0])
        ip[0] += 4
    elif wt == 3:
        if depth >= MAX_GROUP_DEPTH:
            raise InvalidValue("groups nested too deep", start)
        while True:
            if ip[0] >= end:
                raise Truncated("group without its end", start)
            t0 = ip[0]
            _tag(p, ip, end, &f2, &w2)
            if w2 == 4:
                if f2 != fno:
                    raise InvalidValue("end of group does not match its start", t0)
                return 0
            _skip(p, ip, end, f2, w2, t0, depth + 1)
    elif wt == 4:
        raise InvalidValue("end of group without its start", start)
    else:
        raise InvalidValue(f"wire type {wt}", start)
    return 0


cdef int _header(const unsigned char* p, Py_ssize_t end, SpHeader* h) except -1:
    # Pass 1: the payload's own fields; every top-level field is checked here.
    cdef Py_ssize_t i = 0, t0, a, ts_off = 0, seq_off = 0
    cdef uint64_t fno
    cdef int wt
    h.has_ts = False
    h.has_seq = False
    while i < end:
        t0 = i
        _tag(p, &i, end, &fno, &wt)
        if fno == 1 and wt == 0:
            ts_off = i
            _varint(p, &i, end, &h.ts)
            h.has_ts = True
        elif fno == 2 and wt == 2:
            _len_span(p, &i, end, &a)
        elif fno == 3 and wt == 0:
            seq_off = i
            _varint(p, &i, end, &h.seq)
            h.has_seq = True
        else:
            _skip(p, &i, end, fno, wt, t0, 0)
    if h.has_ts and h.ts > MAX_MS:
        raise InvalidValue("payload timestamp out of range", ts_off)
    if h.has_seq and h.seq > 255:
        raise InvalidValue(f"seq {h.seq} outside 0..255", seq_off)
    return 0


cdef int _read_metric(const unsigned char* p, Py_ssize_t s, Py_ssize_t end, SpMetric* m) except -1:
    cdef Py_ssize_t i = s, t0, a
    cdef uint64_t fno, v
    cdef int wt
    cdef float f32
    cdef double f64
    m.offset = s
    m.name0 = -1
    m.name1 = -1
    m.has_alias = False
    m.has_ts = False
    m.datatype = 0
    m.is_null = False
    m.vf = 0
    m.iv = 0
    m.dv = 0.0
    while i < end:
        t0 = i
        _tag(p, &i, end, &fno, &wt)
        if wt == 0 and (fno == 2 or fno == 3 or fno == 4 or fno == 5 or fno == 6 or fno == 7
                        or fno == 10 or fno == 11 or fno == 14):
            _varint(p, &i, end, &v)
            if fno == 2:
                m.has_alias = True
                m.alias = v
            elif fno == 3:
                m.has_ts = True
                m.ts = v
            elif fno == 4:
                m.datatype = <uint32_t>v
            elif fno == 7:
                m.is_null = v != 0
            elif fno == 10:
                m.vf = 10
                m.iv = v & 0xFFFFFFFFULL
            elif fno == 11:
                m.vf = 11
                m.iv = v
            elif fno == 14:
                m.vf = 14
                m.iv = 1 if v != 0 else 0
            # 5 is_historical, 6 is_transient: stored like any other reading
        elif wt == 2 and (fno == 1 or (fno >= 15 and fno <= 19)):
            _len_span(p, &i, end, &a)
            if fno == 1:
                m.name0 = a
                m.name1 = i
            else:
                m.vf = <int>fno
        elif wt == 5 and fno == 12:
            if end - i < 4:
                raise Truncated("32-bit field", i)
            memcpy(&f32, p + i, 4)  # little-endian hosts only (x86-64, aarch64)
            m.vf = 12
            m.dv = f32
            i += 4
        elif wt == 1 and fno == 13:
            if end - i < 8:
                raise Truncated("64-bit field", i)
            memcpy(&f64, p + i, 8)
            m.vf = 13
            m.dv = f64
            i += 8
        else:
            _skip(p, &i, end, fno, wt, t0, 0)
    return 0


cdef int _int_kind(uint32_t dt, int* bits, bint* signed_) noexcept:
    if dt >= 1 and dt <= 4:
        bits[0] = 8 << (dt - 1)
        signed_[0] = True
        return 1
    if dt >= 5 and dt <= 8:
        bits[0] = 8 << (dt - 5)
        signed_[0] = False
        return 1
    if dt == 13:
        bits[0] = 64
        signed_[0] = False
        return 1
    return 0


cdef int _value(SpMetric* m, uint32_t dt, double* out) except -1:
    # 1: a reading with value out[0]; 0: not a reading. Same rules as metric_value().
    cdef int vf = m.vf
    cdef int bits, width
    cdef bint signed_
    cdef uint64_t v, lim
    if dt > MAX_DATATYPE:
        raise InvalidValue(f"unknown datatype {dt}", m.offset)
    if dt == 0:
        if vf == 10 or vf == 11:
            out[0] = <double>m.iv
            return 1
        if vf == 12 or vf == 13:
            out[0] = m.dv
            return 1
        if vf == 14:
            out[0] = <double>m.iv
            return 1
        return 0
    if vf == 0:
        return 0
    if _int_kind(dt, &bits, &signed_):
        if vf != 10 and vf != 11:
            raise InvalidValue(f"{DATATYPE_NAMES[dt]} metric carries value field {vf}", m.offset)
        width = 32 if vf == 10 else 64
        v = m.iv
        if signed_:
            if bits == 64 or v < (1ULL << bits):
                if bits == 64:
                    out[0] = <double>(<int64_t>v)
                elif v >= (1ULL << (bits - 1)):
                    out[0] = <double>(<int64_t>v - (<int64_t>1 << bits))
                else:
                    out[0] = <double>v
                return 1
            # sign-extended to the field's width
            lim = (0ULL - (1ULL << (bits - 1))) if width == 64 else \
                ((1ULL << 32) - (1ULL << (bits - 1)))
            if v >= lim:
                if width == 64:
                    out[0] = <double>(<int64_t>v)
                else:
                    out[0] = <double>(<int64_t>v - (<int64_t>1 << 32))
                return 1
            raise InvalidValue(f"{v} out of range for {DATATYPE_NAMES[dt]}", m.offset)
        if bits < 64 and v >= (1ULL << bits):
            raise InvalidValue(f"{v} out of range for {DATATYPE_NAMES[dt]}", m.offset)
        out[0] = <double>v
        return 1
    if dt == 9 or dt == 10:
        if vf != 12 and vf != 13:
            raise InvalidValue(f"{DATATYPE_NAMES[dt]} metric carries value field {vf}", m.offset)
        out[0] = m.dv
        return 1
    if dt == 11:
        if vf != 14:
            raise InvalidValue(f"Boolean metric carries value field {vf}", m.offset)
        out[0] = <double>m.iv
        return 1
    return 0


cdef class Decoder:
    """Decodes Sparkplug B payloads into a :class:`ReadingBatch`."""

    def __cinit__(self, dictionary=None):
        # ``dictionary`` names frame metric ids; Sparkplug names its metrics.
        self.metrics_skipped = 0
        self.nulls_skipped = 0
        self._names = {}

    def header(self, payload):
        """The payload's timestamp (ms) and seq, each None when absent (validates pass 1)."""
        cdef bytes data = payload if type(payload) is bytes else bytes(payload)
        cdef SpHeader h
        _header(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &h)
        return (h.ts if h.has_ts else None, h.seq if h.has_seq else None)

    def decode(self, topic_device, payload, int64_t recv_ns, ReadingBatch batch):
        """Append the payload's readings (named metrics only) to ``batch``; return how many."""
        return self.decode_with(topic_device, payload, recv_ns, batch, None, None)

    def decode_with(self, device, payload, int64_t recv_ns, ReadingBatch batch,
                    dict aliases, dict types):
        """As :meth:`decode`, resolving aliases and datatypes with birth tables.

        ``aliases`` maps an alias to (name, datatype), ``types`` a name to its datatype.
        """
        if device is None:
            raise InvalidValue("no device: Sparkplug readings take their device from the topic")
        cdef bytes data = payload if type(payload) is bytes else bytes(payload)
        cdef Py_ssize_t skipped = 0, nulls = 0, n
        batch.c_begin()
        try:
            n = self.c_decode(device, <const unsigned char*>PyBytes_AS_STRING(data),
                              PyBytes_GET_SIZE(data), _floor_div_1000(recv_ns), batch,
                              aliases, types, &skipped, &nulls)
        except BaseException:
            batch.c_rollback()
            raise
        self.metrics_skipped += skipped
        self.nulls_skipped += nulls
        return n

    cdef str _name(self, const unsigned char* p, SpMetric* m):
        cdef bytes key = PyBytes_FromStringAndSize(<const char*>p + m.name0, m.name1 - m.name0)
        name = self._names.get(key)
        if name is None:
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidValue("metric name is not valid UTF-8", m.name0) from None
            if len(self._names) >= NAME_CACHE_MAX:
                self._names.clear()
            self._names[key] = name
        return <str>name

    cdef Py_ssize_t c_decode(self, str device, const unsigned char* p, Py_ssize_t n,
                             int64_t recv_us, ReadingBatch b, dict aliases, dict types,
                             Py_ssize_t* skipped, Py_ssize_t* nulls) except -1:
        cdef SpHeader h
        cdef SpMetric m
        cdef Py_ssize_t i = 0, a, t0, dev = -1, count = 0
        cdef uint64_t fno, seq
        cdef int wt
        cdef uint32_t birth_type, dt
        cdef int64_t default_ts, ts_us
        cdef double value
        cdef str name
        _header(p, n, &h)
        seq = (h.ts if h.has_ts else 0) * 256 + (h.seq if h.has_seq else 0)
        default_ts = <int64_t>h.ts * 1000 if h.has_ts else recv_us
        # Pass 2: pass 1 checked the top level, so only the metrics can fail here.
        while i < n:
            t0 = i
            _tag(p, &i, n, &fno, &wt)
            if not (fno == 2 and wt == 2):
                _skip(p, &i, n, fno, wt, t0, 0)
                continue
            _len_span(p, &i, n, &a)
            _read_metric(p, a, i, &m)
            if m.is_null:
                nulls[0] += 1
                continue
            birth_type = 0
            if m.name1 >= 0:
                name = self._name(p, &m)
                if types is not None:
                    bt = types.get(name)
                    if bt is not None:
                        birth_type = bt
            elif m.has_alias:
                entry = aliases.get(m.alias) if aliases is not None else None
                if entry is None:
                    raise UnknownAlias(f"metric has only alias {m.alias}, which no birth defined", a)
                name = (<tuple>entry)[0]
                birth_type = (<tuple>entry)[1]
            else:
                raise InvalidValue("metric has neither name nor alias", a)
            dt = m.datatype if m.datatype else birth_type
            if not _value(&m, dt, &value):
                skipped[0] += 1
                continue
            if m.has_ts:
                if m.ts > MAX_MS:
                    raise InvalidValue("metric timestamp out of range", a)
                ts_us = <int64_t>m.ts * 1000
            else:
                ts_us = default_ts
            if dev < 0:
                dev = b.intern_device(device)
            b.push(<uint32_t>dev, <uint32_t>b.intern_metric(name), ts_us, value, 0, seq, recv_us)
            count += 1
        return count
