"""Readings the writer does not store: the device-time rule, and the dead-letter form of a reading.

Device time. A reading's ``ts`` is the device's clock; ``recv`` is ours. A
reading whose ``ts`` is more than ``writer.device_time_max_past_s`` before
its ``recv``, more than ``writer.device_time_max_future_s`` after it, or
outside the range of the ``ts`` column (``DateTime64``: 1900-01-01 to
2299-12-31) is not inserted into ``readings``: it is dead-lettered with the
reason, counted, and the rest of its batch is stored. Two reasons: such a
clock is wrong, and ``readings`` is partitioned by month of ``ts``, so a
batch spread over more months than ClickHouse accepts in one INSERT
(``max_partitions_per_insert_block``, 100) would be refused whole. The
window bounds the months a batch can touch (see :data:`MAX_WINDOW_S`).

The dead letter of a reading is the reading itself as the JSON payload of
``spec/payloads.md`` (``{"device", "metric", "value", "ts", "seq",
"quality"}``, ``ts`` exact to the microsecond) under the topic
``$sensorhub/readings/<device>``, with the reading's source and receive
time; ``sensorhub dlq replay`` decodes it again, applying the window of the
settings it runs with. (``$`` topics cannot come from a device: MQTT
wildcards never match them.) A value that is not finite (a frame may carry
NaN) cannot be written in JSON; its dead letter says ``NaN``/``Infinity``
and does not replay.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "MAX_WINDOW_S",
    "READING_TOPIC",
    "TRADE_TOPIC",
    "TS_MAX_US",
    "TS_MIN_US",
    "DeviceTimeWindow",
    "reading_payload",
    "trade_payload",
]

#: topic prefix of a reading's dead letter; the device follows (it may contain ``/``)
READING_TOPIC = "$sensorhub/readings/"
#: topic prefix of a trade's dead letter (venue/symbol follow); no decoder replays it
TRADE_TOPIC = "$sensorhub/trades/"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: the range of ClickHouse's DateTime64 (the ``ts`` column), in µs since the epoch
TS_MIN_US = int((datetime(1900, 1, 1, tzinfo=UTC) - _EPOCH) / timedelta(microseconds=1))
TS_MAX_US = int((datetime(2300, 1, 1, tzinfo=UTC) - _EPOCH) / timedelta(microseconds=1)) - 1

#: the widest window (past + future) the settings accept: 7 years, 85 months, so a
#: batch of readings spans at most ~87 months, under ClickHouse's 100 partitions per INSERT
MAX_WINDOW_S = 7 * 365 * 86400
_DAY_US = 86_400_000_000


def _when(us: int) -> str:
    try:
        return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except OverflowError:
        return f"{us} µs since the epoch"


def _span(us: int) -> str:
    if us >= 365 * _DAY_US:
        return f"{us / (365.25 * _DAY_US):.1f} years"
    if us >= _DAY_US:
        return f"{us / _DAY_US:.1f} days"
    return f"{us / 1e6:.1f} s"


@dataclass(frozen=True)
class DeviceTimeWindow:
    """How far a reading's device time may be from its receive time (µs)."""

    max_past_us: int
    max_future_us: int

    @classmethod
    def of(cls, max_past_s: float, max_future_s: float) -> DeviceTimeWindow:
        return cls(int(max_past_s * 1e6), int(max_future_s * 1e6))

    def to_json(self) -> list[str]:
        # strings: Redis' cjson keeps 14 significant digits of a number
        return [str(self.max_past_us), str(self.max_future_us)]

    @classmethod
    def from_json(cls, v: Any) -> DeviceTimeWindow:
        return cls(int(v[0]), int(v[1]))

    def all_inside(self, ts: Any, recv: Any) -> bool:
        """True when every reading of the columns ``ts``/``recv`` is inside (a cheap bound)."""
        if not len(ts):
            return True
        lo, hi = int(min(ts)), int(max(ts))
        return (
            lo >= int(max(recv)) - self.max_past_us
            and hi <= int(min(recv)) + self.max_future_us
            and lo >= TS_MIN_US
            and hi <= TS_MAX_US
        )

    def reason(self, ts_us: int, recv_us: int) -> str | None:
        """Why a reading with this device time cannot be stored; None when it can."""
        if not TS_MIN_US <= ts_us <= TS_MAX_US:
            return (
                f"device time {_when(ts_us)} is outside the range of the ts column "
                "(DateTime64: 1900-01-01 to 2299-12-31)"
            )
        if ts_us < recv_us - self.max_past_us:
            return (
                f"device time {_when(ts_us)} is {_span(recv_us - ts_us)} before its receive time "
                f"{_when(recv_us)}, more than writer.device_time_max_past_s ({self.max_past_us // 1_000_000} s)"
            )
        if ts_us > recv_us + self.max_future_us:
            return (
                f"device time {_when(ts_us)} is {_span(ts_us - recv_us)} after its receive time "
                f"{_when(recv_us)}, more than writer.device_time_max_future_s ({self.max_future_us // 1_000_000} s)"
            )
        return None

    def outside(self, ts: Any, recv: Any) -> list[tuple[int, str]]:
        """``(row, reason)`` of every reading of the columns that is outside."""
        if self.all_inside(ts, recv):
            return []
        out = []
        for i, (t, r) in enumerate(zip(ts, recv, strict=True)):
            why = self.reason(t, r)
            if why is not None:
                out.append((i, why))
        return out


def _seconds(us: int) -> str:
    """Exact decimal seconds of ``us`` (the JSON decoder converts them back exactly)."""
    sign = "-" if us < 0 else ""
    s, frac = divmod(abs(us), 1_000_000)
    return f"{sign}{s}.{frac:06d}"


def _number(v: float) -> str:
    if math.isfinite(v):
        return repr(float(v))
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def reading_payload(device: str, metric: str, value: float, ts_us: int, seq: int, quality: int) -> bytes:
    """The JSON payload (``spec/payloads.md``) of one reading, decodable back to the same reading."""
    return (
        f'{{"device": {json.dumps(device)}, "metric": {json.dumps(metric)}, "value": {_number(value)}, '
        f'"ts": {_seconds(ts_us)}, "seq": {int(seq)}, "quality": {int(quality)}}}'
    ).encode()


def trade_payload(fields: Iterable[tuple[str, Any]]) -> bytes:
    """A trade as a JSON object (kept for the operator; no decoder replays trades)."""
    return json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in fields}).encode()
