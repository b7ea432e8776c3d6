# cython: freethreading_compatible = False
"""Columnar batch of readings in preallocated C buffers (Cython twin of
``sensorhub.decoders.batch``; see that module for the contract)."""

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

# Growth is geometric up to GROW_STEP rows, then linear in GROW_STEP steps,
# so one oversized payload cannot double a large buffer.
DEF GROW_STEP = 65536
COLUMNS = ("device", "metric", "ts_us", "value", "quality", "seq", "recv_us")


cdef void* _grow(void* p, Py_ssize_t n, size_t item) except NULL:
    cdef void* q = PyMem_Realloc(p, <size_t>n * item)
    if q == NULL:
        raise MemoryError()
    return q


cdef class ReadingBatch:
    def __cinit__(self, Py_ssize_t capacity=1024):
        self.n = 0
        self.cap = 0
        self.devices = []
        self.metrics = []
        self._dev_index = {}
        self._met_index = {}
        self._mark_n = self._mark_dev = self._mark_met = 0
        self.reserve(max(capacity, 16))

    def __dealloc__(self):
        PyMem_Free(self.dev)
        PyMem_Free(self.met)
        PyMem_Free(self.ts_us)
        PyMem_Free(self.value)
        PyMem_Free(self.quality)
        PyMem_Free(self.seq)
        PyMem_Free(self.recv_us)

    cdef int reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.n + extra
        if need <= self.cap:
            return 0
        cdef Py_ssize_t new_cap = self.cap if self.cap else 16
        while new_cap < need:
            new_cap += new_cap if new_cap < GROW_STEP else GROW_STEP
        self.dev = <uint32_t*>_grow(self.dev, new_cap, sizeof(uint32_t))
        self.met = <uint32_t*>_grow(self.met, new_cap, sizeof(uint32_t))
        self.ts_us = <int64_t*>_grow(self.ts_us, new_cap, sizeof(int64_t))
        self.value = <double*>_grow(self.value, new_cap, sizeof(double))
        self.quality = <uint8_t*>_grow(self.quality, new_cap, sizeof(uint8_t))
        self.seq = <uint64_t*>_grow(self.seq, new_cap, sizeof(uint64_t))
        self.recv_us = <int64_t*>_grow(self.recv_us, new_cap, sizeof(int64_t))
        self.cap = new_cap
        return 0

    cdef Py_ssize_t intern_device(self, str name) except -1:
        idx = self._dev_index.get(name)
        if idx is not None:
            return <Py_ssize_t>idx
        cdef Py_ssize_t i = len(self.devices)
        self.devices.append(name)
        self._dev_index[name] = i
        return i

    cdef Py_ssize_t intern_metric(self, str name) except -1:
        idx = self._met_index.get(name)
        if idx is not None:
            return <Py_ssize_t>idx
        cdef Py_ssize_t i = len(self.metrics)
        self.metrics.append(name)
        self._met_index[name] = i
        return i

    cdef void c_begin(self) noexcept:
        self._mark_n = self.n
        self._mark_dev = len(self.devices)
        self._mark_met = len(self.metrics)

    cdef void c_rollback(self):
        cdef Py_ssize_t i
        self.n = self._mark_n
        for i in range(len(self.devices) - 1, self._mark_dev - 1, -1):
            del self._dev_index[self.devices[i]]
        del self.devices[self._mark_dev:]
        for i in range(len(self.metrics) - 1, self._mark_met - 1, -1):
            del self._met_index[self.metrics[i]]
        del self.metrics[self._mark_met:]

    # ---- Python-level API (same as the twin) ----
    def __len__(self):
        return self.n

    @property
    def capacity(self):
        return self.cap

    def begin(self):
        self.c_begin()

    def rollback(self):
        self.c_rollback()

    def clear(self):
        self.n = 0
        self.devices = []
        self.metrics = []
        self._dev_index = {}
        self._met_index = {}
        self._mark_n = self._mark_dev = self._mark_met = 0

    def append(self, str device, str metric, int64_t ts_us, double value,
               int quality, uint64_t seq, int64_t recv_us):
        if quality < 0 or quality > 255:
            raise ValueError("quality must fit in a byte")
        self.push(<uint32_t>self.intern_device(device), <uint32_t>self.intern_metric(metric),
                  ts_us, value, <uint8_t>quality, seq, recv_us)

    def receive_stamped(self, Py_ssize_t start=0):
        """Readings from row ``start`` on whose time is their receive time (the payload gave none)."""
        cdef Py_ssize_t i, k = 0
        if start < 0:
            start = 0
        for i in range(start, self.n):
            if self.ts_us[i] == self.recv_us[i]:
                k += 1
        return k

    def column(self, str name):
        """One column as a Python list (strings for device and metric)."""
        cdef Py_ssize_t i
        if name == "device":
            return [self.devices[self.dev[i]] for i in range(self.n)]
        if name == "metric":
            return [self.metrics[self.met[i]] for i in range(self.n)]
        if name == "ts_us":
            return [self.ts_us[i] for i in range(self.n)]
        if name == "value":
            return [self.value[i] for i in range(self.n)]
        if name == "quality":
            return [self.quality[i] for i in range(self.n)]
        if name == "seq":
            return [self.seq[i] for i in range(self.n)]
        if name == "recv_us":
            return [self.recv_us[i] for i in range(self.n)]
        raise KeyError(name)

    def rows(self):
        """Readings as dicts (for tools and tests, not the hot path)."""
        cdef Py_ssize_t i
        return [
            {
                "device": self.devices[self.dev[i]],
                "metric": self.metrics[self.met[i]],
                "ts_us": self.ts_us[i],
                "value": self.value[i],
                "quality": self.quality[i],
                "seq": self.seq[i],
                "recv_us": self.recv_us[i],
            }
            for i in range(self.n)
        ]
