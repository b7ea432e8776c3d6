# cython: freethreading_compatible = False
"""JSON payload decoder (spec/payloads.md) as a one-pass Cython scanner.

Twin and readable reference: ``sensorhub.decoders.jsonpayload_py``; its
docstring states the rules, which this module applies identically.

Why a scanner of its own rather than msgspec/orjson plus a walk over the
result: the scanner reads each byte once, creates no Python object per value
(numbers are converted in C, names go through a cache of ``str`` objects that
also remembers their batch indexes), and it sees the number *text*, so a
``ts`` of seconds becomes microseconds exactly (``1764072000.123456`` →
``1764072000123456``), which a float from a generic parser cannot promise.
Benchmarks (``benchmarks/decoders.py``) compare it with msgspec and orjson.

How errors are ordered, to match the twin: a syntax error (including invalid
UTF-8, lone surrogates, NaN literals and nesting deeper than MAX_DEPTH)
raises at once; the first broken rule of the payload's *content* is recorded
and raised only after the scanner has checked the rest of the payload is
JSON. Readings are buffered and reach the batch only when the whole payload
is valid, so a bad payload never touches the batch.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

from sensorhub._ext.batch cimport ReadingBatch

from sensorhub.errors import DeviceMismatch, InvalidValue, SyntaxError_

cdef extern from "Python.h":
    double PyOS_string_to_double(const char* s, char** endptr, PyObject* overflow_exception) except? -1.0
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL

MAX_DEPTH = 64
DEF C_MAX_DEPTH = 64
DEF N_SLOTS = 4096          # name cache size (power of two); cleared when half full
DEF EXP_CAP = 1000000000000000
cdef uint64_t UINT64_MAX_DIV10 = 1844674407370955161ULL

# keys the decoder uses; bit i of an object's "seen" mask
DEF K_UNKNOWN = 0
DEF K_METRIC = 1
DEF K_VALUE = 2
DEF K_TS = 3
DEF K_SEQ = 4
DEF K_QUALITY = 5
DEF K_DEVICE = 6
DEF K_VALUES = 7

DEF SRC_PAYLOAD = 0
DEF SRC_ARENA = 1
DEF SRC_TOPIC = 2
DEF SRC_NONE = 3

cdef double POW10[23]
for _e in range(23):
    POW10[_e] = float(10 ** _e)

cdef uint64_t U64POW10[20]
for _e in range(20):
    U64POW10[_e] = 10 ** _e


cdef inline bint is_digit(uint8_t c) noexcept nogil:
    return 0x30 <= c <= 0x39


cdef inline uint64_t fnv1a(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 14695981039346656037ULL
    cdef Py_ssize_t k
    for k in range(n):
        h = (h ^ s[k]) * 1099511628211ULL
    return h


cdef inline int hexval(uint8_t c) noexcept nogil:
    if 0x30 <= c <= 0x39:
        return c - 0x30
    if 0x61 <= c <= 0x66:
        return c - 0x61 + 10
    if 0x41 <= c <= 0x46:
        return c - 0x41 + 10
    return -1


cdef inline uint8_t digit_at(const uint8_t* p, Py_ssize_t s1, Py_ssize_t e1, Py_ssize_t s2,
                             Py_ssize_t pos) noexcept nogil:
    # the pos-th character of the digit sequence p[s1:e1] + p[s2:...]
    if pos < e1 - s1:
        return p[s1 + pos]
    return p[s2 + pos - (e1 - s1)]


cdef int scale_digits(const uint8_t* p, Py_ssize_t s1, Py_ssize_t e1, Py_ssize_t s2, Py_ssize_t e2,
                      int64_t scale, uint64_t* out) noexcept nogil:
    """round_half_even(digits × 10**scale) for the decimal digits p[s1:e1] + p[s2:e2].

    Returns 0 and the result in out, or 1 when it exceeds 20 digits / uint64.
    """
    cdef Py_ssize_t total = (e1 - s1) + (e2 - s2)
    cdef Py_ssize_t k, lead = 0, D, keep, pos
    cdef uint8_t c, first = 0
    cdef bint sticky = False
    cdef uint64_t q = 0
    # significant digits start at the first non-zero one
    while lead < total:
        c = digit_at(p, s1, e1, s2, lead)
        if c != 0x30:
            break
        lead += 1
    D = total - lead
    if D == 0:
        out[0] = 0
        return 0
    if D + scale > 20:
        return 1
    keep = D + scale if scale < 0 else D
    if keep < 0:
        out[0] = 0  # below 0.1: rounds to zero
        return 0
    for k in range(D):
        pos = lead + k
        c = digit_at(p, s1, e1, s2, pos) - 0x30
        if k < keep:
            if q > UINT64_MAX_DIV10 or (q == UINT64_MAX_DIV10 and c > 5):
                return 1
            q = q * 10 + c
        elif k == keep:
            first = c
        elif c != 0:
            sticky = True
            break
    if scale < 0:
        if first > 5 or (first == 5 and (sticky or (q & 1))):
            if q == 0xFFFFFFFFFFFFFFFFULL:
                return 1
            q += 1
    else:
        for k in range(scale):
            if q > UINT64_MAX_DIV10:
                return 1
            q *= 10
    out[0] = q
    return 0


cdef inline int64_t days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    # Howard Hinnant's days_from_civil (same as the twin)
    if m <= 2:
        y -= 1
    cdef int64_t era = (y if y >= 0 else y - 399) // 400
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline int num2(const uint8_t* s) noexcept nogil:
    if not (is_digit(s[0]) and is_digit(s[1])):
        return -1
    return (s[0] - 0x30) * 10 + (s[1] - 0x30)


cdef int rfc3339(const uint8_t* s, Py_ssize_t n, int64_t* out) noexcept nogil:
    """RFC 3339 date-time → µs; 0 ok, 1 not a date-time (rules as in the twin)."""
    cdef int64_t y, mo, d, h, mi, sec, off = 0, dim
    cdef Py_ssize_t j, fs, fe
    cdef uint64_t frac = 0
    if n < 20:
        return 1
    if num2(s) < 0 or num2(s + 2) < 0:
        return 1
    y = num2(s) * 100 + num2(s + 2)
    if s[4] != 0x2D or s[7] != 0x2D or not (s[10] == 0x54 or s[10] == 0x74 or s[10] == 0x20):
        return 1
    if s[13] != 0x3A or s[16] != 0x3A:
        return 1
    mo = num2(s + 5); d = num2(s + 8); h = num2(s + 11); mi = num2(s + 14); sec = num2(s + 17)
    if mo < 1 or mo > 12 or d < 1 or h < 0 or h > 23 or mi < 0 or mi > 59 or sec < 0 or sec > 60:
        return 1
    if mo == 2:
        dim = 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    elif mo == 4 or mo == 6 or mo == 9 or mo == 11:
        dim = 30
    else:
        dim = 31
    if d > dim:
        return 1
    j = 19
    fs = fe = j
    if j < n and s[j] == 0x2E:
        j += 1
        fs = j
        while j < n and is_digit(s[j]):
            j += 1
        fe = j
        if fe == fs:
            return 1
    if j >= n:
        return 1
    if s[j] == 0x5A or s[j] == 0x7A:
        j += 1
    elif s[j] == 0x2B or s[j] == 0x2D:
        if n - j != 6 or s[j + 3] != 0x3A:
            return 1
        if num2(s + j + 1) < 0 or num2(s + j + 4) < 0 or num2(s + j + 1) > 23 or num2(s + j + 4) > 59:
            return 1
        off = (num2(s + j + 1) * 60 + num2(s + j + 4)) * 60
        if s[j] == 0x2D:
            off = -off
        j += 6
    else:
        return 1
    if j != n:
        return 1
    if fe > fs:
        scale_digits(s, fs, fe, fe, fe, 6 - (fe - fs), &frac)  # at most 10**6: no overflow
    out[0] = (days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - off) * 1000000 + <int64_t>frac
    return 0


cdef class Decoder:
    """Decodes JSON reading payloads (three shapes) into a ReadingBatch."""

    def __cinit__(self, dictionary=None):
        self.arena = NULL
        self.arena_len = self.arena_cap = 0
        self.rows = NULL
        self.nrows = self.rows_cap = 0
        self.slots = <NameSlot*>malloc(N_SLOTS * sizeof(NameSlot))
        if self.slots == NULL:
            raise MemoryError()
        memset(self.slots, 0, N_SLOTS * sizeof(NameSlot))
        self.nslots = 0
        self.topic = None
        self.topic_dev_idx = 0

    def __init__(self, dictionary=None):
        # JSON names its metrics; the frame dictionary does not apply.
        pass

    def __dealloc__(self):
        if self.slots != NULL:
            self._clear_slots()
            free(self.slots)
        free(self.arena)
        free(self.rows)

    cdef void _clear_slots(self) noexcept:
        cdef Py_ssize_t k
        for k in range(N_SLOTS):
            Py_XDECREF(self.slots[k].name)
        memset(self.slots, 0, N_SLOTS * sizeof(NameSlot))
        self.nslots = 0

    def decode(self, str topic_device, payload, int64_t recv_ns, ReadingBatch batch not None):
        """Append the payload's readings to ``batch``; return how many.

        Raises :class:`SyntaxError_`, :class:`InvalidValue` or
        :class:`DeviceMismatch` and leaves ``batch`` unchanged.
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

    # ------------------------------------------------------------ errors

    cdef int syntax(self, str msg, Py_ssize_t off) except -1:
        raise SyntaxError_(msg, off)

    cdef int rule(self, cls, str msg, Py_ssize_t off) except -1:
        """Record a broken content rule; only the first one counts."""
        if self.err_cls is None:
            self.err_cls = cls
            self.err_msg = msg
            self.err_off = off
        return 0

    # ------------------------------------------------------------ buffers

    cdef int arena_reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.arena_len + extra
        cdef Py_ssize_t cap
        cdef char* a
        if need <= self.arena_cap:
            return 0
        cap = max(need, 2 * self.arena_cap, 256)
        a = <char*>realloc(self.arena, cap)
        if a == NULL:
            raise MemoryError()
        self.arena = a
        self.arena_cap = cap
        return 0

    cdef PendingReading* new_row(self) except NULL:
        cdef Py_ssize_t cap
        cdef PendingReading* r
        if self.nrows == self.rows_cap:
            cap = max(16, 2 * self.rows_cap)
            r = <PendingReading*>realloc(self.rows, cap * sizeof(PendingReading))
            if r == NULL:
                raise MemoryError()
            self.rows = r
            self.rows_cap = cap
        r = &self.rows[self.nrows]
        self.nrows += 1
        return r

    cdef const uint8_t* str_ptr(self, uint8_t src, Py_ssize_t off) noexcept:
        return self.p + off if src == SRC_PAYLOAD else <const uint8_t*>self.arena + off

    # ------------------------------------------------------------ lexing

    cdef void ws(self) noexcept:
        cdef const uint8_t* p = self.p
        cdef Py_ssize_t i = self.i, n = self.n
        while i < n and (p[i] == 0x20 or p[i] == 0x0A or p[i] == 0x0D or p[i] == 0x09):
            i += 1
        self.i = i

    cdef int more(self, str what) except -1:
        if self.i >= self.n:
            self.syntax(f"payload ends where {what} is expected", self.n)
        return 0

    cdef Py_ssize_t utf8_seq(self, Py_ssize_t j) except -1:
        """Length of the valid UTF-8 sequence at j (first byte >= 0x80)."""
        cdef const uint8_t* p = self.p
        cdef uint8_t c = p[j], c1
        cdef Py_ssize_t need
        if 0xC2 <= c <= 0xDF:
            need = 2
        elif 0xE0 <= c <= 0xEF:
            need = 3
        elif 0xF0 <= c <= 0xF4:
            need = 4
        else:
            return self.syntax("invalid UTF-8", j)
        if j + need > self.n:
            return self.syntax("invalid UTF-8", j)
        c1 = p[j + 1]
        # the second byte's range excludes overlong forms, surrogates and > U+10FFFF
        if ((c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 > 0x9F)
                or (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 > 0x8F)):
            return self.syntax("invalid UTF-8", j)
        for k in range(1, need):
            if p[j + k] & 0xC0 != 0x80:
                return self.syntax("invalid UTF-8", j)
        return need

    cdef int string(self, StrTok* out, bint keep) except -1:
        """The string at i (p[i] == '"'); its UTF-8 content is a payload slice
        or, when it has escapes, unescaped into the arena (kept there only
        when ``keep``)."""
        cdef const uint8_t* p = self.p
        cdef Py_ssize_t n = self.n
        cdef Py_ssize_t start = self.i + 1, j = start, a0, k
        cdef uint8_t c
        cdef int h0, h1, h2, h3
        cdef uint32_t cp, lo
        cdef char* w
        while j < n:
            c = p[j]
            if c == 0x22:
                out.src = SRC_PAYLOAD
                out.off = start
                out.len = j - start
                self.i = j + 1
                return 0
            if c == 0x5C:
                break
            if c < 0x20:
                return self.syntax("control character in string", j)
            if c >= 0x80:
                j += self.utf8_seq(j)
            else:
                j += 1
        if j >= n:
            return self.syntax("unterminated string", n)
        # slow path: unescape into the arena; the result is never longer than the source
        self.arena_reserve(n - start)
        a0 = self.arena_len
        w = self.arena + a0
        memcpy(w, p + start, j - start)
        w += j - start
        while True:
            if j >= n:
                return self.syntax("unterminated string", n)
            c = p[j]
            if c == 0x22:
                break
            if c == 0x5C:
                if j + 1 >= n:
                    return self.syntax("unterminated string", n)
                c = p[j + 1]
                if c == 0x22 or c == 0x5C or c == 0x2F:
                    w[0] = <char>c
                elif c == 0x62:
                    w[0] = 0x08
                elif c == 0x66:
                    w[0] = 0x0C
                elif c == 0x6E:
                    w[0] = 0x0A
                elif c == 0x72:
                    w[0] = 0x0D
                elif c == 0x74:
                    w[0] = 0x09
                elif c == 0x75:
                    cp = self.hex4(j + 2)
                    j += 6
                    if 0xDC00 <= cp <= 0xDFFF:
                        return self.syntax("\\u escape leaves a lone surrogate", j - 6)
                    if 0xD800 <= cp <= 0xDBFF:
                        if j + 1 >= n or p[j] != 0x5C or p[j + 1] != 0x75:
                            return self.syntax("\\u escape leaves a lone surrogate", j - 6)
                        lo = self.hex4(j + 2)
                        if not (0xDC00 <= lo <= 0xDFFF):
                            return self.syntax("\\u escape leaves a lone surrogate", j - 6)
                        j += 6
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                    if cp < 0x80:
                        w[0] = <char>cp
                        w += 1
                    elif cp < 0x800:
                        w[0] = <char>(0xC0 | (cp >> 6))
                        w[1] = <char>(0x80 | (cp & 0x3F))
                        w += 2
                    elif cp < 0x10000:
                        w[0] = <char>(0xE0 | (cp >> 12))
                        w[1] = <char>(0x80 | ((cp >> 6) & 0x3F))
                        w[2] = <char>(0x80 | (cp & 0x3F))
                        w += 3
                    else:
                        w[0] = <char>(0xF0 | (cp >> 18))
                        w[1] = <char>(0x80 | ((cp >> 12) & 0x3F))
                        w[2] = <char>(0x80 | ((cp >> 6) & 0x3F))
                        w[3] = <char>(0x80 | (cp & 0x3F))
                        w += 4
                    continue
                else:
                    return self.syntax("invalid escape in string", j)
                w += 1
                j += 2
            elif c < 0x20:
                return self.syntax("control character in string", j)
            elif c >= 0x80:
                k = self.utf8_seq(j)
                memcpy(w, p + j, k)
                w += k
                j += k
            else:
                w[0] = <char>c
                w += 1
                j += 1
        out.src = SRC_ARENA
        out.off = a0
        out.len = (w - self.arena) - a0
        if keep:
            self.arena_len = a0 + out.len
        self.i = j + 1
        return 0

    cdef uint32_t hex4(self, Py_ssize_t j) except? 0xFFFFFFFF:
        cdef int a, b, c, d
        if j + 4 > self.n:
            self.syntax("truncated \\u escape", j - 2)
        a = hexval(self.p[j]); b = hexval(self.p[j + 1]); c = hexval(self.p[j + 2]); d = hexval(self.p[j + 3])
        if a < 0 or b < 0 or c < 0 or d < 0:
            self.syntax("invalid \\u escape", j - 2)
        return <uint32_t>((a << 12) | (b << 8) | (c << 4) | d)

    cdef int number(self, NumTok* t) except -1:
        cdef const uint8_t* p = self.p
        cdef Py_ssize_t n = self.n, i = self.i
        cdef bint eneg = False
        cdef int64_t e = 0
        t.start = i
        t.neg = False
        t.is_int = True
        if p[i] == 0x2D:
            t.neg = True
            i += 1
        if i >= n or not is_digit(p[i]):
            return self.syntax("invalid number", t.start)
        t.int_s = i
        if p[i] == 0x30:
            i += 1
        else:
            while i < n and is_digit(p[i]):
                i += 1
        t.int_e = i
        t.frac_s = t.frac_e = i
        if i < n and p[i] == 0x2E:
            i += 1
            t.is_int = False
            t.frac_s = i
            while i < n and is_digit(p[i]):
                i += 1
            t.frac_e = i
            if t.frac_e == t.frac_s:
                return self.syntax("invalid number", t.start)
        if i < n and (p[i] == 0x65 or p[i] == 0x45):
            i += 1
            t.is_int = False
            if i < n and (p[i] == 0x2B or p[i] == 0x2D):
                eneg = p[i] == 0x2D
                i += 1
            if i >= n or not is_digit(p[i]):
                return self.syntax("invalid number", t.start)
            while i < n and is_digit(p[i]):
                if e < EXP_CAP:
                    e = e * 10 + (p[i] - 0x30)
                i += 1
            if e > EXP_CAP:
                e = EXP_CAP
        t.exp = -e if eneg else e
        t.end = i
        self.i = i
        return 0

    cdef int number_value(self, NumTok* t, double* out) except -1:
        """Nearest float64 of the number; 1 when it is out of the float64 range."""
        cdef const uint8_t* p = self.p
        cdef uint64_t m = 0
        cdef int sig = 0
        cdef Py_ssize_t k
        cdef int64_t e
        cdef double d
        cdef char* buf
        for k in range(t.int_s, t.int_e):
            if m or p[k] != 0x30:
                m = m * 10 + (p[k] - 0x30)
                sig += 1
                if sig > 15:
                    break
        if sig <= 15:
            for k in range(t.frac_s, t.frac_e):
                if m or p[k] != 0x30:
                    m = m * 10 + (p[k] - 0x30)
                    sig += 1
                    if sig > 15:
                        break
        if sig <= 15:
            # Clinger's fast path: exact mantissa and power of ten, one rounding
            if m == 0:
                out[0] = -0.0 if t.neg else 0.0
                return 0
            e = t.exp - (t.frac_e - t.frac_s)
            if 0 <= e <= 22:
                d = <double>m * POW10[e]
                out[0] = -d if t.neg else d
                return 0
            if -22 <= e < 0:
                d = <double>m / POW10[-e]
                out[0] = -d if t.neg else d
                return 0
        # correctly rounded conversion of the text (Python's own float())
        self.arena_reserve(t.end - t.start + 1)
        buf = self.arena + self.arena_len
        memcpy(buf, p + t.start, t.end - t.start)
        buf[t.end - t.start] = 0
        d = PyOS_string_to_double(buf, NULL, NULL)
        if d == float("inf") or d == float("-inf"):
            return 1
        out[0] = d
        return 0

    cdef int literal(self, const char* word, Py_ssize_t size) except -1:
        if self.i + size > self.n or memcmp(self.p + self.i, word, size) != 0:
            return self.syntax("invalid literal", self.i)
        self.i += size
        return 0

    cdef int skip_value(self, int depth) except -1:
        """Check and pass over any JSON value at i (a container there is at ``depth``)."""
        cdef StrTok s
        cdef NumTok t
        cdef uint8_t c
        self.more("a value")
        c = self.p[self.i]
        if c == 0x22:
            return self.string(&s, False)
        if c == 0x7B or c == 0x5B:
            if depth > C_MAX_DEPTH:
                return self.syntax(f"nesting deeper than {C_MAX_DEPTH}", self.i)
            self.i += 1
            self.ws()
            self.more("a value")
            if (c == 0x7B and self.p[self.i] == 0x7D) or (c == 0x5B and self.p[self.i] == 0x5D):
                self.i += 1
                return 0
            while True:
                if c == 0x7B:
                    self.ws()
                    self.more("a key")
                    if self.p[self.i] != 0x22:
                        return self.syntax("expected a key", self.i)
                    self.string(&s, False)
                    self.colon()
                self.ws()
                self.skip_value(depth + 1)
                self.ws()
                self.more("',' or the end of a container")
                if self.p[self.i] == 0x2C:
                    self.i += 1
                    continue
                if (c == 0x7B and self.p[self.i] == 0x7D) or (c == 0x5B and self.p[self.i] == 0x5D):
                    self.i += 1
                    return 0
                return self.syntax("expected ',' or the end of a container", self.i)
        if c == 0x74:
            return self.literal("true", 4)
        if c == 0x66:
            return self.literal("false", 5)
        if c == 0x6E:
            return self.literal("null", 4)
        if c == 0x2D or is_digit(c):
            return self.number(&t)
        return self.syntax("expected a value", self.i)

    cdef int colon(self) except -1:
        self.ws()
        self.more("':'")
        if self.p[self.i] != 0x3A:
            return self.syntax("expected ':'", self.i)
        self.i += 1
        self.ws()
        return 0

    cdef int key_id(self, StrTok* k) noexcept:
        cdef const uint8_t* s = self.str_ptr(k.src, k.off)
        cdef Py_ssize_t n = k.len
        if n == 2 and memcmp(s, b"ts", 2) == 0:
            return K_TS
        if n == 3 and memcmp(s, b"seq", 3) == 0:
            return K_SEQ
        if n == 5 and memcmp(s, b"value", 5) == 0:
            return K_VALUE
        if n == 6:
            if memcmp(s, b"metric", 6) == 0:
                return K_METRIC
            if memcmp(s, b"device", 6) == 0:
                return K_DEVICE
            if memcmp(s, b"values", 6) == 0:
                return K_VALUES
        if n == 7 and memcmp(s, b"quality", 7) == 0:
            return K_QUALITY
        return K_UNKNOWN

    cdef str where(self, Py_ssize_t elem):
        return f"[{elem}]" if elem >= 0 else "payload"

    # ------------------------------------------------------------ content

    cdef int reading_value(self, double* out, int depth, Py_ssize_t elem, str key) except -1:
        """A reading's value at i: a number or true/false. 1 when it broke a rule."""
        cdef NumTok t
        cdef uint8_t c
        cdef Py_ssize_t off = self.i
        self.more("a value")
        c = self.p[self.i]
        if c == 0x2D or is_digit(c):
            self.number(&t)
            if self.number_value(&t, out):
                self.rule(InvalidValue, f"{self.where(elem)} {key}: number out of the float64 range", off)
                return 1
            return 0
        if c == 0x74:
            self.literal("true", 4)
            out[0] = 1.0
            return 0
        if c == 0x66:
            self.literal("false", 5)
            out[0] = 0.0
            return 0
        self.skip_value(depth)
        self.rule(InvalidValue, f"{self.where(elem)} {key}: must be a number or true/false", off)
        return 1

    cdef int uint_field(self, uint64_t* out, uint64_t hi, int depth, Py_ssize_t elem, str key) except -1:
        """An integer literal in 0..hi at i (``-0`` is 0). 1 when it broke a rule."""
        cdef NumTok t
        cdef Py_ssize_t off = self.i, k
        cdef uint64_t v = 0
        cdef uint8_t c = self.p[self.i]
        if not (c == 0x2D or is_digit(c)):
            self.skip_value(depth)
            self.rule(InvalidValue, f"{self.where(elem)} {key}: must be an integer in 0..{hi}", off)
            return 1
        self.number(&t)
        if not t.is_int:
            self.rule(InvalidValue, f"{self.where(elem)} {key}: must be an integer in 0..{hi}", off)
            return 1
        if t.int_e - t.int_s > 20:
            self.rule(InvalidValue, f"{self.where(elem)} {key}: outside 0..{hi}", off)
            return 1
        for k in range(t.int_s, t.int_e):
            c = self.p[k] - 0x30
            if v > UINT64_MAX_DIV10 or (v == UINT64_MAX_DIV10 and c > 5):
                self.rule(InvalidValue, f"{self.where(elem)} {key}: outside 0..{hi}", off)
                return 1
            v = v * 10 + c
        if v > hi or (t.neg and v != 0):
            self.rule(InvalidValue, f"{self.where(elem)} {key}: outside 0..{hi}", off)
            return 1
        out[0] = v
        return 0

    cdef int ts_field(self, int64_t* out, int depth, Py_ssize_t elem) except -1:
        """``ts`` at i: seconds (exact) or RFC 3339. 1 when it broke a rule."""
        cdef NumTok t
        cdef StrTok s
        cdef Py_ssize_t off = self.i
        cdef uint64_t us
        cdef uint8_t c = self.p[self.i]
        if c == 0x2D or is_digit(c):
            self.number(&t)
            if (scale_digits(self.p, t.int_s, t.int_e, t.frac_s, t.frac_e,
                             t.exp - (t.frac_e - t.frac_s) + 6, &us)
                    or us > (<uint64_t>INT64_MAX + (1 if t.neg else 0))):
                self.rule(InvalidValue, f"{self.where(elem)} ts: seconds outside the µs range of an i64", off)
                return 1
            out[0] = -<int64_t>us if t.neg else <int64_t>us
            return 0
        if c == 0x22:
            self.string(&s, False)
            if rfc3339(self.str_ptr(s.src, s.off), s.len, out):
                self.rule(InvalidValue, f"{self.where(elem)} ts: not an RFC 3339 date-time", off)
                return 1
            return 0
        self.skip_value(depth)
        self.rule(InvalidValue, f"{self.where(elem)} ts: must be a number or an RFC 3339 string", off)
        return 1

    cdef int values_object(self, int depth, Py_ssize_t elem) except -1:
        """``values`` at i (an object): buffers one reading per entry."""
        cdef StrTok s
        cdef PendingReading* r
        cdef Py_ssize_t key_off, k, first_row = self.nrows
        cdef double v
        cdef uint64_t h
        cdef bint dup
        if depth > C_MAX_DEPTH:
            return self.syntax(f"nesting deeper than {C_MAX_DEPTH}", self.i)
        self.i += 1
        self.ws()
        self.more("a key")
        if self.p[self.i] == 0x7D:
            self.i += 1
            return 0
        while True:
            self.ws()
            self.more("a key")
            if self.p[self.i] != 0x22:
                return self.syntax("expected a key", self.i)
            key_off = self.i
            self.string(&s, True)
            self.colon()
            self.more("a value")
            if self.err_cls is not None:
                self.skip_value(depth + 1)
            elif s.len == 0:
                self.skip_value(depth + 1)
                self.rule(InvalidValue, f"{self.where(elem)} values: a metric name must not be empty", key_off)
            else:
                h = fnv1a(self.str_ptr(s.src, s.off), s.len)
                dup = False
                for k in range(first_row, self.nrows):
                    r = &self.rows[k]
                    if (r.name_hash == h and r.name_len == s.len
                            and memcmp(self.str_ptr(r.name_src, r.name_off), self.str_ptr(s.src, s.off), s.len) == 0):
                        dup = True
                        break
                if dup:
                    self.skip_value(depth + 1)
                    self.rule(InvalidValue, f"{self.where(elem)} values: duplicate metric", key_off)
                elif self.reading_value(&v, depth + 1, elem, "values entry") == 0:
                    r = self.new_row()
                    r.name_src = s.src
                    r.name_off = s.off
                    r.name_len = s.len
                    r.name_hash = h
                    r.value = v
            self.ws()
            self.more("',' or '}'")
            if self.p[self.i] == 0x2C:
                self.i += 1
                continue
            if self.p[self.i] == 0x7D:
                self.i += 1
                return 0
            return self.syntax("expected ',' or '}'", self.i)

    cdef int reading_object(self, int depth, Py_ssize_t elem) except -1:
        """A reading object at i (shape 1 or 2); buffers its readings."""
        cdef StrTok k, s
        cdef Py_ssize_t key_off, val_off, obj_off = self.i, first_row = self.nrows, j
        cdef int kid
        cdef uint32_t seen = 0
        cdef double value = 0.0
        cdef int64_t ts = self.recv_us
        cdef uint64_t seq = 0, quality = 0
        cdef StrTok metric, device
        cdef PendingReading* r
        cdef bint failed_before = self.err_cls is not None
        metric.src = SRC_PAYLOAD
        metric.off = metric.len = 0
        device.src = SRC_TOPIC if self.topic is not None else SRC_NONE
        device.off = device.len = 0
        if depth > C_MAX_DEPTH:
            return self.syntax(f"nesting deeper than {C_MAX_DEPTH}", self.i)
        self.i += 1
        self.ws()
        self.more("a key")
        if self.p[self.i] == 0x7D:
            self.i += 1
        else:
            while True:
                self.ws()
                self.more("a key")
                if self.p[self.i] != 0x22:
                    return self.syntax("expected a key", self.i)
                key_off = self.i
                self.string(&k, False)
                kid = self.key_id(&k)
                self.colon()
                self.more("a value")
                val_off = self.i
                if kid == K_UNKNOWN or self.err_cls is not None:
                    self.skip_value(depth + 1)
                elif seen & (1u << kid):
                    self.skip_value(depth + 1)
                    self.rule(InvalidValue, f"{self.where(elem)}: duplicate key", key_off)
                else:
                    seen |= 1u << kid
                    if kid == K_METRIC or kid == K_DEVICE:
                        if self.p[self.i] != 0x22:
                            self.skip_value(depth + 1)
                            self.rule(InvalidValue, f"{self.where(elem)} {'metric' if kid == K_METRIC else 'device'}: must be a string", val_off)
                        else:
                            self.string(&s, True)
                            if kid == K_METRIC:
                                if s.len == 0:
                                    self.rule(InvalidValue, f"{self.where(elem)} metric: must not be empty", val_off)
                                metric = s
                            elif self.topic is not None:
                                if s.len != self.topic_len or memcmp(self.str_ptr(s.src, s.off), self.topic_utf8, s.len) != 0:
                                    self.rule(DeviceMismatch, f"{self.where(elem)}: payload device "
                                              f"{PyUnicode_DecodeUTF8(<char*>self.str_ptr(s.src, s.off), s.len, NULL)!r}, "
                                              f"topic device {self.topic!r}", val_off)
                            else:
                                device = s
                    elif kid == K_VALUE:
                        self.reading_value(&value, depth + 1, elem, "value")
                    elif kid == K_TS:
                        self.ts_field(&ts, depth + 1, elem)
                    elif kid == K_SEQ:
                        self.uint_field(&seq, 0xFFFFFFFFFFFFFFFFULL, depth + 1, elem, "seq")
                    elif kid == K_QUALITY:
                        self.uint_field(&quality, 2, depth + 1, elem, "quality")
                    else:  # K_VALUES
                        if self.p[self.i] == 0x7B:
                            self.values_object(depth + 1, elem)
                        else:
                            self.skip_value(depth + 1)
                            self.rule(InvalidValue, f"{self.where(elem)} values: must be an object", val_off)
                self.ws()
                self.more("',' or '}'")
                if self.p[self.i] == 0x2C:
                    self.i += 1
                    continue
                if self.p[self.i] == 0x7D:
                    self.i += 1
                    break
                return self.syntax("expected ',' or '}'", self.i)
        if self.err_cls is not None:
            return 0
        if seen & (1u << K_VALUES):
            if seen & ((1u << K_METRIC) | (1u << K_VALUE)):
                self.rule(InvalidValue, f"{self.where(elem)}: has both 'values' and 'metric'/'value'", obj_off)
                return 0
        elif not (seen & (1u << K_METRIC)) or not (seen & (1u << K_VALUE)):
            self.rule(InvalidValue, f"{self.where(elem)}: '{'metric' if not (seen & (1u << K_METRIC)) else 'value'}' is missing (or use 'values')", obj_off)
            return 0
        if device.src == SRC_NONE:
            self.rule(InvalidValue, f"{self.where(elem)}: no device: the topic names none and 'device' is missing", obj_off)
            return 0
        if not (seen & (1u << K_VALUES)):
            r = self.new_row()
            r.name_src = metric.src
            r.name_off = metric.off
            r.name_len = metric.len
            r.name_hash = fnv1a(self.str_ptr(metric.src, metric.off), metric.len)
            r.value = value
        for j in range(first_row, self.nrows):
            r = &self.rows[j]
            r.ts = ts
            r.seq = seq
            r.quality = <uint8_t>quality
            r.dev_src = device.src
            r.dev_off = device.off
            r.dev_len = device.len
        return 0

    # ------------------------------------------------------------ batch

    cdef NameSlot* name_slot(self, uint8_t src, Py_ssize_t off, Py_ssize_t size, uint64_t h) except NULL:
        """The cache slot of a UTF-8 name, creating its str on first sight."""
        cdef const uint8_t* s = self.str_ptr(src, off)
        cdef Py_ssize_t mask = N_SLOTS - 1, k = <Py_ssize_t>(h & mask), ulen
        cdef NameSlot* slot
        cdef const char* u
        while True:
            slot = &self.slots[k]
            if slot.name == NULL:
                break
            if slot.hash == h:
                u = PyUnicode_AsUTF8AndSize(<object>slot.name, &ulen)
                if ulen == size and memcmp(u, s, size) == 0:
                    return slot
            k = (k + 1) & mask
        if self.nslots >= N_SLOTS // 2:
            # bounded: a payload stream with ever new names resets the cache
            self._clear_slots()
            return self.name_slot(src, off, size, h)
        name = PyUnicode_DecodeUTF8(<const char*>s, size, NULL)
        slot.hash = h
        slot.name = <PyObject*>name
        Py_INCREF(name)
        slot.dev_idx = slot.met_idx = 0xFFFFFFFF
        self.nslots += 1
        return slot

    cdef int push_rows(self, ReadingBatch batch) except -1:
        cdef Py_ssize_t j
        cdef PendingReading* r
        cdef NameSlot* slot
        cdef uint32_t dev, met
        batch.reserve(self.nrows)
        for j in range(self.nrows):
            r = &self.rows[j]
            if r.dev_src == SRC_TOPIC:
                if not (<Py_ssize_t>self.topic_dev_idx < PyList_GET_SIZE(batch.devices)
                        and PyList_GET_ITEM(batch.devices, self.topic_dev_idx) == <PyObject*>self.topic):
                    self.topic_dev_idx = <uint32_t>batch.intern_device(self.topic)
                dev = self.topic_dev_idx
            else:
                slot = self.name_slot(r.dev_src, r.dev_off, r.dev_len,
                                      fnv1a(self.str_ptr(r.dev_src, r.dev_off), r.dev_len))
                if not (<Py_ssize_t>slot.dev_idx < PyList_GET_SIZE(batch.devices)
                        and PyList_GET_ITEM(batch.devices, slot.dev_idx) == slot.name):
                    slot.dev_idx = <uint32_t>batch.intern_device(<str>slot.name)
                dev = slot.dev_idx
            slot = self.name_slot(r.name_src, r.name_off, r.name_len, r.name_hash)
            if not (<Py_ssize_t>slot.met_idx < PyList_GET_SIZE(batch.metrics)
                    and PyList_GET_ITEM(batch.metrics, slot.met_idx) == slot.name):
                slot.met_idx = <uint32_t>batch.intern_metric(<str>slot.name)
            met = slot.met_idx
            batch.push(dev, met, r.ts, r.value, r.quality, r.seq, self.recv_us)
        return 0

    cdef Py_ssize_t c_decode(self, str topic_device, const uint8_t* p, Py_ssize_t n,
                             int64_t recv_ns, ReadingBatch batch) except -1:
        cdef Py_ssize_t elem = 0, off
        cdef uint8_t c
        self.p = p
        self.n = n
        self.i = 0
        self.recv_us = recv_ns // 1000 if recv_ns >= 0 else -((-recv_ns + 999) // 1000)
        self.arena_len = 0
        self.nrows = 0
        self.err_cls = None
        self.err_msg = None
        self.topic = topic_device
        if topic_device is not None:
            self.topic_utf8 = PyUnicode_AsUTF8AndSize(topic_device, &self.topic_len)
        try:
            self.ws()
            self.more("a value")
            c = p[self.i]
            if c == 0x7B:
                self.reading_object(1, -1)
            elif c == 0x5B:
                self.i += 1
                self.ws()
                self.more("a value")
                if p[self.i] == 0x5D:
                    self.i += 1
                else:
                    while True:
                        self.ws()
                        self.more("a value")
                        if p[self.i] == 0x7B:
                            self.reading_object(2, elem)
                        else:
                            off = self.i
                            self.skip_value(2)
                            self.rule(InvalidValue, f"[{elem}]: must be an object", off)
                        elem += 1
                        self.ws()
                        self.more("',' or ']'")
                        if p[self.i] == 0x2C:
                            self.i += 1
                            continue
                        if p[self.i] == 0x5D:
                            self.i += 1
                            break
                        self.syntax("expected ',' or ']'", self.i)
            else:
                off = self.i
                self.skip_value(1)
                self.rule(InvalidValue, "payload must be an object or an array of objects", off)
            self.ws()
            if self.i != n:
                self.syntax("extra data after the JSON value", self.i)
            if self.err_cls is not None:
                raise self.err_cls(self.err_msg, self.err_off)
            batch.c_begin()
            try:
                self.push_rows(batch)
            except BaseException:
                batch.c_rollback()
                raise
            return self.nrows
        finally:
            self.p = NULL
            self.topic = None
            self.err_cls = None
