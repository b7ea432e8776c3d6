# C-level API of the columnar reading batch; decoders and the entry codec cimport it.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef class ReadingBatch:
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef uint32_t* dev
    cdef uint32_t* met
    cdef int64_t* ts_us
    cdef double* value
    cdef uint8_t* quality
    cdef uint64_t* seq
    cdef int64_t* recv_us
    cdef readonly list devices
    cdef readonly list metrics
    cdef dict _dev_index
    cdef dict _met_index
    cdef Py_ssize_t _mark_n
    cdef Py_ssize_t _mark_dev
    cdef Py_ssize_t _mark_met

    cdef int reserve(self, Py_ssize_t extra) except -1
    cdef Py_ssize_t intern_device(self, str name) except -1
    cdef Py_ssize_t intern_metric(self, str name) except -1
    cdef inline int push(self, uint32_t dev, uint32_t met, int64_t ts, double v,
                         uint8_t q, uint64_t s, int64_t recv) except -1:
        if self.n == self.cap:
            self.reserve(1)
        cdef Py_ssize_t i = self.n
        self.dev[i] = dev
        self.met[i] = met
        self.ts_us[i] = ts
        self.value[i] = v
        self.quality[i] = q
        self.seq[i] = s
        self.recv_us[i] = recv
        self.n = i + 1
        return 0
    cdef void c_begin(self) noexcept
    cdef void c_rollback(self)
