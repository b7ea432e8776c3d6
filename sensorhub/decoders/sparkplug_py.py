"""Sparkplug B payload decoder: the pure-Python twin of ``cython_ext/sparkplug.pyx``.

A hand-written reader of the protobuf wire format for
``org.eclipse.tahu.protobuf.Payload`` (``sparkplug_b.proto`` beside this
module). This module is the readable specification; the Cython module must
give the same readings, error class and offset for every input.

Wire format: varints of at most 10 bytes (the 10th holding one bit);
field numbers 1..2**29-1; wire types 0 (varint), 1 (64-bit), 2 (length
delimited), 5 (32-bit) and groups (3 ... 4, nested at most 32 deep) are
skipped when a field is unknown. As protobuf does, a known field that arrives
with another wire type is skipped as unknown, the last occurrence of a scalar
wins, and so does the last member of a ``oneof``; ``uint32`` fields keep the
low 32 bits of their varint.

Readings, per metric, in this order:

1. ``is_null`` metrics are not readings (counted in ``nulls_skipped``).
2. The name is the metric's ``name`` (UTF-8), else the name its ``alias`` has
   in the birth tables given to :meth:`Decoder.decode_with` (a host's state).
   :meth:`Decoder.decode` has no such state: an alias-only metric raises
   :class:`~sensorhub.errors.UnknownAlias`.
3. The datatype is the metric's ``datatype``, else the one its birth gave it,
   else none. Integer types (Int8..UInt64, DateTime) read ``int_value`` or
   ``long_value``: signed types take the two's complement of their width,
   accepting both the N-bit form and the form sign-extended to the field's
   width (Int8 -1 as 255 or as 0xFFFFFFFF); unsigned types must fit their
   width. Float/Double read ``float_value`` or ``double_value``, Boolean reads
   ``boolean_value`` (1/0). DateTime is a reading whose value is milliseconds
   since the epoch. String, Text, UUID, DataSet, Bytes, File, Template,
   property sets and arrays are not readings (counted in ``metrics_skipped``),
   nor is a metric without a value. Without a datatype the value field
   decides (``int_value``/``long_value`` are unsigned). Datatypes beyond
   Sparkplug 3.0's (> 34) and a value field that does not fit the datatype
   are :class:`~sensorhub.errors.InvalidValue`.
4. ``ts_us`` is the metric's ``timestamp`` (ms), else the payload's, else the
   receive time. ``is_historical`` metrics are stored like any other.
5. ``seq`` = payload timestamp (ms, 0 when absent) × 256 + payload ``seq``
   (0..255, 0 when absent): a re-delivered payload gives the same rows (the
   store deduplicates on device, metric, ts, seq), while two payloads of one
   node never share it even when their metrics share a timestamp. ``quality``
   is 0.

The payload's ``seq`` must be 0..255 and timestamps must fit an int64 count
of microseconds. Errors: the payload's own fields are read first (pass 1,
:meth:`Decoder.header`), then the metrics one by one, each read whole and
then interpreted in the order above.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from sensorhub.errors import InvalidValue, Truncated, UnknownAlias

__all__ = [
    "DATATYPE_NAMES",
    "Decoder",
    "Metric",
    "Payload",
    "parse_payload",
]

DATATYPE_NAMES = (
    "Unknown", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
    "Float", "Double", "Boolean", "String", "DateTime", "Text", "UUID", "DataSet", "Bytes",
    "File", "Template", "PropertySet", "PropertySetList", "Int8Array", "Int16Array",
    "Int32Array", "Int64Array", "UInt8Array", "UInt16Array", "UInt32Array", "UInt64Array",
    "FloatArray", "DoubleArray", "BooleanArray", "StringArray", "DateTimeArray",
)  # fmt: skip
MAX_DATATYPE = len(DATATYPE_NAMES) - 1
#: datatype -> (width in bits, signed) for the integer types
INT_TYPES = {
    1: (8, True), 2: (16, True), 3: (32, True), 4: (64, True),
    5: (8, False), 6: (16, False), 7: (32, False), 8: (64, False), 13: (64, False),
}  # fmt: skip
FLOAT, DOUBLE, BOOLEAN = 9, 10, 11
# value fields of Metric (the oneof)
INT_VALUE, LONG_VALUE, FLOAT_VALUE, DOUBLE_VALUE, BOOLEAN_VALUE = 10, 11, 12, 13, 14
MAX_MS = (2**63 - 1) // 1000
MAX_GROUP_DEPTH = 32
_MAX_FIELD = (1 << 29) - 1
_NAME_CACHE_MAX = 4096


@dataclass
class Metric:
    """One metric as read from the wire (before interpretation)."""

    offset: int
    name: bytes | None = None
    name_offset: int = -1
    alias: int | None = None
    timestamp: int | None = None
    datatype: int | None = None
    is_historical: bool = False
    is_transient: bool = False
    is_null: bool = False
    value_field: int = 0  # field number of the oneof member that was set last, 0 none
    value: Any = None  # int, float, bool or bytes (strings, bytes, datasets, templates raw)


@dataclass
class Payload:
    """A payload's own fields and its metrics (births and deaths; not the hot path)."""

    timestamp: int | None = None
    seq: int | None = None
    metrics: list[Metric] = field(default_factory=list)


