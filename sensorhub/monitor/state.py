"""One consistent picture of the appliance, read from Redis (and ClickHouse for totals).

The monitor and ``--json`` both render the dict :meth:`StateCollector.collect`
returns. The snapshots and the stream figures come from
:mod:`sensorhub.metrics.snapshot`, which the Prometheus exporter reads too. Nothing here writes anywhere: the monitor may run on any
number of terminals without touching the data path.

Keys of the state dict (stable, scripts read ``--json``):

``time``, ``redis`` {ok, url, error}, ``clickhouse`` {ok, url, error, checked},
``sources`` (one per ingest process), ``writers``, ``streams`` (per stream:
length, and per consumer group pending, lag entries, oldest pending age),
``pipeline`` (backlog, lag, alert, throughput), ``latency`` (per hop, worst
process, with the p99 history), ``dead_letters`` {count_today, stream_len,
latest}, ``totals`` (received vs stored today, reconciled), ``events``,
``alerts`` (open by severity, opened and closed counts, the latest open ones, the
evaluator and gateway processes),
``verdict`` (flowing, lost, delay: the three questions answered in words).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sensorhub.alerts.keys import read_alerts
from sensorhub.metrics.hops import HOPS, PIPELINE_HOPS
from sensorhub.metrics.snapshot import entry_ms, read_snapshots, stream_info
from sensorhub.pipeline.audit import audit_rows
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.lag import id_tuple
from sensorhub.sinks.schema import ENGINE_SETTINGS

__all__ = [
    "ALL_HOPS",
    "StateCollector",
    "read_events",
    "read_snapshots",
    "stream_info",
]

#: Hops shown in the latency panel, in data-path order.
ALL_HOPS: tuple[str, ...] = HOPS

# Bounds: every read from Redis is limited in count.
_MAX_DLQ_LATEST = 8
_MAX_EVENTS = 20


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def read_events(redis: Any, layout: StreamLayout, count: int = _MAX_EVENTS) -> list[dict[str, Any]]:
    """The latest operator events (lag alerts, reconciliations), newest first."""
    out = []
    for entry_id, fields in redis.xrevrange(layout.events, count=count):
        f = {_s(k): _s(v) for k, v in fields.items()}
        try:
            data = json.loads(f.get("data", "{}"))
        except ValueError:
            data = {"raw": f.get("data")}
        out.append(
            {"time": entry_ms(entry_id) / 1000, "kind": f.get("kind", ""), "process": f.get("process", ""), "data": data}
        )
    return out


def _source_row(s: dict[str, Any], stale_after_s: float) -> dict[str, Any]:
    g = s.get("gauges", {})
    c = s.get("counters", {})
    r = s.get("rates", {})
    stale = s["age_s"] > stale_after_s
    connected = bool(g.get("connected"))
    if stale:
        status = "stale"
    elif not connected:
        status = "down"
    elif g.get("redis_ok") is False:
        status = "redis-err"
    elif g.get("unhealthy"):
        status = "parse-errors"  # connected, but its frames keep failing: nothing of them is stored
    else:
        status = "ok"
    kind = g.get("kind")  # the source's record kind as the ingest publishes it (Source.kind): reading, trade
    if kind not in ("reading", "trade"):
        kind = "trade" if c.get("trades") else "reading"
    rows_key = "trades" if kind == "trade" else "readings"
    return {
        "name": s.get("name"),
        "process": s.get("process"),
        "kind": kind,
        "status": status,
        "stale": stale,
        "age_s": round(s["age_s"], 1),
        "connected": connected,
        "frames_per_s": float(r.get("frames", 0.0)),
        "rows_per_s": float(r.get(rows_key, 0.0)),
        "frames": int(c.get("frames", 0)),
        "rows": int(c.get(rows_key, 0)),
        "dead_letters": int(c.get("dead_letters", 0)),
        "redis_errors": int(c.get("redis_errors", 0)),
        "duplicates": int(c.get("duplicates", 0)),
        "reconnects": int(g.get("reconnects") or 0),
        "gaps": int(g.get("gaps") or 0),
        "last_frame_age_s": g.get("last_frame_age_s"),
        "last_dead_letter": g.get("last_dead_letter"),
        "parse_errors": int(g.get("parse_errors") or 0),
        "unhealthy": g.get("unhealthy") or None,
        "rss_bytes": int(s.get("rss_bytes") or 0),
        "cpu_percent": float(s.get("cpu_percent") or 0.0),
    }


def _writer_row(s: dict[str, Any], stale_after_s: float) -> dict[str, Any]:
    g = s.get("gauges", {})
    c = s.get("counters", {})
    r = s.get("rates", {})
    ins = s.get("latency", {}).get("insert", {})
    return {
        "name": s.get("name"),
        "process": s.get("process"),
        "stale": s["age_s"] > stale_after_s,
        "age_s": round(s["age_s"], 1),
        "state": g.get("state", "?"),
        "rows_per_s": float(r.get("rows", 0.0)),
        "inserts_per_s": float(r.get("inserts", 0.0)),
        "rows": int(c.get("rows", 0)),
        "retries": int(c.get("retries", 0)),
        "lag_s": float(g.get("lag_s") or 0.0),
        "lag_alert": bool(g.get("lag_alert")),
        "backlog_entries": int(g.get("backlog_entries") or 0),
        "clickhouse_ok": g.get("clickhouse_ok"),
        "last_batch_rows": int(g.get("last_batch_rows") or 0),
        "insert_p99_ms": float(ins.get("p99_ms", 0.0)),
        "reconciled": g.get("reconciled"),
        "reconcile_detail": g.get("reconcile_detail"),
        "rss_bytes": int(s.get("rss_bytes") or 0),
        "cpu_percent": float(s.get("cpu_percent") or 0.0),
    }


P99_MINUTES = 10  # how many minutes of per-minute p99 the latency panel shows


def _latency(snaps: list[dict[str, Any]], stale_after_s: float) -> dict[str, dict[str, Any]]:
    """Per hop the worst live process (highest p99): the monitor looks for delay."""
    out: dict[str, dict[str, Any]] = {}
    for s in snaps:
        if s["age_s"] > stale_after_s:
            continue
        for hop, st in (s.get("latency") or {}).items():
            if not st.get("count"):
                continue
            cur = out.get(hop)
            if cur is None or st.get("p99_ms", 0.0) > cur["p99_ms"]:
                out[hop] = {
                    "count": int(st.get("count", 0)) + (cur["count"] if cur else 0),
                    "p50_ms": float(st.get("p50_ms", 0.0)),
                    "p95_ms": float(st.get("p95_ms", 0.0)),
                    "p99_ms": float(st.get("p99_ms", 0.0)),
                    "max_ms": float(st.get("max_ms", 0.0)),
                    "process": s.get("process"),
                }
            else:
                cur["count"] += int(st.get("count", 0))
    return out


def _today_minute(now: float) -> int:
    d = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(d.timestamp()) // 60


class StateCollector:
    """Collects the state dict; keeps the bounded p99 history and the ClickHouse connection.

    ``ch_factory`` returns a clickhouse-connect client or raises; it is called
    again (at most every ``ch_interval_s``) after a failure, so ClickHouse
    coming back is noticed. ClickHouse figures are refreshed every
    ``ch_interval_s`` and the last good ones are shown in between.
    """

    def __init__(
        self,
        redis: Any,
        layout: StreamLayout,
        *,
        group: str = "writers",
        database: str = "sensorhub",
        ch_factory: Callable[[], Any] | None = None,
        ch_url: str = "",
        redis_url: str = "",
        stale_after_s: float = 5.0,
        lag_alert_s: float = 5.0,
        history_len: int = 150,
        history_interval_s: float = 2.0,
        ch_interval_s: float = 5.0,
        disk_alert_days: float = 7.0,
        disk_alert_free_pct: float = 5.0,
    ) -> None:
        self.redis = redis
        self.layout = layout
        self.group = group
        self.database = database
        self.ch_factory = ch_factory
        self.ch_url = ch_url
        self.redis_url = redis_url
        self.stale_after_s = stale_after_s
        self.lag_alert_s = lag_alert_s
        self.history_interval_s = history_interval_s
        self.ch_interval_s = ch_interval_s
        self.disk_alert_days = disk_alert_days
        self.disk_alert_free_pct = disk_alert_free_pct
        self.history: dict[str, deque[float]] = {h: deque(maxlen=history_len) for h in ALL_HOPS}
        self._history_len = history_len
        self._last_hist = 0.0
        self._ch: Any = None
        self._ch_checked = 0.0
        self._ch_state: dict[str, Any] = {"ok": False, "url": ch_url, "error": "not checked", "checked": None}
        self._ch_figures: dict[str, Any] = {}

    # ---- ClickHouse, optional ----
    def _clickhouse(self, now: float, today_minute: int) -> None:
        if self.ch_factory is None:
            self._ch_state = {"ok": False, "url": self.ch_url, "error": "not configured", "checked": None}
            return
        if self._ch_checked and now - self._ch_checked < self.ch_interval_s:
            return
        self._ch_checked = now
        try:
            if self._ch is None:
                self._ch = self.ch_factory()
            # "inserted" read before the count: every row counted here was in ClickHouse
            # before the count began, so inserted_before > stored means a real loss even
            # while the writer keeps inserting
            inserted_before = sum(
                r.get("inserted", 0) for r in audit_rows(self.redis, self.layout) if r["minute"] >= today_minute
            )
            db = self.database
            since = f"fromUnixTimestamp64Micro(toInt64({today_minute * 60}) * 1000000)"
            readings = int(self._ch.command(f"SELECT count() FROM {db}.readings WHERE recv >= {since}") or 0)
            trades = int(self._ch.command(f"SELECT count() FROM {db}.trades WHERE recv >= {since}") or 0)
            dead = int(self._ch.command(f"SELECT count() FROM {db}.dead_letters WHERE recv >= {since}") or 0)
            q = self._ch.query(
                f"SELECT source, topic, error, toUnixTimestamp64Micro(recv) FROM {db}.dead_letters "
                f"ORDER BY recv DESC LIMIT {_MAX_DLQ_LATEST}"
            )
            latest = [
                {"source": s, "topic": t, "error": e, "time": int(us) / 1e6, "where": "clickhouse"}
                for s, t, e, us in q.result_rows
            ]
            # the database's parts, and the disk ClickHouse keeps them on
            parts = self._ch.query(
                "SELECT table, sum(bytes_on_disk), sum(rows) FROM system.parts "
                "WHERE active AND database = {db:String} GROUP BY table",
                parameters={"db": db},
            ).result_rows
            disks = self._ch.query("SELECT free_space, total_space FROM system.disks WHERE name = 'default'").result_rows
            # per hop and minute, the worst interval p99 any process exported (hop_latency): a drift
            # shows here while the percentiles since process start hardly move
            per_minute = self._ch.query(
                f"SELECT hop, toUnixTimestamp(toStartOfMinute(interval_start)) AS m, max(p99_ms) "
                f"FROM {db}.hop_latency WHERE interval_start >= now() - INTERVAL {P99_MINUTES} MINUTE "
                "GROUP BY hop, m ORDER BY hop, m"
            ).result_rows
            p99_minutes: dict[str, list[tuple[int, float]]] = {}
            for hop, m, p99 in per_minute:
                p99_minutes.setdefault(str(hop), []).append((int(m), float(p99)))
            self._ch_figures = {
                "readings": readings, "trades": trades, "dead": dead, "latest": latest,
                "inserted_before": inserted_before,
                "parts": {str(t): (int(b), int(r)) for t, b, r in parts},
                "disk": (int(disks[0][0]), int(disks[0][1])) if disks else None,
                "p99_minutes": p99_minutes,
            }
            self._ch_state = {"ok": True, "url": self.ch_url, "error": None, "checked": now}
        except Exception as exc:  # any failure means "ClickHouse down" on screen
            self._ch = None
            self._ch_state = {
                "ok": False,
                "url": self.ch_url,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                "checked": now,
            }

    def _dlq_latest(self) -> list[dict[str, Any]]:
        """The newest dead letters still in Redis, over every partition's stream (and the old one)."""
        pipe = self.redis.pipeline(transaction=False)
        for s in self.layout.dlq_streams():
            pipe.xrevrange(s, count=_MAX_DLQ_LATEST)
        newest = sorted(
            (e for entries in pipe.execute() for e in entries), key=lambda e: id_tuple(e[0]), reverse=True
        )[:_MAX_DLQ_LATEST]
        out = []
        for entry_id, fields in newest:
            f = {_s(k): v for k, v in fields.items()}
            out.append(
                {
                    "source": _s(f.get("src", b"")),
                    "topic": _s(f.get("topic", b"")),
                    "error": _s(f.get("error", b"")),
                    # receive time, as ClickHouse stores it: the same letter in both dedups
                    "time": int(_s(f.get("recv_ns", b"0")) or 0) / 1e9 or entry_ms(entry_id) / 1000,
                    "where": "stream",
                }
            )
        return out

    def collect(self, now: float | None = None) -> dict[str, Any]:
        """Read everything once and return the state dict (never raises for a down peer)."""
        import redis as redis_mod

        now = time.time() if now is None else now
        today = _today_minute(now)
        state: dict[str, Any] = {
            "time": now,
            "redis": {"ok": True, "url": self.redis_url, "error": None},
            "stale_after_s": self.stale_after_s,
            "lag_alert_s": self.lag_alert_s,
        }
        snaps: list[dict[str, Any]] = []
        streams: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        audit: list[dict[str, Any]] = []
        dlq_latest: list[dict[str, Any]] = []
        dlq_len = 0
        alerts: dict[str, Any] = {}
        try:
            snaps = read_snapshots(self.redis, self.layout, now)
            streams = stream_info(self.redis, self.layout, now)
            events = read_events(self.redis, self.layout)
            audit = [r for r in audit_rows(self.redis, self.layout) if r["minute"] >= today]
            dlq_latest = self._dlq_latest()
            pipe = self.redis.pipeline(transaction=False)
            for s in self.layout.dlq_streams():
                pipe.xlen(s)
            dlq_len = sum(int(n) for n in pipe.execute())
            alerts = read_alerts(self.redis, self.layout)
        except (redis_mod.RedisError, OSError) as exc:
            state["redis"] = {"ok": False, "url": self.redis_url, "error": f"{type(exc).__name__}: {exc}"}
        self._clickhouse(now, today)
        state["clickhouse"] = dict(self._ch_state)

        sources = [_source_row(s, self.stale_after_s) for s in snaps if s.get("role") == "ingest"]
        writers = [_writer_row(s, self.stale_after_s) for s in snaps if s.get("role") == "writer"]
        state["sources"] = sources
        state["writers"] = writers
        state["streams"] = streams
        state["events"] = events
        state["alerts"] = {
            **alerts,
            "processes": [
                {"role": s.get("role"), "name": s.get("name"), "stale": s["age_s"] > self.stale_after_s,
                 "state": (s.get("gauges") or {}).get("state"), "clients": (s.get("gauges") or {}).get("clients"),
                 "backlog_entries": (s.get("gauges") or {}).get("backlog_entries")}
                for s in snaps if s.get("role") in ("alerts", "gateway")
            ],
        }

        # pipeline: backlog and lag from the streams themselves (true even with no writer
        # alive), and the writers' own view
        group_rows = [g for st in streams for g in st["groups"] if g["group"] == self.group]
        stream_lag = max((g["lag_s"] for g in group_rows), default=0.0)
        live_w = [w for w in writers if not w["stale"]]
        lag_s = max([stream_lag] + [w["lag_s"] for w in live_w])
        backlog = sum((g["lag_entries"] or 0) + g["pending"] for g in group_rows)
        state["pipeline"] = {
            "backlog_entries": backlog,
            "lag_s": round(lag_s, 3),
            "lag_alert": lag_s > self.lag_alert_s or any(w["lag_alert"] for w in live_w),
            "writer_rows_per_s": sum(w["rows_per_s"] for w in live_w),
            "ingest_rows_per_s": sum(s["rows_per_s"] for s in sources if not s["stale"]),
            "writers_live": len(live_w),
            "writers_stale": len(writers) - len(live_w),
            "stream_entries": sum(st["length"] for st in streams),
        }

        lat = _latency(snaps, self.stale_after_s)
        if now - self._last_hist >= self.history_interval_s:
            self._last_hist = now
            for hop in set(ALL_HOPS) | set(lat):
                h = self.history.setdefault(hop, deque(maxlen=self._history_len))
                h.append(lat[hop]["p99_ms"] if hop in lat else 0.0)
        minutes = (self._ch_figures or {}).get("p99_minutes", {})
        for hop, st in lat.items():
            st["p99_history"] = list(self.history.get(hop, ()))
            st["p99_minutes"] = [{"minute": m, "p99_ms": v} for m, v in minutes.get(hop, [])]
        state["latency"] = lat

        chf = self._ch_figures
        ch_ok = bool(state["clickhouse"]["ok"])
        latest = sorted(dlq_latest + (chf.get("latest", []) if chf else []), key=lambda d: -d["time"])
        seen: set[tuple[str, str, float]] = set()
        uniq = []
        for d in latest:
            k = (d["source"], d["error"], round(d["time"], 6))
            if k not in seen:
                seen.add(k)
                uniq.append(d)
        # dead letters: payloads ingest could not decode, and readings the writer did not store
        writer_dead = sum(r.get("writer_dead_lettered", 0) for r in audit)
        state["dead_letters"] = {
            "count_today": sum(r.get("dead_lettered", 0) for r in audit) + writer_dead,
            "stored_today": chf.get("dead") if chf else None,
            "stream_len": dlq_len,
            "since_start": sum(s["dead_letters"] for s in sources),
            "latest": uniq[:_MAX_DLQ_LATEST],
        }

        received = sum(r.get("received", 0) for r in audit)
        xadded = sum(r.get("xadded", 0) for r in audit)
        inserted = sum(r.get("inserted", 0) for r in audit)
        stored = (chf["readings"] + chf["trades"]) if chf else None
        reconciled: bool | None = None
        detail = ""
        recon_w = [w for w in writers if w["reconciled"] is not None]
        if recon_w:
            reconciled = all(bool(w["reconciled"]) for w in recon_w)
            detail = str(recon_w[0]["reconcile_detail"] or "")
        else:
            ev = next((e for e in events if e["kind"] == "reconcile"), None)
            if ev is not None:
                reconciled = bool(ev["data"].get("ok"))
                detail = str(ev["data"].get("detail", ""))
        missing = max(0, chf["inserted_before"] - stored) if stored is not None else None
        state["totals"] = {
            "day": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d"),
            "received": received,
            "duplicates": sum(r.get("duplicates", 0) for r in audit),
            "dead_lettered": sum(r.get("dead_lettered", 0) for r in audit),
            "writer_dead_lettered": writer_dead,
            "xadded": xadded,
            "inserted": inserted,
            "pending": xadded - inserted - writer_dead,
            "stored": stored,
            "stored_fresh": ch_ok,
            "stored_age_s": round(now - float(state["clickhouse"]["checked"]), 1) if chf and ch_ok else None,
            "missing": missing,
            "reconciled": reconciled,
            "reconcile_detail": detail,
        }
        state["disk"] = self._disk(chf, state["pipeline"])
        state["verdict"] = self._verdict(state)
        return state

    def _disk(self, chf: dict[str, Any], pipeline: dict[str, Any]) -> dict[str, Any]:
        """Bytes on disk, bytes a day at the current rate and days until the disk is full.

        A day's bytes are the rows stored per second now times what a stored
        row costs on disk today (bytes over rows of the database's active
        parts), so merges and codecs are counted as they are. "Full" is where
        the tables refuse INSERTs: with less than their floor
        (``min_free_disk_ratio_to_perform_insert``) of the disk free.
        """
        parts: dict[str, tuple[int, int]] = chf.get("parts") or {}
        disk = chf.get("disk")
        used = sum(b for b, _ in parts.values())
        rows = sum(r for _, r in parts.values())
        out: dict[str, Any] = {
            "bytes_on_disk": used if parts else None, "free_bytes": None, "total_bytes": None,
            "bytes_per_row": round(used / rows, 2) if rows else None,
            "bytes_per_day": None, "days_until_full": None, "alert": None,
            "alert_days": self.disk_alert_days, "alert_free_pct": self.disk_alert_free_pct,
        }
        if disk is None:
            return out
        free, total = disk
        out["free_bytes"], out["total_bytes"] = free, total
        rate = float(pipeline.get("writer_rows_per_s") or 0.0)
        if rows and rate > 0:
            per_day = used / rows * rate * 86400
            out["bytes_per_day"] = int(per_day)
            floor = float(ENGINE_SETTINGS["min_free_disk_ratio_to_perform_insert"]) * total
            out["days_until_full"] = round(max(0.0, free - floor) / per_day, 1)
        alerts = []
        if total and free / total * 100 < self.disk_alert_free_pct:
            alerts.append(f"{free / total * 100:.1f} % free")
        if out["days_until_full"] is not None and out["days_until_full"] < self.disk_alert_days:
            alerts.append(f"full in {out['days_until_full']} days at this rate")
        out["alert"] = "; ".join(alerts) or None
        return out

    def _verdict(self, st: dict[str, Any]) -> dict[str, Any]:
        """Is data flowing, is anything lost, where is the delay: in words."""
        p = st["pipeline"]
        live = [s for s in st["sources"] if not s["stale"]]
        if not st["redis"]["ok"]:
            flowing = "REDIS DOWN"
        elif not st["sources"]:
            flowing = "no ingest process"
        elif p["ingest_rows_per_s"] > 0 and p["writer_rows_per_s"] > 0:
            flowing = "yes"
        elif p["ingest_rows_per_s"] > 0:
            flowing = "in only, not stored" if p["writers_live"] == 0 else "in, writer idle"
        elif not live:
            flowing = "all sources stale"
        else:
            flowing = "idle"
        t = st["totals"]
        if t["missing"] is not None and t["missing"] > 0:
            lost = f"{t['missing']} inserted rows not in ClickHouse"
        elif t["reconciled"] is False:
            lost = "audit mismatch"
        elif t["missing"] is None:
            lost = "unknown (ClickHouse down)" if st["clickhouse"]["error"] != "not configured" else "no ClickHouse"
        else:
            lost = "none"
        worst = max(
            ((h, v["p99_ms"]) for h, v in st["latency"].items() if h in PIPELINE_HOPS),
            key=lambda x: x[1],
            default=None,
        )
        delay = f"{worst[0]} p99 {worst[1]:.1f} ms" if worst else "-"
        if p["lag_alert"]:
            delay = f"LAG ALERT {p['lag_s']:.1f} s; " + delay
        return {"flowing": flowing, "lost": lost, "delay": delay}
