# C-level API of the firmware frame decoder (spec/firmware-frame.md).
from libc.stdint cimport int64_t, uint8_t, uint32_t

from sensorhub._ext.batch cimport ReadingBatch
from sensorhub._ext.metricdict cimport MetricDict


cdef class Decoder:
    cdef readonly MetricDict metrics
    # the last frame's device id, kept as bytes and as the interned str, so a
    # stream of frames from one device creates one str, not one per frame
    cdef uint8_t last_id[64]
    cdef Py_ssize_t last_id_len
    cdef str last_dev
    cdef uint32_t last_dev_idx

    # Decode the frame at p[0:n] into batch; returns the number of readings.
    cdef Py_ssize_t c_decode(self, str topic_device, const uint8_t* p, Py_ssize_t n,
                             int64_t recv_ns, ReadingBatch batch) except -1
