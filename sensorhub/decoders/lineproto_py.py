"""Influx line protocol decoder: the pure-Python twin of ``cython_ext/lineproto.pyx``.

This module is the readable specification of the ``ilp`` format; the Cython
module must behave exactly like it (same readings, same error class, same
offset). The grammar, as InfluxDB documents it::

    line        = measurement ("," tag_key "=" tag_value)* " "+ field ("," field)* (" "+ timestamp)? " "*
    field       = field_key "=" field_value
    field_value = float | integer "i" | unsigned "u" | boolean | '"' string '"'

- Lines end with ``\\n``; one ``\\r`` before it is dropped (``\\r\\n`` files).
  Leading spaces are skipped; blank lines and lines whose first non-space
  character is ``#`` are ignored.
- Escapes: in the measurement, ``\\,`` and ``\\ ``; in tag keys, tag values
  and field keys, ``\\,``, ``\\=`` and ``\\ ``; in string field values, ``\\"``
  and ``\\\\``. A backslash before any other character is a literal backslash.
- Floats: ``-?(digits[.digits*] | .digits)([eE][+-]?digits)?``; the value must
  be finite. Integers ``-?digits i`` must fit in int64, unsigned ``digits u``
  in uint64. Booleans ``t T true True TRUE`` / ``f F false False FALSE`` are
  stored as 1 and 0. Names must be UTF-8.
- Each numeric or boolean field is a reading with metric
  ``<measurement>.<field key>``. String fields are not readings: they are
  counted in :attr:`Decoder.strings_skipped` and skipped.
- Device: the ``device`` tag when the line has one (the last one wins), else
  the topic's device; with neither the payload is invalid. Other tags are
  checked for syntax and otherwise ignored: a reading has no tag columns.
- Timestamp: nanoseconds since the epoch (int64, may be negative); stored as
  ``ts_us = ns // 1000``, i.e. floored toward minus infinity, so that a time
  before the epoch stays before it. Without a timestamp the receive time is
  used.
- ``quality`` is 0. ``seq`` is 0 for every reading: InfluxDB itself
  identifies a point by series, field and timestamp, so two lines naming the
  same one are one point there and one row here (the store deduplicates on
  device, metric, ts, seq); numbering readings by their line would instead
  store the same point twice when it arrives at another position in another
  payload.

One line that does not parse makes the whole payload invalid: the decoder
raises a :class:`~sensorhub.errors.DecodeError` subclass naming the rule and
the byte offset, and the batch is left exactly as it was.

Errors of a line are found in this order: the syntax and the values, left to
right; then the device; then the metric names, field by field.
"""

from __future__ import annotations

import math
import re
from typing import Any

from sensorhub.errors import InvalidValue, SyntaxError_

__all__ = ["Decoder"]

