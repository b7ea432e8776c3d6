"""Payload decoders: bytes from a source into a columnar :class:`ReadingBatch`.

Every payload format has a Cython decoder ``sensorhub._ext.<stem>`` and a
pure-Python twin ``sensorhub.decoders.<stem>_py`` with the same behaviour
(the twin is the readable reference and the test oracle):

=============  =============  ==========================================
format         stem           payload
=============  =============  ==========================================
``frame``      ``frame``      binary firmware frame (spec/firmware-frame.md)
``json``       ``jsonpayload``  JSON readings (spec/payloads.md)
``ilp``        ``lineproto``  Influx line protocol
``sparkplug``  ``sparkplug``  Sparkplug B protobuf
=============  =============  ==========================================

Each module exposes ``class Decoder``::

    Decoder(dictionary: dict[int, str] | None = None)
    Decoder.decode(topic_device: str | None, payload: bytes, recv_ns: int, batch) -> int

``decode`` appends the payload's readings to ``batch`` and returns how many it
appended. Invalid input raises a :class:`sensorhub.errors.DecodeError`
subclass whose message names the rule broken and the byte offset, and leaves
the batch exactly as it was before the call. ``dictionary`` names frame
metric ids (``Settings.dictionary``); ids it does not name become ``m<id>``.
``topic_device`` is the device the topic names (``None`` when it names none);
a payload that names another device is a :class:`DeviceMismatch`.

Which of the two implementations is used is decided once, for the whole
process, by :mod:`sensorhub._impl` (``SENSORHUB_PURE_PYTHON=1`` forces the
twins); a decoder and its batch always come from the same implementation.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from typing import Any, Protocol

from sensorhub import _impl
from sensorhub.errors import UnknownFormat

__all__ = [
    "FORMATS",
    "Decoder",
    "ReadingBatch",
    "decode_to_rows",
    "make_decoder",
]

#: format name -> module stem (``sensorhub._ext.<stem>`` / ``sensorhub.decoders.<stem>_py``)
FORMATS: Mapping[str, str] = {
    "frame": "frame",
    "json": "jsonpayload",
    "ilp": "lineproto",
    "sparkplug": "sparkplug",
}

#: the selected columnar batch class (Cython ``sensorhub._ext.batch`` or its twin)
ReadingBatch: Any = _impl.load("batch", "sensorhub.decoders.batch_py").ReadingBatch

#: columns of :func:`decode_to_rows` rows, in output order
ROW_KEYS = ("device", "metric", "ts_us", "value", "quality", "seq")


class Decoder(Protocol):
    """What every format's ``Decoder`` provides (Cython class or twin)."""

    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int:
        """Append the payload's readings to ``batch``; return how many."""
        ...


def _module(fmt: str) -> Any:
    stem = FORMATS.get(fmt)
    if stem is None:
        raise UnknownFormat(f"{fmt!r} is not one of {', '.join(FORMATS)}")
    name = (
        f"sensorhub._ext.{stem}"
        if _impl.IMPLEMENTATION == "cython"
        else f"sensorhub.decoders.{stem}_py"
    )
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only "this decoder is not installed" is an unknown format; a missing
        # dependency inside an installed decoder is a bug and must surface.
        if exc.name != name:
            raise
        raise UnknownFormat(f"{fmt!r}: decoder module {name} is not available") from None


def make_decoder(fmt: str, dictionary: Mapping[int, str] | None = None) -> Decoder:
    """A decoder for ``fmt`` (one of :data:`FORMATS`) from the selected implementation.

    Raises :class:`UnknownFormat` for a format that is not known or not installed.
    """
    decoder: Decoder = _module(fmt).Decoder(dict(dictionary) if dictionary is not None else None)
    return decoder


def decode_to_rows(
    fmt: str,
    payload: bytes,
    device: str | None = None,
    dictionary: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Decode one payload into row dicts (tools and tests; not the hot path).

    Each row has the keys ``device``, ``metric``, ``ts_us``, ``value``,
    ``quality`` and ``seq``; the receive time is now. ``device`` plays the role
    of the topic's device. Invalid input raises a :class:`sensorhub.errors.DecodeError` subclass.
    """
    batch = ReadingBatch(64)
    make_decoder(fmt, dictionary).decode(device, bytes(payload), time.time_ns(), batch)
    return [{k: row[k] for k in ROW_KEYS} for row in batch.rows()]