def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    start = i
    result = 0
    shift = 0
    while True:
        if i >= end:
            raise Truncated("varint", start)
        b = buf[i]
        i += 1
        if shift == 63 and b > 1:
            raise InvalidValue("varint overflows 64 bits", start)
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _tag(buf: bytes, i: int, end: int) -> tuple[int, int, int]:
    """(field number, wire type, next index) of the tag at ``i``."""
    start = i
    tag, i = _varint(buf, i, end)
    fno = tag >> 3
    if fno == 0:
        raise InvalidValue("field number 0", start)
    if fno > _MAX_FIELD:
        raise InvalidValue("field number too large", start)
    return fno, tag & 7, i


def _skip(buf: bytes, i: int, end: int, fno: int, wt: int, start: int, depth: int = 0) -> int:
    """Index after the value of a field with wire type ``wt`` whose value starts at ``i``."""
    if wt == 0:
        return _varint(buf, i, end)[1]
    if wt == 1:
        if end - i < 8:
            raise Truncated("64-bit field", i)
        return i + 8
    if wt == 2:
        n, j = _varint(buf, i, end)
        if n > end - j:
            raise Truncated("length-delimited field", i)
        return j + n
    if wt == 5:
        if end - i < 4:
            raise Truncated("32-bit field", i)
        return i + 4
    if wt == 3:
        if depth >= MAX_GROUP_DEPTH:
            raise InvalidValue("groups nested too deep", start)
        while True:
            if i >= end:
                raise Truncated("group without its end", start)
            t0 = i
            f2, w2, i = _tag(buf, i, end)
            if w2 == 4:
                if f2 != fno:
                    raise InvalidValue("end of group does not match its start", t0)
                return i
            i = _skip(buf, i, end, f2, w2, t0, depth + 1)
    if wt == 4:
        raise InvalidValue("end of group without its start", start)
    raise InvalidValue(f"wire type {wt}", start)


def _len_span(buf: bytes, i: int, end: int) -> tuple[int, int]:
    n, j = _varint(buf, i, end)
    if n > end - j:
        raise Truncated("length-delimited field", i)
    return j, j + n


def read_header(buf: bytes) -> tuple[int | None, int | None, list[tuple[int, int]]]:
    """Pass 1: the payload's timestamp, seq and the spans of its metrics."""
    end = len(buf)
    i = 0
    ts: int | None = None
    ts_off = seq_off = 0
    seq: int | None = None
    spans: list[tuple[int, int]] = []
    while i < end:
        t0 = i
        fno, wt, i = _tag(buf, i, end)
        if fno == 1 and wt == 0:
            ts_off = i
            ts, i = _varint(buf, i, end)
        elif fno == 2 and wt == 2:
            s, i = _len_span(buf, i, end)
            spans.append((s, i))
        elif fno == 3 and wt == 0:
            seq_off = i
            seq, i = _varint(buf, i, end)
        else:
            i = _skip(buf, i, end, fno, wt, t0)
    if ts is not None and ts > MAX_MS:
        raise InvalidValue("payload timestamp out of range", ts_off)
    if seq is not None and seq > 255:
        raise InvalidValue(f"seq {seq} outside 0..255", seq_off)
    return ts, seq, spans


