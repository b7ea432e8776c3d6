"""JSON payload decoder: the pure-Python twin of ``cython_ext/jsonpayload.pyx``.

The payload (``spec/payloads.md``) is UTF-8 JSON (RFC 8259) of one of three shapes:

1. one reading ``{"metric": "temp_c", "value": 21.5, "ts": ..., "seq": 17, "quality": 0}``;
2. several metrics at one time ``{"ts": ..., "seq": 18, "values": {"temp_c": 21.5, "rh": 40.1}}``;
3. an array of objects of either shape (an empty array holds no readings).

Rules, as this module and the Cython decoder apply them:

- ``ts``: a number is seconds since the epoch, converted *exactly* from its
  decimal text to microseconds (no float in between, so
  ``1764072000.123456`` is ``1764072000123456``), digits beyond the
  microsecond rounded half to even; a string is RFC 3339
  (``YYYY-MM-DD[Tt ]HH:MM:SS[.frac](Z|z|±HH:MM)``, a leap second ``:60``
  counts as the next second, the fraction rounded like a number); missing is
  the receive time. The result must fit a signed 64-bit count of µs.
- ``seq``: an integer literal (no fraction or exponent) in 0..2**64-1,
  optional (0); ``quality``: an integer literal 0, 1 or 2, optional (0).
  ``-0`` is 0.
- ``value`` (and each entry of ``values``): a number, converted to the
  nearest float64 (a number too large for a float64 is out of range), or
  ``true``/``false`` stored as 1/0. Anything else is invalid.
- ``metric`` and the keys of ``values``: non-empty strings.
- ``device``: optional; a string that must equal the topic's device
  (:class:`DeviceMismatch` otherwise). Without a topic device it names the
  device; a reading with neither is invalid.
- An object must be exactly one of the shapes: ``metric`` with ``value``, or
  ``values`` (and neither ``metric`` nor ``value``). A key the decoder uses
  (``metric``, ``value``, ``ts``, ``seq``, ``quality``, ``device``,
  ``values``) may appear once per object, a metric once per ``values``;
  other keys are ignored whatever they hold.

Errors. The payload is first checked as JSON as a whole: invalid UTF-8, bad
syntax, ``NaN``/``Infinity`` literals, ``\\u`` escapes that leave a lone
surrogate, or nesting deeper than :data:`MAX_DEPTH` are
:class:`SyntaxError_` (with the byte offset where the JSON module can tell).
Only a syntactically valid payload is checked against the rules above, in
document order; the first rule broken is raised: :class:`DeviceMismatch`
for another device, :class:`InvalidValue` for everything else (it names the
JSON path, e.g. ``[2].values.rh``). The Cython decoder raises the same
classes in the same cases and also names the byte offset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from sensorhub.errors import DeviceMismatch, InvalidValue, SyntaxError_

__all__ = ["MAX_DEPTH", "Decoder", "number_to_us", "rfc3339_to_us"]

#: deepest nesting of arrays and objects accepted (the top level is depth 1)
MAX_DEPTH = 64
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
_KNOWN = ("metric", "value", "ts", "seq", "quality", "device", "values")
_NUMBER = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?(?:[eE]([-+]?[0-9]+))?")
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:([Zz])|([-+])([0-9]{2}):([0-9]{2}))"
)
_EXP_CAP = 10**15  # any larger exponent gives the same result (0 or out of range)


class _Num(str):
    """The text of a JSON number with a fraction or exponent."""

    __slots__ = ()


class _Int(str):
    """The text of a JSON integer literal."""

    __slots__ = ()


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs in document order, duplicates kept."""

    __slots__ = ()


def _reject_constant(name: str) -> Any:
    raise _Constant(name)


class _Constant(Exception):
    pass


def _round_half_even(digits: str, cut: int) -> int:
    """int(digits) / 10**cut rounded half to even; ``digits`` has no leading zeros."""
    if cut <= 0:
        return int(digits) * int(10**-cut)
    keep, drop = digits[: len(digits) - cut], digits[max(len(digits) - cut, 0) :]
    if cut > len(digits):
        return 0  # below 0.1: rounds to 0
    q = int(keep) if keep else 0
    first, rest = drop[0], drop[1:]
    if first > "5" or (first == "5" and rest.strip("0")) or (first == "5" and q % 2 == 1):
        q += 1
    return q


