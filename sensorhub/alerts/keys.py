"""Redis names of the alert part, and the counts the monitor and /metrics read: no codec, no engine."""

from __future__ import annotations

import json
from typing import Any

from sensorhub.pipeline.keys import StreamLayout

__all__ = ["SEVERITIES", "AlertKeys", "read_alerts"]

SEVERITIES = ("info", "warning", "critical")


class AlertKeys:
    """The Redis names of the alert part (all under one hash tag: one script writes them together)."""

    def __init__(self, layout: StreamLayout) -> None:
        self.events = layout.alerts("events")  # stream, field "e": the event's JSON
        self.channel = layout.alerts("live")  # pub/sub, the same JSON
        self.open = layout.alerts("open")  # hash: alert id -> JSON of its open event
        self.counts = layout.alerts("counts")  # hash: open:<severity>, opened:<severity>, closed:<severity>
        self.last = layout.alerts("last")  # hash: series -> position of its last emitted event
        self.checkpoint = layout.alerts("checkpoint")  # the evaluator's state (msgpack)
        self.positions = layout.alerts("positions")  # hash: stream -> last entry id the checkpoint holds


def read_alerts(redis: Any, layout: StreamLayout, latest: int = 5) -> dict[str, Any]:
    """Open alerts by severity, opened and closed counts, and the ``latest`` open ones (newest first,
    by the receive time of the reading that opened them).

    Bounded: at most 200 open alerts are read to pick the latest from.
    """
    keys = AlertKeys(layout)
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.counts)
    pipe.hlen(keys.open)
    counts_raw, n_open = pipe.execute()
    counts = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in counts_raw.items()}
    open_alerts: list[dict[str, Any]] = []
    if n_open and latest > 0:
        raw_list = (redis.hvals(keys.open) if n_open <= 200
                    else [v for _k, v in redis.hscan(keys.open, count=200)[1].items()][:200])
        for raw in raw_list:
            try:
                open_alerts.append(json.loads(raw))
            except ValueError:
                continue
    open_alerts.sort(key=lambda e: -float(e.get("recv") or 0))  # newest by receive time
    return {
        "open": int(n_open),
        "open_by_severity": {s: max(0, counts.get(f"open:{s}", 0)) for s in SEVERITIES},
        "opened": {s: counts.get(f"opened:{s}", 0) for s in SEVERITIES},
        "closed": {s: counts.get(f"closed:{s}", 0) for s in SEVERITIES},
        "latest": [
            {k: e.get(k) for k in ("rule", "device", "metric", "severity", "value", "threshold", "opened")}
            for e in open_alerts[:latest]
        ],
    }