def read_metric(buf: bytes, s: int, end: int) -> Metric:
    """Read the fields of the Metric message in ``buf[s:end]``."""
    m = Metric(offset=s)
    i = s
    while i < end:
        t0 = i
        fno, wt, i = _tag(buf, i, end)
        if wt == 0 and fno in (2, 3, 4, 5, 6, 7, 10, 11, 14):
            v, i = _varint(buf, i, end)
            if fno == 2:
                m.alias = v
            elif fno == 3:
                m.timestamp = v
            elif fno == 4:
                m.datatype = v & 0xFFFFFFFF
            elif fno == 5:
                m.is_historical = v != 0
            elif fno == 6:
                m.is_transient = v != 0
            elif fno == 7:
                m.is_null = v != 0
            else:
                m.value_field = fno
                m.value = (
                    v & 0xFFFFFFFF if fno == INT_VALUE else (v != 0 if fno == BOOLEAN_VALUE else v)
                )
        elif wt == 2 and fno in (1, 15, 16, 17, 18, 19):
            a, i = _len_span(buf, i, end)
            if fno == 1:
                m.name = buf[a:i]
                m.name_offset = a
            else:
                m.value_field = fno
                m.value = buf[a:i]
        elif wt == 5 and fno == FLOAT_VALUE:
            if end - i < 4:
                raise Truncated("32-bit field", i)
            m.value_field = fno
            m.value = struct.unpack_from("<f", buf, i)[0]
            i += 4
        elif wt == 1 and fno == DOUBLE_VALUE:
            if end - i < 8:
                raise Truncated("64-bit field", i)
            m.value_field = fno
            m.value = struct.unpack_from("<d", buf, i)[0]
            i += 8
        else:
            i = _skip(buf, i, end, fno, wt, t0)
    return m


def parse_payload(payload: bytes) -> Payload:
    """The payload's fields and metrics, read but not interpreted (births and deaths)."""
    buf = bytes(payload)
    ts, seq, spans = read_header(buf)
    return Payload(ts, seq, [read_metric(buf, s, e) for s, e in spans])


def metric_value(m: Metric, datatype: int) -> float | None:
    """The reading's value of metric ``m`` of ``datatype``; None when it is not a reading."""
    vf = m.value_field
    if datatype > MAX_DATATYPE:
        raise InvalidValue(f"unknown datatype {datatype}", m.offset)
    if datatype == 0:  # no datatype: the value field decides
        if vf in (INT_VALUE, LONG_VALUE):
            return float(m.value)
        if vf in (FLOAT_VALUE, DOUBLE_VALUE):
            return float(m.value)
        if vf == BOOLEAN_VALUE:
            return 1.0 if m.value else 0.0
        return None
    if vf == 0:
        return None  # declared but without a value: nothing to store
    kind = INT_TYPES.get(datatype)
    if kind is not None:
        if vf != INT_VALUE and vf != LONG_VALUE:
            raise InvalidValue(
                f"{DATATYPE_NAMES[datatype]} metric carries value field {vf}", m.offset
            )
        bits, signed = kind
        width = 32 if vf == INT_VALUE else 64
        v: int = m.value
        if signed:
            if v < (1 << bits):
                return float(v - (1 << bits) if v >= 1 << (bits - 1) else v)
            if v >= (1 << width) - (1 << (bits - 1)):
                return float(v - (1 << width))
            raise InvalidValue(f"{v} out of range for {DATATYPE_NAMES[datatype]}", m.offset)
        if v >= 1 << bits:
            raise InvalidValue(f"{v} out of range for {DATATYPE_NAMES[datatype]}", m.offset)
        return float(v)
    if datatype in (FLOAT, DOUBLE):
        if vf != FLOAT_VALUE and vf != DOUBLE_VALUE:
            raise InvalidValue(
                f"{DATATYPE_NAMES[datatype]} metric carries value field {vf}", m.offset
            )
        return float(m.value)
    if datatype == BOOLEAN:
        if vf != BOOLEAN_VALUE:
            raise InvalidValue(f"Boolean metric carries value field {vf}", m.offset)
        return 1.0 if m.value else 0.0
    return None  # strings, bytes, datasets, templates, property sets, arrays


