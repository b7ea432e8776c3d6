# cython: freethreading_compatible = False
"""Influx line protocol decoder (Cython). The contract, grammar and error order
are those of the twin, ``sensorhub.decoders.lineproto_py``; this module must
give the same readings, error class and offset for every input.

The payload is scanned in place: no Python object is made per reading; names
are unescaped and decoded once per distinct raw name (bounded caches)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy, memset

from sensorhub._ext.batch cimport ReadingBatch

import re

from sensorhub.errors import InvalidValue, SyntaxError_

cdef extern from "Python.h":
    double PyOS_string_to_double(const char* s, char** endptr, PyObject* overflow_exception) except? -1.0

cdef extern from "math.h":
    bint isfinite(double x) nogil

DEF CACHE_MAX = 4096
cdef uint64_t INT64_MAGNITUDE_MAX = 9223372036854775807ULL
cdef uint64_t UINT64_MAX_ = 18446744073709551615ULL

_MEAS_ESC = re.compile(rb"\\([, ])")
_KEY_ESC = re.compile(rb"\\([,= ])")


cdef inline bint _isdigit(char c) noexcept:
    return c >= 48 and c <= 57


cdef inline Py_ssize_t _scan(const char* p, Py_ssize_t i, Py_ssize_t e, bint with_eq) noexcept:
    # First unescaped ',' or ' ' (and '=' with with_eq) at or after i; e if none.
    cdef char c, d
    while i < e:
        c = p[i]
        if c == 92 and i + 1 < e:  # backslash
            d = p[i + 1]
            if d == 44 or d == 32 or (with_eq and d == 61):
                i += 2
                continue
        if c == 44 or c == 32 or (with_eq and c == 61):
            return i
        i += 1
    return i


cdef inline int64_t _floor_div_1000(int64_t ns) noexcept:
    cdef int64_t q = ns / 1000
    if ns % 1000 < 0:
        q -= 1
    return q


cdef int _digits(const char* p, Py_ssize_t i, Py_ssize_t t, bint allow_minus,
                 bint* neg, uint64_t* mag) noexcept:
    # Parse [-]digits over exactly [i, t). Returns 0 bad syntax, 1 ok, 2 magnitude beyond uint64.
    cdef uint64_t m = 0
    cdef uint64_t dgt
    cdef bint over = False
    neg[0] = False
    if allow_minus and i < t and p[i] == 45:
        neg[0] = True
        i += 1
    if i >= t:
        return 0
    cdef Py_ssize_t j
    for j in range(i, t):
        if not _isdigit(p[j]):
            return 0
    while i < t - 1 and p[i] == 48:  # leading zeros add nothing
        i += 1
    # Up to 19 digits cannot overflow uint64; the 20th needs a check; more always overflow.
    if t - i > 20:
        over = True
    else:
        for j in range(i, t):
            dgt = <uint64_t>(p[j] - 48)
            if j - i == 19 and m > (UINT64_MAX_ - dgt) / 10:
                over = True
                break
            m = m * 10 + dgt
    mag[0] = m
    return 2 if over else 1


cdef bint _is_float(const char* p, Py_ssize_t i, Py_ssize_t t) noexcept:
    # -?(digits[.digits*] | .digits)([eE][+-]?digits)? over exactly [i, t)
    cdef Py_ssize_t j = i, d0, f0, e0
    if j < t and p[j] == 45:
        j += 1
    d0 = j
    while j < t and _isdigit(p[j]):
        j += 1
    cdef Py_ssize_t int_digits = j - d0
    if j < t and p[j] == 46:
        j += 1
        f0 = j
        while j < t and _isdigit(p[j]):
            j += 1
        if int_digits == 0 and j == f0:
            return False
    elif int_digits == 0:
        return False
    if j < t and (p[j] == 101 or p[j] == 69):
        j += 1
        if j < t and (p[j] == 43 or p[j] == 45):
            j += 1
        e0 = j
        while j < t and _isdigit(p[j]):
            j += 1
        if j == e0:
            return False
    return j == t


cdef double[23] _POW10 = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                          1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22]


cdef bint _fast_float(const char* p, Py_ssize_t i, Py_ssize_t t, double* out) noexcept:
    # Exact conversion of a token already checked by _is_float when its digits
    # form an integer of at most 2**53 and its decimal exponent is within 22:
    # both operands are then exact doubles and one IEEE multiplication or
    # division rounds correctly, giving the same double as the full parser.
    cdef uint64_t m = 0
    cdef int nd = 0, frac = 0, ex = 0, exd = 0, e
    cdef bint neg = False, eneg = False, in_frac = False
    cdef char c
    cdef double v
    if p[i] == 45:
        neg = True
        i += 1
    while i < t:
        c = p[i]
        if c == 46:
            in_frac = True
        elif c == 101 or c == 69:
            break
        else:
            if nd >= 19:
                return False
            m = m * 10 + <uint64_t>(c - 48)
            if m:
                nd += 1
            if in_frac:
                frac += 1
        i += 1
    if i < t:  # exponent
        i += 1
        if p[i] == 45:
            eneg = True
            i += 1
        elif p[i] == 43:
            i += 1
        while i < t:
            if exd >= 4:
                return False
            ex = ex * 10 + (p[i] - 48)
            exd += 1
            i += 1
        if eneg:
            ex = -ex
    if m > 9007199254740992ULL:
        return False
    e = ex - frac
    if e < -22 or e > 22:
        return False
    v = <double>m
    if e >= 0:
        v = v * _POW10[e]
    else:
        v = v / _POW10[-e]
    out[0] = -v if neg else v
    return True


cdef inline bint _eq(const char* p, Py_ssize_t n, const char* lit, Py_ssize_t m) noexcept:
    return n == m and memcmp(p, lit, <size_t>m) == 0


cdef int _bool_value(const char* p, Py_ssize_t n) noexcept:
    # 1 true, 0 false, -1 not a boolean
    if _eq(p, n, b"t", 1) or _eq(p, n, b"T", 1) or _eq(p, n, b"true", 4) \
            or _eq(p, n, b"True", 4) or _eq(p, n, b"TRUE", 4):
        return 1
    if _eq(p, n, b"f", 1) or _eq(p, n, b"F", 1) or _eq(p, n, b"false", 5) \
            or _eq(p, n, b"False", 5) or _eq(p, n, b"FALSE", 5):
        return 0
    return -1


cdef double _field_value(const char* p, Py_ssize_t i, Py_ssize_t t) except? -1.0:
    # Value of the unquoted field value token [i, t); raises as the twin does.
    cdef int r
    cdef bint neg
    cdef uint64_t mag
    cdef char last
    cdef double f
    cdef char* endp
    if t == i:
        raise SyntaxError_("missing field value", i)
    r = _bool_value(p + i, t - i)
    if r >= 0:
        return <double>r
    last = p[t - 1]
    if last == 105:  # "i"
        r = _digits(p, i, t - 1, True, &neg, &mag)
        if r == 0:
            raise SyntaxError_("bad integer field value", i)
        if r == 2 or mag > INT64_MAGNITUDE_MAX + (1 if neg else 0):
            raise InvalidValue("integer field out of int64 range", i)
        if neg:
            return <double>(<int64_t>(0 - mag))
        return <double>(<int64_t>mag)
    if last == 117:  # "u"
        r = _digits(p, i, t - 1, False, &neg, &mag)
        if r == 0:
            raise SyntaxError_("bad unsigned field value", i)
        if r == 2:
            raise InvalidValue("unsigned field out of uint64 range", i)
        return <double>mag
    if not _is_float(p, i, t):
        raise SyntaxError_("bad field value", i)
    if _fast_float(p, i, t, &f):
        return f
    # The token is followed by ',', ' ', '\r', '\n' or the bytes object's NUL,
    # none of which can extend a number, so the conversion stops at t.
    f = PyOS_string_to_double(p + i, &endp, NULL)
    if endp != p + t:
        raise SyntaxError_("bad field value", i)
    if not isfinite(f):
        raise InvalidValue("float field out of range", i)
    return f


cdef str _utf8(bytes raw, Py_ssize_t offset):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidValue("name is not valid UTF-8", offset) from None


cdef class Decoder:
    """Decodes Influx line protocol payloads into a :class:`ReadingBatch`."""

    def __cinit__(self, dictionary=None):
        # ``dictionary`` names frame metric ids; line protocol names its metrics.
        self.strings_skipped = 0
        self._metrics = {}
        self._devices = {}
        self._fields = NULL
        self._fcap = 0
        memset(self._mhash, 0, sizeof(self._mhash))
        self._mkeys = [None] * 256
        self._mnames = [None] * 256
        self._dkey = None
        self._dname = None
        self._didx = 0

    def __dealloc__(self):
        free(self._fields)

    cdef int _reserve_fields(self, Py_ssize_t need) except -1:
        if need <= self._fcap:
            return 0
        cdef Py_ssize_t cap = self._fcap * 2 if self._fcap else 16
        while cap < need:
            cap *= 2
        cdef Field* f = <Field*>realloc(self._fields, <size_t>cap * sizeof(Field))
        if f == NULL:
            raise MemoryError()
        self._fields = f
        self._fcap = cap
        return 0

    def decode(self, topic_device, payload, int64_t recv_ns, ReadingBatch batch):
        """Append the payload's readings to ``batch``; return how many were appended."""
        cdef bytes data = payload if type(payload) is bytes else bytes(payload)
        cdef Py_ssize_t strings = 0
        cdef Py_ssize_t n
        batch.c_begin()
        try:
            n = self.c_decode(topic_device, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                              _floor_div_1000(recv_ns), batch, &strings)
        except BaseException:
            batch.c_rollback()
            raise
        self.strings_skipped += strings
        return n

    cdef str _device_name(self, const char* p, Py_ssize_t v0, Py_ssize_t v1):
        cdef bytes key = PyBytes_FromStringAndSize(p + v0, v1 - v0)
        name = self._devices.get(key)
        if name is None:
            name = _utf8(_KEY_ESC.sub(rb"\1", key), v0)
            if len(self._devices) >= CACHE_MAX:
                self._devices.clear()
            self._devices[key] = name
        return <str>name

    cdef str _metric_name(self, bytes key, const char* p, Py_ssize_t m0, Py_ssize_t m1,
                          Py_ssize_t k0, Py_ssize_t k1):
        name = self._metrics.get(key)
        if name is None:
            m = _utf8(_MEAS_ESC.sub(rb"\1", PyBytes_FromStringAndSize(p + m0, m1 - m0)), m0)
            f = _utf8(_KEY_ESC.sub(rb"\1", PyBytes_FromStringAndSize(p + k0, k1 - k0)), k0)
            name = f"{m}.{f}"
            if len(self._metrics) >= CACHE_MAX:
                self._metrics.clear()
            self._metrics[key] = name
        return <str>name

    cdef Py_ssize_t _metric_index(self, ReadingBatch b, const char* p, Py_ssize_t m0,
                                  Py_ssize_t m1, Py_ssize_t k0, Py_ssize_t k1) except -1:
        # The key is the raw measurement's length, the raw measurement and the raw
        # field key: names may hold any byte, so no separator would be unambiguous.
        cdef uint64_t h = 1469598103934665603ULL  # FNV-1a
        cdef Py_ssize_t j, idx, ml = m1 - m0, kl = k1 - k0, kml
        cdef int slot
        cdef const char* kp
        cdef char* wp
        for j in range(m0, m1):
            h = (h ^ <unsigned char>p[j]) * 1099511628211ULL
        h = (h ^ <uint64_t>ml) * 1099511628211ULL
        for j in range(k0, k1):
            h = (h ^ <unsigned char>p[j]) * 1099511628211ULL
        slot = <int>(h & 255)
        key = self._mkeys[slot]
        if self._mhash[slot] == h and key is not None and \
                PyBytes_GET_SIZE(key) == <Py_ssize_t>sizeof(Py_ssize_t) + ml + kl:
            kp = PyBytes_AS_STRING(key)
            memcpy(&kml, kp, sizeof(Py_ssize_t))
            kp += sizeof(Py_ssize_t)
            if kml == ml and memcmp(kp, p + m0, <size_t>ml) == 0 \
                    and memcmp(kp + ml, p + k0, <size_t>kl) == 0:
                name = self._mnames[slot]
                idx = self._midx[slot]
                if idx < len(b.metrics) and b.metrics[idx] is name:
                    return idx
                idx = b.intern_metric(name)
                self._midx[slot] = idx
                return idx
        key = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>sizeof(Py_ssize_t) + ml + kl)
        wp = PyBytes_AS_STRING(key)
        memcpy(wp, &ml, sizeof(Py_ssize_t))
        memcpy(wp + sizeof(Py_ssize_t), p + m0, <size_t>ml)
        memcpy(wp + sizeof(Py_ssize_t) + ml, p + k0, <size_t>kl)
        name = self._metric_name(key, p, m0, m1, k0, k1)
        idx = b.intern_metric(name)
        self._mhash[slot] = h
        self._mkeys[slot] = key
        self._mnames[slot] = name
        self._midx[slot] = idx
        return idx

    cdef Py_ssize_t _device_index(self, ReadingBatch b, const char* p, Py_ssize_t v0,
                                  Py_ssize_t v1) except -1:
        cdef Py_ssize_t idx
        if self._dkey is not None and PyBytes_GET_SIZE(self._dkey) == v1 - v0 \
                and memcmp(PyBytes_AS_STRING(self._dkey), p + v0, <size_t>(v1 - v0)) == 0:
            idx = self._didx
            if idx < len(b.devices) and b.devices[idx] is self._dname:
                return idx
        else:
            self._dname = self._device_name(p, v0, v1)
            self._dkey = PyBytes_FromStringAndSize(p + v0, v1 - v0)
        idx = b.intern_device(self._dname)
        self._didx = idx
        return idx

    cdef Py_ssize_t c_decode(self, str topic_device, const char* p, Py_ssize_t n,
                             int64_t recv_us, ReadingBatch b, Py_ssize_t* strings) except -1:
        cdef Py_ssize_t total = 0
        cdef Py_ssize_t pos = 0, e, le, i, s, m0, m1, k0, t, j, nf, dv0, dv1, x
        cdef Py_ssize_t topic_dev = -1, dev
        cdef const char* nl
        cdef char c
        cdef bint neg, has_ts
        cdef uint64_t mag
        cdef int r
        cdef int64_t ts, ts_us
        while True:
            nl = <const char*>memchr(p + pos, 10, <size_t>(n - pos))
            e = (nl - p) if nl != NULL else n
            le = e
            if le > pos and p[le - 1] == 13:
                le -= 1
            i = pos
            while i < le and p[i] == 32:
                i += 1
            if i == le or p[i] == 35:  # blank or "#" comment
                if nl == NULL:
                    break
                pos = e + 1
                continue
            s = i
            # measurement
            m0 = i
            i = _scan(p, i, le, False)
            if i == m0:
                raise SyntaxError_("empty measurement", i)
            m1 = i
            if i == le:
                raise SyntaxError_("missing field set", i)
            # tag set
            dv0 = -1
            dv1 = -1
            while p[i] == 44:
                i += 1
                k0 = i
                i = _scan(p, i, le, True)
                if i == k0:
                    raise SyntaxError_("empty tag key", i)
                if i == le or p[i] != 61:
                    raise SyntaxError_("tag key without '='", i)
                x = i - k0
                i += 1
                j = i
                i = _scan(p, i, le, True)
                if i == j:
                    raise SyntaxError_("empty tag value", i)
                if i == le:
                    raise SyntaxError_("missing field set", i)
                if p[i] == 61:
                    raise SyntaxError_("unescaped '=' in tag value", i)
                if x == 6 and memcmp(p + k0, b"device", 6) == 0:
                    dv0 = j
                    dv1 = i
            while i < le and p[i] == 32:
                i += 1
            if i == le:
                raise SyntaxError_("missing field set", i)
            # field set
            nf = 0
            while True:
                k0 = i
                i = _scan(p, i, le, True)
                if i == k0:
                    raise SyntaxError_("empty field key", i)
                if i == le or p[i] != 61:
                    raise SyntaxError_("field key without '='", i)
                x = i
                i += 1
                if i == le:
                    raise SyntaxError_("missing field value", i)
                if p[i] == 34:  # '"': a string field, scanned and skipped
                    j = i + 1
                    while True:
                        if j >= le:
                            raise SyntaxError_("unterminated string", i)
                        c = p[j]
                        if c == 92 and j + 1 < le and (p[j + 1] == 34 or p[j + 1] == 92):
                            j += 2
                        elif c == 34:
                            break
                        else:
                            j += 1
                    i = j + 1
                    strings[0] += 1
                else:
                    t = i
                    while t < le and p[t] != 44 and p[t] != 32:
                        t += 1
                    self._reserve_fields(nf + 1)
                    self._fields[nf].k0 = k0
                    self._fields[nf].k1 = x
                    self._fields[nf].v = _field_value(p, i, t)
                    nf += 1
                    i = t
                if i == le:
                    break
                c = p[i]
                if c == 44:
                    i += 1
                    continue
                if c != 32:
                    raise SyntaxError_("expected ',' or ' ' after a field value", i)
                break
            while i < le and p[i] == 32:
                i += 1
            # timestamp
            has_ts = False
            ts = 0
            if i < le:
                t = i
                while t < le and p[t] != 32:
                    t += 1
                r = _digits(p, i, t, True, &neg, &mag)
                if r == 0:
                    raise SyntaxError_("bad timestamp", i)
                if r == 2 or mag > INT64_MAGNITUDE_MAX + (1 if neg else 0):
                    raise InvalidValue("timestamp out of int64 range", i)
                ts = <int64_t>(0 - mag) if neg else <int64_t>mag
                has_ts = True
                i = t
                while i < le and p[i] == 32:
                    i += 1
                if i < le:
                    raise SyntaxError_("trailing characters after the timestamp", i)
            # device
            if dv0 >= 0:
                dev = self._device_index(b, p, dv0, dv1)
            elif topic_device is not None:
                if topic_dev < 0:
                    topic_dev = b.intern_device(topic_device)
                dev = topic_dev
            else:
                raise InvalidValue("no device: the line has no device tag and the topic names none", s)
            ts_us = _floor_div_1000(ts) if has_ts else recv_us
            # names first, then the readings (as the twin does)
            b.reserve(nf)
            for j in range(nf):
                x = self._metric_index(b, p, m0, m1, self._fields[j].k0, self._fields[j].k1)
                self._fields[j].k0 = x
            for j in range(nf):
                b.push(<uint32_t>dev, <uint32_t>self._fields[j].k0, ts_us, self._fields[j].v,
                       0, 0, recv_us)
            total += nf
            if nl == NULL:
                break
            pos = e + 1
        return total
