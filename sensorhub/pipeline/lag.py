"""Consumer-group lag and the safe trim point of each stream.

A group's lag on a stream is the age of the oldest entry the group has not
acknowledged yet: the oldest pending entry, or else the first entry not yet
delivered. Lag over ``writer.lag_alert_s`` is an alert. The safe trim point
of a stream is the lowest id some group still needs; everything below it has
been acknowledged by every group (Redis 7 has no "trim only acked" option).
Both the writer (which trims) and ingest (which must see the alert even when
every writer is stuck) use this.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from sensorhub.metrics.registry import Metrics

__all__ = ["LagAlarm", "StreamState", "id_tuple", "stream_states"]

log = logging.getLogger(__name__)


def id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class StreamState:
    stream: str
    length: int
    lag_s: float  # worst group
    backlog: int  # entries not yet delivered to the worst group
    pending: int  # delivered, not acknowledged (all groups)
    safe_trim: tuple[int, int] | None  # lowest id some group still needs


def stream_states(redis: Any, streams: list[str]) -> list[StreamState]:
    now_ms = time.time() * 1000
    out = []
    pipe = redis.pipeline(transaction=False)
    for s in streams:
        pipe.xinfo_groups(s)
        pipe.xlen(s)
    replies = pipe.execute(raise_on_error=False)
    for i, s in enumerate(streams):
        groups, length = replies[2 * i], replies[2 * i + 1]
        if isinstance(groups, Exception) or not groups:
            continue
        lag_s, backlog, pending_total = 0.0, 0, 0
        safe: tuple[int, int] | None = None
        for g in groups:
            pending = int(g.get("pending", 0))
            pending_total += pending
            last = id_tuple(g["last-delivered-id"])
            oldest: tuple[int, int] | None = None
            if pending:
                p = redis.xpending(s, _s(g["name"]))
                if p.get("min") is not None:  # acknowledged since XINFO: nothing pending now
                    oldest = id_tuple(p["min"])
            nxt = redis.xrange(s, f"({last[0]}-{last[1]}", "+", count=1)
            if nxt:
                first_new = id_tuple(nxt[0][0])
                oldest = first_new if oldest is None else min(oldest, first_new)
            backlog = max(backlog, int(g.get("lag") or 0))
            if oldest is not None:
                lag_s = max(lag_s, (now_ms - oldest[0]) / 1000)
            need = oldest if oldest is not None else (last[0], last[1] + 1)
            safe = need if safe is None or need < safe else safe
        out.append(StreamState(s, int(length) if not isinstance(length, Exception) else 0, lag_s, backlog, pending_total, safe))
    return out


class LagAlarm:
    """Turns lag readings into the alert gauge, a counter, a log line and an event."""

    def __init__(self, metrics: Metrics, redis: Any, events_stream: str, threshold_s: float) -> None:
        self.metrics = metrics
        self.redis = redis
        self.events = events_stream
        self.threshold_s = threshold_s
        self.active = False

    def update(self, states: list[StreamState]) -> float:
        lag_s = max((st.lag_s for st in states), default=0.0)
        m = self.metrics
        m.set("lag_s", round(lag_s, 3))
        m.set("backlog_entries", sum(st.backlog for st in states))
        m.set("pending_entries", sum(st.pending for st in states))
        m.set("stream_entries", sum(st.length for st in states))
        alert = lag_s > self.threshold_s
        if alert and not self.active:
            worst = max(states, key=lambda st: st.lag_s)
            log.warning("LAG ALERT: %s is %.1f s behind (threshold %.0f s)", worst.stream, lag_s, self.threshold_s)
            m.inc("lag_alerts")
            try:
                self.redis.xadd(
                    self.events,
                    {"kind": "lag_alert", "process": m.process,
                     "data": json.dumps({"lag_s": round(lag_s, 1), "stream": worst.stream})},
                    maxlen=1000, approximate=True,
                )
            except Exception as exc:  # the alert is logged and counted even if Redis refuses the event
                log.warning("could not record the lag alert event: %s", exc)
        elif not alert and self.active:
            log.info("lag back under %.0f s (%.1f s)", self.threshold_s, lag_s)
        self.active = alert
        m.set("lag_alert", alert)
        return lag_s
