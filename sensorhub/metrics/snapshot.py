"""Reading what the processes publish: their metrics snapshots and the streams' figures.

Every process writes a JSON snapshot (:meth:`sensorhub.metrics.registry.Metrics.snapshot`)
to ``<prefix>:metrics:<process>`` once a second. The terminal monitor
(:mod:`sensorhub.monitor.state`) and the Prometheus exporter
(:mod:`sensorhub.metrics.prometheus`) both read them here, and the stream
lengths, pending counts and lag, so that neither depends on the other. Reads
only; every read is bounded in count.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sensorhub.pipeline.keys import StreamLayout

__all__ = ["entry_ms", "read_snapshots", "stream_info"]

# at most this many process snapshots are read
_MAX_PROCESSES = 500


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def read_snapshots(redis: Any, layout: StreamLayout, now: float | None = None) -> list[dict[str, Any]]:
    """Every process's latest metrics snapshot, each with ``age_s`` since its heartbeat.

    Hashes that are not valid JSON snapshots are skipped: a process being
    upgraded must not take the monitor down.
    """
    now = time.time() if now is None else now
    out: list[dict[str, Any]] = []
    for key in redis.scan_iter(layout.metrics_pattern, count=200):
        if len(out) >= _MAX_PROCESSES:
            break
        raw = redis.hget(key, "state")
        if raw is None:
            continue
        try:
            snap = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(snap, dict) or "role" not in snap:
            continue
        snap["age_s"] = max(0.0, now - float(snap.get("heartbeat") or 0.0))
        out.append(snap)
    out.sort(key=lambda s: (str(s.get("role")), str(s.get("name")), str(s.get("process"))))
    return out


def entry_ms(entry_id: Any) -> int:
    """The millisecond part of a stream entry id."""
    return int(_s(entry_id).split("-", 1)[0])


def stream_info(redis: Any, layout: StreamLayout, now: float | None = None) -> list[dict[str, Any]]:
    """Length and per-group pending / lag of every stream of the layout that exists (with the
    dead-letter stream of earlier releases); one key per command, so on a cluster too."""
    import redis as redis_mod

    now_ms = int((time.time() if now is None else now) * 1000)
    out: list[dict[str, Any]] = []
    for name in [*layout.all_streams(), layout.legacy_dlq]:
        try:
            length = int(redis.xlen(name))
            groups_raw = redis.xinfo_groups(name) if redis.exists(name) else []
        except redis_mod.ResponseError:
            continue
        if not length and not groups_raw:
            continue
        groups = []
        for g in groups_raw:
            gname = _s(g["name"])
            pending = int(g.get("pending") or 0)
            lag_raw = g.get("lag")
            lag_entries = int(lag_raw) if lag_raw is not None else None
            oldest_s = 0.0
            if pending:
                p = redis.xpending(name, gname)
                if p and p.get("min"):
                    oldest_s = max(0.0, (now_ms - entry_ms(p["min"])) / 1000)
            last = _s(g.get("last-delivered-id") or "0-0")
            undelivered = redis.xrange(name, f"({last}", "+", count=1) if last != "0-0" or length else []
            if undelivered:
                oldest_s = max(oldest_s, (now_ms - entry_ms(undelivered[0][0])) / 1000)
            groups.append(
                {
                    "group": gname,
                    "consumers": int(g.get("consumers") or 0),
                    "pending": pending,
                    "lag_entries": lag_entries,
                    "lag_s": round(oldest_s, 3),
                }
            )
        out.append({"stream": name, "length": length, "groups": groups})
    return out