def number_to_us(text: str) -> int | None:
    """Seconds as JSON number text → µs, exactly, half to even; None when outside i64."""
    m = _NUMBER.fullmatch(text)
    assert m is not None, text  # the JSON parser produced it
    sign, ip, fp, ex = m.groups()
    fp = fp or ""
    digits = (ip + fp).lstrip("0")
    if not digits:
        return 0
    if ex is None:
        e = 0
    else:
        e_digits = ex.lstrip("+-").lstrip("0") or "0"
        e = _EXP_CAP if len(e_digits) > 15 else min(int(e_digits), _EXP_CAP)
        if ex.startswith("-"):
            e = -e
    scale = e - len(fp) + 6  # µs = digits × 10**scale
    if len(digits) + scale > 20:  # at least 10**19 µs even before rounding
        return None
    us = _round_half_even(digits, -scale)
    if sign:
        us = -us
    return us if INT64_MIN <= us <= INT64_MAX else None


def _days_from_civil(y: int, m: int, d: int) -> int:
    # Howard Hinnant's days_from_civil: proleptic Gregorian date → days since 1970-01-01
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def rfc3339_to_us(text: str) -> int | None:
    """RFC 3339 date-time → µs since the epoch; None when it is not one."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    frac, z, osign, oh, om = m.groups()[6:]
    if not (1 <= mo <= 12 and 1 <= d <= _days_in_month(y, mo) and h <= 23 and mi <= 59 and s <= 60):
        return None
    offset = 0
    if not z:
        if int(oh) > 23 or int(om) > 59:
            return None
        offset = (int(oh) * 60 + int(om)) * 60 * (1 if osign == "+" else -1)
    secs = _days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s - offset
    frac_us = 0
    if frac:
        digits = frac.lstrip("0")
        # may round up to 1_000_000: carried into the next second by the sum below
        frac_us = _round_half_even(digits, len(frac) - 6) if digits else 0
    return secs * 1_000_000 + frac_us


def _syntax_walk(doc: Any) -> None:
    """Depth bound and lone surrogates, over the whole document (keys included)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, _Pairs):
            items: list[Any] = []
            for k, v in node:
                items.append(k)
                items.append(v)
        elif isinstance(node, list):
            items = node
        else:
            if isinstance(node, str) and not isinstance(node, (_Num, _Int)) and not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    raise SyntaxError_("\\u escape leaves a lone surrogate") from None
            continue
        if depth > MAX_DEPTH:
            raise SyntaxError_(f"nesting deeper than {MAX_DEPTH}")
        stack.extend((x, depth + 1) for x in items)


def _number(v: Any, path: str) -> float:
    if v is True:
        return 1.0
    if v is False:
        return 0.0
    if isinstance(v, (_Num, _Int)):
        f = float(v)
        if f in (float("inf"), float("-inf")):
            raise InvalidValue(f"{path}: {v[:40]} is out of the float64 range")
        return f
    raise InvalidValue(f"{path}: must be a number or true/false, got {_kind(v)}")


def _uint(v: Any, path: str, hi: int) -> int:
    if not isinstance(v, _Int):
        raise InvalidValue(f"{path}: must be an integer in 0..{hi}, got {_kind(v)}")
    digits = v.lstrip("-")
    if len(digits) > 20 or (v.startswith("-") and digits != "0") or int(digits) > hi:
        raise InvalidValue(f"{path}: {v[:40]} is outside 0..{hi}")
    return int(digits)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if v is True or v is False:
        return "a boolean"
    if isinstance(v, (_Num, _Int)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, _Pairs):
        return "an object"
    return "an array"


