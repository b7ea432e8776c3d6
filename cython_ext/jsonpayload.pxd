# C-level API of the JSON payload decoder (spec/payloads.md).
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from cpython.ref cimport PyObject

from sensorhub._ext.batch cimport ReadingBatch


# A reading found in the payload, buffered until the whole payload is known
# to be valid. Names point into the payload (src 0) or the decoder's arena
# of unescaped strings (src 1); a device of src 2 is the topic's.
cdef struct PendingReading:
    uint8_t name_src
    uint8_t dev_src
    Py_ssize_t name_off
    Py_ssize_t name_len
    uint64_t name_hash
    Py_ssize_t dev_off
    Py_ssize_t dev_len
    double value
    int64_t ts
    uint64_t seq
    uint8_t quality


# One entry of the name cache: UTF-8 bytes -> str, and the str's last index
# in a batch's device and metric tables (checked by identity before use).
cdef struct NameSlot:
    uint64_t hash
    PyObject* name
    uint32_t dev_idx
    uint32_t met_idx


cdef struct NumTok:
    Py_ssize_t start
    Py_ssize_t end
    Py_ssize_t int_s
    Py_ssize_t int_e
    Py_ssize_t frac_s
    Py_ssize_t frac_e
    int64_t exp
    bint neg
    bint is_int


cdef struct StrTok:
    uint8_t src
    Py_ssize_t off
    Py_ssize_t len


cimport cython


@cython.final
cdef class Decoder:
    # the payload being decoded and the read position
    cdef const uint8_t* p
    cdef Py_ssize_t n
    cdef Py_ssize_t i
    cdef int64_t recv_us
    # unescaped strings (names and devices kept until the end, keys and
    # timestamps only until the next string)
    cdef char* arena
    cdef Py_ssize_t arena_len
    cdef Py_ssize_t arena_cap
    cdef PendingReading* rows
    cdef Py_ssize_t nrows
    cdef Py_ssize_t rows_cap
    # the first rule broken (raised once the whole payload is known to be JSON)
    cdef object err_cls
    cdef str err_msg
    cdef Py_ssize_t err_off
    # the topic's device as str and UTF-8
    cdef str topic
    cdef const char* topic_utf8
    cdef Py_ssize_t topic_len
    cdef uint32_t topic_dev_idx
    cdef NameSlot* slots
    cdef Py_ssize_t nslots

    # internal steps of the scanner
    cdef void _clear_slots(self) noexcept
    cdef int syntax(self, str msg, Py_ssize_t off) except -1
    cdef int rule(self, cls, str msg, Py_ssize_t off) except -1
    cdef int arena_reserve(self, Py_ssize_t extra) except -1
    cdef PendingReading* new_row(self) except NULL
    cdef const uint8_t* str_ptr(self, uint8_t src, Py_ssize_t off) noexcept
    cdef void ws(self) noexcept
    cdef int more(self, str what) except -1
    cdef Py_ssize_t utf8_seq(self, Py_ssize_t j) except -1
    cdef int string(self, StrTok* out, bint keep) except -1
    cdef uint32_t hex4(self, Py_ssize_t j) except? 0xFFFFFFFF
    cdef int number(self, NumTok* t) except -1
    cdef int number_value(self, NumTok* t, double* out) except -1
    cdef int literal(self, const char* word, Py_ssize_t size) except -1
    cdef int skip_value(self, int depth) except -1
    cdef int colon(self) except -1
    cdef int key_id(self, StrTok* k) noexcept
    cdef str where(self, Py_ssize_t elem)
    cdef int reading_value(self, double* out, int depth, Py_ssize_t elem, str key) except -1
    cdef int uint_field(self, uint64_t* out, uint64_t hi, int depth, Py_ssize_t elem, str key) except -1
    cdef int ts_field(self, int64_t* out, int depth, Py_ssize_t elem) except -1
    cdef int values_object(self, int depth, Py_ssize_t elem) except -1
    cdef int reading_object(self, int depth, Py_ssize_t elem) except -1
    cdef NameSlot* name_slot(self, uint8_t src, Py_ssize_t off, Py_ssize_t size, uint64_t h) except NULL
    cdef int push_rows(self, ReadingBatch batch) except -1

    cdef Py_ssize_t c_decode(self, str topic_device, const uint8_t* p, Py_ssize_t n,
                             int64_t recv_ns, ReadingBatch batch) except -1
