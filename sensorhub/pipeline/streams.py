"""What a stream entry holds: its field names, and the entry codec in use (Cython or its twin).

An entry carries one packed columnar block (``F_BLOCK``), the source that
wrote it (``F_SOURCE``) and its record kind (``F_KIND``: ``KIND_READINGS``
or ``KIND_TRADES``). Importing this module loads the codec; the key names
are in :mod:`sensorhub.pipeline.keys`, which does not.
"""

from __future__ import annotations

from sensorhub import _impl

codec = _impl.load("entrycodec", "sensorhub.pipeline.entrycodec_py")
encode_block = codec.encode_block
decode_block = codec.decode_block
native_block = codec.native_block

__all__ = [
    "F_BLOCK",
    "F_KIND",
    "F_SOURCE",
    "KIND_READINGS",
    "KIND_TRADES",
    "decode_block",
    "encode_block",
    "native_block",
]

# Stream entry field names (short: they are stored with every entry).
F_BLOCK = b"b"
F_SOURCE = b"s"
F_KIND = b"k"
KIND_READINGS = b"r"
KIND_TRADES = b"t"