class Decoder:
    """Decodes Sparkplug B payloads into a :class:`ReadingBatch`."""

    def __init__(self, dictionary: dict[int, str] | None = None) -> None:
        # ``dictionary`` names frame metric ids; Sparkplug names its metrics.
        self.metrics_skipped = 0
        self.nulls_skipped = 0
        self._names: dict[bytes, str] = {}

    def header(self, payload: bytes) -> tuple[int | None, int | None]:
        """The payload's timestamp (ms) and seq, each None when absent (validates pass 1)."""
        ts, seq, _ = read_header(bytes(payload))
        return ts, seq

    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int:
        """Append the payload's readings (named metrics only) to ``batch``; return how many."""
        return self.decode_with(topic_device, payload, recv_ns, batch, None, None)

    def decode_with(
        self,
        device: str | None,
        payload: bytes,
        recv_ns: int,
        batch: Any,
        aliases: dict[int, tuple[str, int]] | None,
        types: dict[str, int] | None,
    ) -> int:
        """As :meth:`decode`, resolving aliases and datatypes with birth tables.

        ``aliases`` maps an alias to (name, datatype), ``types`` a name to its datatype.
        """
        if device is None:
            raise InvalidValue("no device: Sparkplug readings take their device from the topic")
        recv_us = recv_ns // 1000
        buf = bytes(payload)
        batch.begin()
        try:
            n, skipped, nulls = self._decode(device, buf, recv_us, batch, aliases, types)
        except BaseException:
            batch.rollback()
            raise
        self.metrics_skipped += skipped
        self.nulls_skipped += nulls
        return n

    def _name(self, m: Metric) -> str:
        raw = m.name
        assert raw is not None
        name = self._names.get(raw)
        if name is None:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidValue("metric name is not valid UTF-8", m.name_offset) from None
            if len(self._names) >= _NAME_CACHE_MAX:
                self._names.clear()
            self._names[raw] = name
        return name

    def _decode(
        self,
        device: str,
        buf: bytes,
        recv_us: int,
        batch: Any,
        aliases: dict[int, tuple[str, int]] | None,
        types: dict[str, int] | None,
    ) -> tuple[int, int, int]:
        pts, pseq, spans = read_header(buf)
        seq = (pts or 0) * 256 + (pseq or 0)
        default_ts = recv_us if pts is None else pts * 1000
        dev = -1
        n = skipped = nulls = 0
        for s, e in spans:
            m = read_metric(buf, s, e)
            if m.is_null:
                nulls += 1
                continue
            birth_type = 0
            if m.name is not None:
                name = self._name(m)
                if types is not None:
                    birth_type = types.get(name, 0)
            elif m.alias is not None:
                entry = aliases.get(m.alias) if aliases is not None else None
                if entry is None:
                    raise UnknownAlias(
                        f"metric has only alias {m.alias}, which no birth defined", s
                    )
                name, birth_type = entry
            else:
                raise InvalidValue("metric has neither name nor alias", s)
            datatype = m.datatype if m.datatype else birth_type
            value = metric_value(m, datatype)
            if value is None:
                skipped += 1
                continue
            if m.timestamp is not None:
                if m.timestamp > MAX_MS:
                    raise InvalidValue("metric timestamp out of range", s)
                ts_us = m.timestamp * 1000
            else:
                ts_us = default_ts
            if dev < 0:
                dev = batch.intern_device(device)
            batch.push(dev, batch.intern_metric(name), ts_us, value, 0, seq, recv_us)
            n += 1
        return n, skipped, nulls