_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1
_TRUE = frozenset((b"t", b"T", b"true", b"True", b"TRUE"))
_FALSE = frozenset((b"f", b"F", b"false", b"False", b"FALSE"))
_FLOAT = re.compile(rb"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT = re.compile(rb"-?[0-9]+")
_UINT = re.compile(rb"[0-9]+")
_MEAS_ESC = re.compile(rb"\\([, ])")
_KEY_ESC = re.compile(rb"\\([,= ])")
# Bounded caches of raw (escaped) names to their unescaped strings.
_CACHE_MAX = 4096


def _scan_name(line: bytes, i: int, stops: bytes, escapable: bytes) -> int:
    """Index of the first unescaped byte of ``stops`` at or after ``i`` (or len)."""
    n = len(line)
    while i < n:
        c = line[i]
        if c == 0x5C and i + 1 < n and line[i + 1] in escapable:
            i += 2
        elif c in stops:
            return i
        else:
            i += 1
    return i


class Decoder:
    """Decodes Influx line protocol payloads into a :class:`ReadingBatch`."""

    def __init__(self, dictionary: dict[int, str] | None = None) -> None:
        # ``dictionary`` names frame metric ids; line protocol names its metrics.
        self.strings_skipped = 0
        self._metrics: dict[bytes, str] = {}
        self._devices: dict[bytes, str] = {}

    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int:
        """Append the payload's readings to ``batch``; return how many were appended."""
        recv_us = recv_ns // 1000
        batch.begin()
        try:
            n, strings = self._decode(topic_device, bytes(payload), recv_us, batch)
        except BaseException:
            batch.rollback()
            raise
        self.strings_skipped += strings
        return n

    def _decode(
        self, topic_device: str | None, payload: bytes, recv_us: int, batch: Any
    ) -> tuple[int, int]:
        total = 0
        strings = 0
        topic_dev_idx = -1
        base = 0
        for raw in payload.split(b"\n"):
            line_base = base
            base += len(raw) + 1
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            pos = 0
            while pos < len(raw) and raw[pos] == 0x20:
                pos += 1
            if pos == len(raw) or raw[pos] == 0x23:  # blank or "#" comment
                continue
            meas, dev_raw, fields, ts, line_strings = _parse_line(raw, pos, line_base)
            strings += line_strings
            # Device.
            if dev_raw is not None:
                dev_idx = batch.intern_device(self._device_name(raw, dev_raw, line_base))
            elif topic_device is not None:
                if topic_dev_idx < 0:
                    topic_dev_idx = batch.intern_device(topic_device)
                dev_idx = topic_dev_idx
            else:
                raise InvalidValue(
                    "no device: the line has no device tag and the topic names none",
                    line_base + pos,
                )
            ts_us = recv_us if ts is None else ts // 1000
            # Names first, then the readings, so that a bad name adds nothing of its line.
            met_idx = [
                batch.intern_metric(self._metric_name(raw, meas, k, line_base)) for k, _ in fields
            ]
            for m, (_, value) in zip(met_idx, fields, strict=True):
                batch.push(dev_idx, m, ts_us, value, 0, 0, recv_us)
            total += len(fields)
        return total, strings

    def _device_name(self, raw: bytes, span: tuple[int, int], line_base: int) -> str:
        key = raw[span[0] : span[1]]
        name = self._devices.get(key)
        if name is None:
            name = _utf8(_KEY_ESC.sub(rb"\1", key), line_base + span[0])
            if len(self._devices) >= _CACHE_MAX:
                self._devices.clear()
            self._devices[key] = name
        return name

    def _metric_name(
        self, raw: bytes, meas: tuple[int, int], field: tuple[int, int], line_base: int
    ) -> str:
        # names may hold any byte: the measurement's length keeps the key unambiguous
        m_raw = raw[meas[0] : meas[1]]
        key = len(m_raw).to_bytes(4, "little") + m_raw + raw[field[0] : field[1]]
        name = self._metrics.get(key)
        if name is None:
            m = _utf8(_MEAS_ESC.sub(rb"\1", raw[meas[0] : meas[1]]), line_base + meas[0])
            f = _utf8(_KEY_ESC.sub(rb"\1", raw[field[0] : field[1]]), line_base + field[0])
            name = f"{m}.{f}"
            if len(self._metrics) >= _CACHE_MAX:
                self._metrics.clear()
            self._metrics[key] = name
        return name


def _utf8(raw: bytes, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidValue("name is not valid UTF-8", offset) from None


def _parse_line(
    line: bytes, i: int, base: int
) -> tuple[
    tuple[int, int], tuple[int, int] | None, list[tuple[tuple[int, int], float]], int | None, int
]:
    """Parse one line (without its newline) from ``i``.

    Returns the measurement span, the span of the last ``device`` tag value (or
    None), the fields as (key span, value), the timestamp in ns (or None) and
    the number of string fields. ``base`` is the line's offset in the payload.
    """
    n = len(line)
    start = i
    i = _scan_name(line, i, b", ", b", ")
    if i == start:
        raise SyntaxError_("empty measurement", base + i)
    meas = (start, i)
    if i == n:
        raise SyntaxError_("missing field set", base + i)
    device: tuple[int, int] | None = None
    while line[i] == 0x2C:  # ","
        i += 1
        k0 = i
        i = _scan_name(line, i, b",= ", b",= ")
        if i == k0:
            raise SyntaxError_("empty tag key", base + i)
        if i == n or line[i] != 0x3D:
            raise SyntaxError_("tag key without '='", base + i)
        key = line[k0:i]
        i += 1
        v0 = i
        i = _scan_name(line, i, b",= ", b",= ")
        if i == v0:
            raise SyntaxError_("empty tag value", base + i)
        if i == n:
            raise SyntaxError_("missing field set", base + i)
        if line[i] == 0x3D:
            raise SyntaxError_("unescaped '=' in tag value", base + i)
        if key == b"device":
            device = (v0, i)
    while i < n and line[i] == 0x20:
        i += 1
    if i == n:
        raise SyntaxError_("missing field set", base + i)
    fields: list[tuple[tuple[int, int], float]] = []
    strings = 0
    while True:
        k0 = i
        i = _scan_name(line, i, b",= ", b",= ")
        if i == k0:
            raise SyntaxError_("empty field key", base + i)
        if i == n or line[i] != 0x3D:
            raise SyntaxError_("field key without '='", base + i)
        key_span = (k0, i)
        i += 1
        if i == n:
            raise SyntaxError_("missing field value", base + i)
        if line[i] == 0x22:  # '"': a string field, scanned and skipped
            j = i + 1
            while True:
                if j >= n:
                    raise SyntaxError_("unterminated string", base + i)
                c = line[j]
                if c == 0x5C and j + 1 < n and line[j + 1] in b'"\\':
                    j += 2
                elif c == 0x22:
                    break
                else:
                    j += 1
            i = j + 1
            strings += 1
        else:
            t = i
            while t < n and line[t] != 0x2C and line[t] != 0x20:
                t += 1
            fields.append((key_span, _field_value(line[i:t], base + i)))
            i = t
        if i == n:
            break
        c = line[i]
        if c == 0x2C:
            i += 1
            continue
        if c != 0x20:
            raise SyntaxError_("expected ',' or ' ' after a field value", base + i)
        break
    while i < n and line[i] == 0x20:
        i += 1
    ts: int | None = None
    if i < n:
        t = i
        while t < n and line[t] != 0x20:
            t += 1
        tok = line[i:t]
        if _INT.fullmatch(tok) is None:
            raise SyntaxError_("bad timestamp", base + i)
        ts = int(tok)
        if not -_INT64_MAX - 1 <= ts <= _INT64_MAX:
            raise InvalidValue("timestamp out of int64 range", base + i)
        i = t
        while i < n and line[i] == 0x20:
            i += 1
        if i < n:
            raise SyntaxError_("trailing characters after the timestamp", base + i)
    return meas, device, fields, ts, strings


def _field_value(tok: bytes, offset: int) -> float:
    """The value of one unquoted field value token."""
    if not tok:
        raise SyntaxError_("missing field value", offset)
    if tok in _TRUE:
        return 1.0
    if tok in _FALSE:
        return 0.0
    last = tok[-1]
    if last == 0x69:  # "i"
        if _INT.fullmatch(tok, 0, len(tok) - 1) is None:
            raise SyntaxError_("bad integer field value", offset)
        v = int(tok[:-1])
        if not -_INT64_MAX - 1 <= v <= _INT64_MAX:
            raise InvalidValue("integer field out of int64 range", offset)
        return float(v)
    if last == 0x75:  # "u"
        if _UINT.fullmatch(tok, 0, len(tok) - 1) is None:
            raise SyntaxError_("bad unsigned field value", offset)
        u = int(tok[:-1])
        if u > _UINT64_MAX:
            raise InvalidValue("unsigned field out of uint64 range", offset)
        return float(u)
    if _FLOAT.fullmatch(tok) is None:
        raise SyntaxError_("bad field value", offset)
    f = float(tok)
    if not math.isfinite(f):
        raise InvalidValue("float field out of range", offset)
    return f
