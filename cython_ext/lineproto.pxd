# C-level API of the Influx line protocol decoder (see sensorhub/decoders/lineproto_py.py).
from libc.stdint cimport int64_t, uint64_t

from sensorhub._ext.batch cimport ReadingBatch


cdef struct Field:
    # one numeric or boolean field of the line being decoded
    Py_ssize_t k0      # key span in the payload (escaped, as sent)
    Py_ssize_t k1
    double v


cdef class Decoder:
    cdef public Py_ssize_t strings_skipped
    cdef dict _metrics
    cdef dict _devices
    # direct-mapped cache of raw (measurement, field key) -> metric name and its
    # index in the last batch, so that a repeated name costs no Python object
    cdef uint64_t[256] _mhash
    cdef Py_ssize_t[256] _midx
    cdef list _mkeys
    cdef list _mnames
    # the last device tag seen, likewise
    cdef bytes _dkey
    cdef str _dname
    cdef Py_ssize_t _didx
    cdef Field* _fields
    cdef Py_ssize_t _fcap

    cdef int _reserve_fields(self, Py_ssize_t need) except -1
    cdef str _device_name(self, const char* p, Py_ssize_t v0, Py_ssize_t v1)
    cdef str _metric_name(self, bytes key, const char* p, Py_ssize_t m0, Py_ssize_t m1,
                          Py_ssize_t k0, Py_ssize_t k1)
    cdef Py_ssize_t _metric_index(self, ReadingBatch b, const char* p, Py_ssize_t m0,
                                  Py_ssize_t m1, Py_ssize_t k0, Py_ssize_t k1) except -1
    cdef Py_ssize_t _device_index(self, ReadingBatch b, const char* p, Py_ssize_t v0,
                                  Py_ssize_t v1) except -1
    cdef Py_ssize_t c_decode(self, str topic_device, const char* p, Py_ssize_t n,
                             int64_t recv_us, ReadingBatch b, Py_ssize_t* strings) except -1
