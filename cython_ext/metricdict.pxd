# C-level API of the metric dictionary: metric_id -> name, and the name's index
# in a ReadingBatch, without a Python object per reading.
from cpython.ref cimport PyObject
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.stdint cimport uint16_t, uint32_t

from sensorhub._ext.batch cimport ReadingBatch


cdef class MetricDict:
    # names[id] is a new reference to the name of id, or NULL until first use
    cdef PyObject** names
    # idx[id]: where names[id] was last interned in a batch; checked before use
    cdef uint32_t* idx
    cdef readonly dict mapping

    cdef str c_name(self, uint16_t metric_id)
    cdef Py_ssize_t _intern(self, ReadingBatch batch, uint16_t metric_id) except -1

    # The index of metric_id's name in batch.metrics. The cached index is used
    # only when that slot of the batch holds this very name object, so a batch
    # that was cleared, rolled back or is another batch can never get a stale
    # index; the check is one pointer compare.
    cdef inline Py_ssize_t index_in(self, ReadingBatch batch, uint16_t metric_id) except -1:
        cdef uint32_t i = self.idx[metric_id]
        cdef PyObject* name = self.names[metric_id]
        if (name != NULL and <Py_ssize_t>i < PyList_GET_SIZE(batch.metrics)
                and PyList_GET_ITEM(batch.metrics, i) == name):
            return i
        return self._intern(batch, metric_id)
