# cython: freethreading_compatible = False
"""Metric dictionary for frame decoding: metric_id -> name in a C table.

Twin: ``sensorhub.decoders.frame_py.MetricDict``. The table has one slot per
possible id (65,536 pointers, allocated zeroed, so untouched pages cost no
memory); a slot is filled on first use with the configured name or ``m<id>``
and keeps that one string object for the decoder's life, which lets
``index_in`` recognise it in a batch by identity.
"""

from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from libc.stdint cimport uint16_t, uint32_t
from libc.stdlib cimport calloc, free

from sensorhub._ext.batch cimport ReadingBatch

DEF N_IDS = 65536


cdef class MetricDict:
    """metric_id -> metric name; ids the dictionary does not name are ``m<id>``."""

    def __cinit__(self, dictionary=None):
        self.names = <PyObject**>calloc(N_IDS, sizeof(PyObject*))
        self.idx = <uint32_t*>calloc(N_IDS, sizeof(uint32_t))
        if self.names == NULL or self.idx == NULL:
            raise MemoryError()
        self.mapping = {}
        if dictionary is None:
            return
        for k, v in dictionary.items():
            if not 0 <= k <= 0xFFFF:
                raise ValueError(f"metric id {k} is outside 0..65535")
            if not isinstance(v, str) or not v:
                raise ValueError(f"metric id {k} needs a non-empty name")
            self.mapping[int(k)] = v

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.names != NULL:
            for i in range(N_IDS):
                Py_XDECREF(self.names[i])
            free(self.names)
        free(self.idx)

    cdef str c_name(self, uint16_t metric_id):
        cdef PyObject* p = self.names[metric_id]
        if p != NULL:
            return <str>p
        name = self.mapping.get(metric_id)
        if name is None:
            name = f"m{metric_id}"
        Py_INCREF(name)
        self.names[metric_id] = <PyObject*>name
        return name

    cdef Py_ssize_t _intern(self, ReadingBatch batch, uint16_t metric_id) except -1:
        cdef Py_ssize_t i = batch.intern_metric(self.c_name(metric_id))
        self.idx[metric_id] = <uint32_t>i
        return i

    def name(self, int metric_id):
        """The name of ``metric_id`` (0..65535)."""
        if not 0 <= metric_id <= 0xFFFF:
            raise ValueError(f"metric id {metric_id} is outside 0..65535")
        return self.c_name(<uint16_t>metric_id)
