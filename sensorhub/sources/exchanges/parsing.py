"""What the venue parsers share: exchange timestamps, normalized symbols and JSON framing.

Plain functions without state or I/O, used by the venue modules and by
:mod:`sensorhub.sources.exchanges.venue`.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from sensorhub.errors import InvalidValue, SyntaxError_, Truncated

__all__ = [
    "InstrumentKind",
    "ensure_whole",
    "instrument_kind",
    "iso_to_us",
    "loads",
    "split_concatenated",
]

_day_cache: dict[str, int] = {}


def iso_to_us(text: str) -> int:
    """``2026-08-09T21:05:42.514318Z`` (any 0..9 fraction digits, ``Z`` or ``+00:00``) -> µs since the epoch.

    Venues send a handful of dates per feed, so the date part is cached and
    only the clock part is parsed per trade.
    """
    try:
        day = _day_cache.get(text[:10])
        if day is None:
            if len(_day_cache) > 64:  # bounded: a long-running feed crosses many days
                _day_cache.clear()
            y, mo, d = int(text[0:4]), int(text[5:7]), int(text[8:10])
            if text[4] != "-" or text[7] != "-" or text[10] not in "T ":
                raise ValueError(text)
            day = _day_cache[text[:10]] = calendar.timegm((y, mo, d, 0, 0, 0)) * 1_000_000
        secs = int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19])
        us = 0
        if len(text) > 19 and text[19] == ".":
            end = 20
            n = len(text)
            while end < n and text[end].isdigit():
                end += 1
            frac = text[20:end]
            us = int((frac + "000000")[:6]) if frac else 0
            tail = text[end:]
        else:
            tail = text[19:]
        if tail not in ("Z", "", "+00:00"):
            raise ValueError(text)
    except (ValueError, IndexError):
        raise InvalidValue(f"timestamp {text!r} is not ISO 8601 UTC") from None
    return day + secs * 1_000_000 + us


InstrumentKind = Literal["spot", "perpetual", "future", "other"]


def instrument_kind(symbol: str) -> InstrumentKind:
    """What a normalized symbol names: ``BTC-USDT`` spot, ``BTC-USDT-PERP`` perpetual, ``BTC-USD-220527`` future."""
    parts = symbol.split("-")
    if len(parts) == 2 and all(parts):
        return "spot"
    if len(parts) == 3 and parts[0] and parts[1]:
        if parts[2] == "PERP":
            return "perpetual"
        if len(parts[2]) == 6 and parts[2].isdigit():
            return "future"
    return "other"


def split_concatenated(symbol: str, quotes: Sequence[str]) -> str | None:
    """``BTCUSDT`` -> ``BTC-USDT`` using the longest quote currency that ends it, or None."""
    for q in quotes:
        if symbol.endswith(q) and len(symbol) > len(q):
            return f"{symbol[: -len(q)]}-{q}"
    return None


_CLOSERS = {ord("{"): ord("}"), ord("["): ord("]")}


def ensure_whole(payload: bytes) -> None:
    """Framing check for frames not parsed further: a JSON object or array that is closed.

    Frames on channels a feed does not store (books, tickers) are only checked
    this far: they carry nothing to store, and parsing them fully would cost
    most of the feed's CPU. A cut frame still becomes a dead letter.
    """
    if not payload:
        raise Truncated("empty frame")
    close = _CLOSERS.get(payload[0])
    if close is None:
        raise SyntaxError_("not a JSON object or array", 0)
    end = payload[-1]
    if end != close:
        stripped = payload.rstrip()
        if not stripped or stripped[-1] != close:
            raise Truncated("JSON not closed", len(payload))


def loads(payload: bytes) -> Any:
    """Generic JSON decode for rare frames (acks, errors); bad JSON is a ``SyntaxError_``."""
    try:
        return _json_decode(payload)
    except msgspec.DecodeError as exc:
        raise SyntaxError_(str(exc)) from None


_json_decode = msgspec.json.Decoder().decode
