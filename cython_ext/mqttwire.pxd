# C-level API of the MQTT framing of a subscribing client (twin: sensorhub/sources/mqttwire_py.py).
from libc.stdint cimport int64_t, uint8_t


cdef class PacketReader:
    cdef readonly int protocol
    cdef readonly Py_ssize_t max_packet
    cdef object _frame
    # bytes of an incomplete packet, kept between reads
    cdef bytearray _buf
    # do not parse again before the kept bytes reach this length
    cdef Py_ssize_t _need
    cdef dict _aliases
    cdef bint _failed
    cdef public long long dups
    cdef public long long retained
    cdef public long long packets
    # the last CONNACK said no session: retained messages are a new subscription's replays
    cdef public bint new_session
    # topics whose replay was handed out on this connection
    cdef set _replayed

    # Parses whole packets of p[0:n]; returns the bytes consumed.
    cdef Py_ssize_t c_parse(self, const uint8_t* p, Py_ssize_t n, list frames, list controls,
                            object recv_ns, int64_t token_base) except -1
