# C-level API of the Sparkplug B payload decoder (see sensorhub/decoders/sparkplug_py.py).
from libc.stdint cimport int64_t, uint32_t, uint64_t

from sensorhub._ext.batch cimport ReadingBatch


cdef struct SpMetric:
    # one Metric message as read from the wire, before interpretation
    Py_ssize_t offset
    Py_ssize_t name0      # name span; name1 < 0 when the metric has no name
    Py_ssize_t name1
    bint has_alias
    uint64_t alias
    bint has_ts
    uint64_t ts
    uint32_t datatype     # 0 when absent
    bint is_null
    int vf                # field number of the oneof member set last, 0 none
    uint64_t iv           # int_value (low 32 bits), long_value, boolean_value
    double dv             # float_value, double_value


cdef struct SpHeader:
    bint has_ts
    uint64_t ts
    bint has_seq
    uint64_t seq


cdef class Decoder:
    cdef public Py_ssize_t metrics_skipped
    cdef public Py_ssize_t nulls_skipped
    cdef dict _names

    cdef str _name(self, const unsigned char* p, SpMetric* m)
    cdef Py_ssize_t c_decode(self, str device, const unsigned char* p, Py_ssize_t n,
                             int64_t recv_us, ReadingBatch b, dict aliases, dict types,
                             Py_ssize_t* skipped, Py_ssize_t* nulls) except -1