class Decoder:
    """Decodes JSON payloads into a :class:`ReadingBatch` (twin API)."""

    __slots__ = ()

    def __init__(self, dictionary: Mapping[int, str] | None = None) -> None:
        # JSON names its metrics; the frame dictionary does not apply.
        pass

    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int:
        """Append the payload's readings to ``batch``; return how many.

        Raises :class:`SyntaxError_`, :class:`InvalidValue` or
        :class:`DeviceMismatch` (see the module docstring) and leaves
        ``batch`` unchanged.
        """
        raw = bytes(payload)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SyntaxError_(f"invalid UTF-8 ({exc.reason})", exc.start) from None
        try:
            doc = json.loads(
                text,
                parse_float=_Num,
                parse_int=_Int,
                parse_constant=_reject_constant,
                object_pairs_hook=_Pairs,
            )
        except json.JSONDecodeError as exc:
            raise SyntaxError_(exc.msg, len(text[: exc.pos].encode("utf-8"))) from None
        except _Constant as exc:
            raise SyntaxError_(f"{exc.args[0]} is not JSON") from None
        except RecursionError:
            raise SyntaxError_(f"nesting deeper than {MAX_DEPTH}") from None
        _syntax_walk(doc)

        recv_us = recv_ns // 1000
        rows: list[tuple[str, str, int, float, int, int]] = []
        if isinstance(doc, _Pairs):
            self._object(doc, "", topic_device, recv_us, rows)
        elif isinstance(doc, list):
            for i, obj in enumerate(doc):
                if not isinstance(obj, _Pairs):
                    raise InvalidValue(f"[{i}]: must be an object, got {_kind(obj)}")
                self._object(obj, f"[{i}]", topic_device, recv_us, rows)
        else:
            raise InvalidValue(
                f"payload must be an object or an array of objects, got {_kind(doc)}"
            )

        batch.begin()
        try:
            for device, metric, ts, value, quality, seq in rows:
                batch.push(
                    batch.intern_device(device),
                    batch.intern_metric(metric),
                    ts,
                    value,
                    quality,
                    seq,
                    recv_us,
                )
        except BaseException:
            batch.rollback()
            raise
        return len(rows)

    @staticmethod
    def _object(
        obj: _Pairs,
        where: str,
        topic_device: str | None,
        recv_us: int,
        rows: list[tuple[str, str, int, float, int, int]],
    ) -> None:
        seen: set[str] = set()
        metric: str | None = None
        value: float | None = None
        ts = recv_us
        seq = 0
        quality = 0
        device = topic_device
        values: list[tuple[str, float]] | None = None
        for key, v in obj:
            if key not in _KNOWN:
                continue
            path = f"{where}.{key}" if where else key
            if key in seen:
                raise InvalidValue(f"{path}: duplicate key")
            seen.add(key)
            if key == "metric":
                if not isinstance(v, str) or isinstance(v, (_Num, _Int)):
                    raise InvalidValue(f"{path}: must be a string, got {_kind(v)}")
                if not v:
                    raise InvalidValue(f"{path}: must not be empty")
                metric = v
            elif key == "value":
                value = _number(v, path)
            elif key == "ts":
                if isinstance(v, (_Num, _Int)):
                    us = number_to_us(v)
                    if us is None:
                        raise InvalidValue(f"{path}: {v[:40]} s is outside the µs range of an i64")
                elif isinstance(v, str):
                    us = rfc3339_to_us(v)
                    if us is None:
                        raise InvalidValue(f"{path}: {v[:40]!r} is not an RFC 3339 date-time")
                    if not INT64_MIN <= us <= INT64_MAX:
                        raise InvalidValue(f"{path}: outside the µs range of an i64")
                else:
                    raise InvalidValue(
                        f"{path}: must be a number or an RFC 3339 string, got {_kind(v)}"
                    )
                ts = us
            elif key == "seq":
                seq = _uint(v, path, UINT64_MAX)
            elif key == "quality":
                quality = _uint(v, path, 2)
            elif key == "device":
                if not isinstance(v, str) or isinstance(v, (_Num, _Int)):
                    raise InvalidValue(f"{path}: must be a string, got {_kind(v)}")
                if topic_device is not None and v != topic_device:
                    raise DeviceMismatch(
                        f"{path}: payload device {v!r}, topic device {topic_device!r}"
                    )
                device = v
            else:  # values
                if not isinstance(v, _Pairs):
                    raise InvalidValue(f"{path}: must be an object, got {_kind(v)}")
                values = []
                names: set[str] = set()
                for name, x in v:
                    vpath = f"{path}.{name}"
                    if not name:
                        raise InvalidValue(f"{path}: a metric name must not be empty")
                    if name in names:
                        raise InvalidValue(f"{vpath}: duplicate metric")
                    names.add(name)
                    values.append((name, _number(x, vpath)))
        label = where or "payload"
        if values is not None:
            if "metric" in seen or "value" in seen:
                raise InvalidValue(f"{label}: has both 'values' and 'metric'/'value'")
        elif metric is None or value is None:
            missing = "metric" if metric is None else "value"
            raise InvalidValue(f"{label}: '{missing}' is missing (or use 'values')")
        if device is None:
            raise InvalidValue(f"{label}: no device: the topic names none and 'device' is missing")
        if values is None:
            assert metric is not None and value is not None
            values = [(metric, value)]
        for name, x in values:
            rows.append((device, name, ts, x, quality, seq))
