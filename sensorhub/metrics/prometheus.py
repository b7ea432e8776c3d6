"""Prometheus text for the whole appliance, from the snapshots every process publishes to Redis.

One aggregated exporter (``sensorhub metrics-exporter --port 9108``) rather
than an endpoint in every process: the snapshots are already in Redis once a
second, so one scrape target sees every ingest and writer process on the box
(and processes that restart under a new pid appear without changing the
Prometheus configuration); stream length, pending and lag are read with
XINFO at scrape time, so they are right even when no writer is alive. A dead
process's snapshot expires after ``metrics.ttl_s``; until then
``sensorhub_process_up`` is 0 once its heartbeat is older than
``--stale-after``. ``metrics.prometheus_port`` / ``metrics.prometheus_host``
are the exporter's address (9108 by default; port 0: no endpoint, the
command says so and exits).

Hop latencies are histograms (``sensorhub_hop_latency_seconds_bucket{le=...}``,
``_sum``, ``_count``), built from the bucket counts every process publishes,
so that they add up across processes (``histogram_quantile`` over a ``sum by
(le)``); the percentiles stay in the monitor.

Alerts: ``sensorhub_alerts_open{severity}`` (open now) and the counters
``sensorhub_alerts_opened_total`` / ``sensorhub_alerts_closed_total`` by severity,
read from the counts the evaluator keeps in Redis with each event.

Names are ``sensorhub_*``; labels ``process``, ``role``, ``source`` (ingest:
the source name), ``consumer`` (writer), ``hop``, ``le``, ``stream`` and
``group``. Snapshots are read with :mod:`sensorhub.metrics.snapshot`.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sensorhub.alerts.keys import SEVERITIES, read_alerts
from sensorhub.metrics.snapshot import read_snapshots, stream_info
from sensorhub.pipeline.keys import StreamLayout

__all__ = ["SnapshotCollector", "run", "serve"]

# how prometheus_client writes a bucket bound, so that ``le`` matches its own histograms
_le: Callable[[float], str] = floatToGoString

# counters published by each role -> exposed as sensorhub_<role>_<name>_total
_INGEST_COUNTERS = ("frames", "readings", "trades", "acked", "dead_letters", "duplicates", "entries", "redis_errors")
_WRITER_COUNTERS = (
    "rows", "readings", "trades", "dead_letters", "inserts", "retries", "claimed", "lag_alerts", "intents_replayed",
)


def _f(v: Any) -> float:
    if v is None:
        return float("nan")
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


class SnapshotCollector(Collector):
    """A prometheus-client collector that reads Redis at every scrape."""

    def __init__(self, redis: Any, layout: StreamLayout, stale_after_s: float = 5.0) -> None:
        self.redis = redis
        self.layout = layout
        self.stale_after_s = stale_after_s

    def collect(self) -> Iterator[Metric]:
        import redis as redis_mod

        up = GaugeMetricFamily("sensorhub_exporter_redis_up", "1 if the exporter could read Redis")
        try:
            snaps = read_snapshots(self.redis, self.layout)
            streams = stream_info(self.redis, self.layout)
            alerts = read_alerts(self.redis, self.layout, latest=0)
        except (redis_mod.RedisError, OSError):
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from self._processes(snaps)
        yield from self._ingest(s for s in snaps if s.get("role") == "ingest")
        yield from self._writer(s for s in snaps if s.get("role") == "writer")
        yield from self._latency(snaps)
        yield from self._streams(streams)
        yield from self._alerts(alerts)

    def _alerts(self, a: dict[str, Any]) -> Iterator[Metric]:
        """Open alerts and alert events by severity, as the evaluator counts them in Redis (exactly once)."""
        open_ = GaugeMetricFamily("sensorhub_alerts_open", "alerts open now", labels=["severity"])
        opened = CounterMetricFamily("sensorhub_alerts_opened", "alerts opened", labels=["severity"])
        closed = CounterMetricFamily("sensorhub_alerts_closed", "alerts closed", labels=["severity"])
        for sev in SEVERITIES:
            open_.add_metric([sev], float(a["open_by_severity"].get(sev, 0)))
            opened.add_metric([sev], float(a["opened"].get(sev, 0)))
            closed.add_metric([sev], float(a["closed"].get(sev, 0)))
        yield from (open_, opened, closed)

    def _processes(self, snaps: list[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["process", "role", "name"]
        up = GaugeMetricFamily("sensorhub_process_up", "1 if the heartbeat is fresh, 0 if stale", labels=labels)
        age = GaugeMetricFamily("sensorhub_process_heartbeat_age_seconds", "seconds since the last snapshot",
                                labels=labels)
        rss = GaugeMetricFamily("sensorhub_process_resident_memory_bytes", "resident set size", labels=labels)
        cpu = GaugeMetricFamily("sensorhub_process_cpu_percent", "CPU use over the last interval", labels=labels)
        started = GaugeMetricFamily("sensorhub_process_start_time_seconds", "process start, Unix time", labels=labels)
        rate = GaugeMetricFamily("sensorhub_rate_per_second", "per-second rate of a counter as the process sees it",
                                 labels=[*labels, "counter"])
        for s in snaps:
            lv = [str(s.get("process")), str(s.get("role")), str(s.get("name"))]
            up.add_metric(lv, 0.0 if s["age_s"] > self.stale_after_s else 1.0)
            age.add_metric(lv, s["age_s"])
            rss.add_metric(lv, _f(s.get("rss_bytes")))
            cpu.add_metric(lv, _f(s.get("cpu_percent")))
            started.add_metric(lv, _f(s.get("started")))
            for k, v in sorted((s.get("rates") or {}).items()):
                rate.add_metric([*lv, k], _f(v))
        yield from (up, age, rss, cpu, started, rate)

    def _ingest(self, snaps: Iterator[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["process", "source"]
        counters = {
            c: CounterMetricFamily(f"sensorhub_source_{c}", f"{c.replace('_', ' ')} since the process started",
                                   labels=labels)
            for c in _INGEST_COUNTERS
        }
        gauges = {
            "connected": GaugeMetricFamily("sensorhub_source_connected", "1 if connected to its peer", labels=labels),
            "last_frame_age_s": GaugeMetricFamily("sensorhub_source_last_message_age_seconds",
                                                  "seconds since the last message", labels=labels),
            "redis_ok": GaugeMetricFamily("sensorhub_source_redis_ok", "1 if the last write to Redis succeeded",
                                          labels=labels),
        }
        reconnects = CounterMetricFamily("sensorhub_source_reconnects", "reconnections since start", labels=labels)
        parse_errors = CounterMetricFamily("sensorhub_source_parse_errors",
                                           "frames an exchange feed's parser refused since start", labels=labels)
        unhealthy = GaugeMetricFamily("sensorhub_source_unhealthy",
                                      "1 while an exchange feed's trade frames keep yielding no trade", labels=labels)
        gaps = CounterMetricFamily("sensorhub_source_gaps", "sequence gaps seen on an exchange feed since start",
                                   labels=[*labels, "kind"])
        for s in snaps:
            lv = [str(s.get("process")), str(s.get("name"))]
            c = s.get("counters") or {}
            g = s.get("gauges") or {}
            for name, fam in counters.items():
                fam.add_metric(lv, _f(c.get(name, 0)))
            for name, gf in gauges.items():
                if name in g:
                    gf.add_metric(lv, _f(g[name]))
            reconnects.add_metric(lv, _f(g.get("reconnects", 0)))
            parse_errors.add_metric(lv, _f(g.get("parse_errors") or 0))
            unhealthy.add_metric(lv, 1.0 if g.get("unhealthy") else 0.0)  # the reason is in the monitor
            gaps.add_metric([*lv, str(g.get("kind") or "")], _f(g.get("gaps", 0)))
        yield from counters.values()
        yield from gauges.values()
        yield reconnects
        yield gaps
        yield parse_errors
        yield unhealthy

    def _writer(self, snaps: Iterator[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["process", "consumer"]
        counters = {
            c: CounterMetricFamily(f"sensorhub_writer_{c}", f"{c.replace('_', ' ')} since the process started",
                                   labels=labels)
            for c in _WRITER_COUNTERS
        }
        gauges = {
            "lag_s": ("sensorhub_writer_lag_seconds", "age of the oldest entry not yet inserted"),
            "backlog_entries": ("sensorhub_writer_backlog_entries", "stream entries not yet inserted"),
            "lag_alert": ("sensorhub_writer_lag_alert", "1 while the lag is over writer.lag_alert_s"),
            "clickhouse_ok": ("sensorhub_writer_clickhouse_up", "1 if the last ClickHouse call succeeded"),
            "last_batch_rows": ("sensorhub_writer_batch_rows", "rows in the last INSERT"),
            "reconciled": ("sensorhub_writer_reconciled", "1 if the last reconciliation matched"),
        }
        gfam = {k: GaugeMetricFamily(n, h, labels=labels) for k, (n, h) in gauges.items()}
        for s in snaps:
            g = s.get("gauges") or {}
            c = s.get("counters") or {}
            lv = [str(s.get("process")), str(g.get("consumer") or s.get("name"))]
            for name, fam in counters.items():
                fam.add_metric(lv, _f(c.get(name, 0)))
            for name, gf in gfam.items():
                if name in g:
                    gf.add_metric(lv, _f(g[name]))
        yield from counters.values()
        yield from gfam.values()

    def _latency(self, snaps: list[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["process", "role", "source", "hop"]
        hist = HistogramMetricFamily("sensorhub_hop_latency_seconds",
                                     "latency of a hop of the data path since the process started",
                                     labels=labels)
        mx = GaugeMetricFamily("sensorhub_hop_latency_max_seconds", "largest latency of the hop", labels=labels)
        for s in snaps:
            lv = [str(s.get("process")), str(s.get("role")), str(s.get("name"))]
            les = [_le(us / 1e6) for us in s.get("histogram_le_us") or ()]
            for hop, h in sorted((s.get("histograms") or {}).items()):
                cum = h.get("cumulative") or []
                if len(cum) != len(les):
                    continue  # a snapshot this exporter cannot read: leave it out rather than lie
                buckets = [(le, _f(n)) for le, n in zip(les, cum, strict=True)]
                buckets.append(("+Inf", _f(h.get("count", 0))))
                hist.add_metric([*lv, hop], buckets, _f(h.get("sum_us", 0)) / 1e6)
            for hop, st in sorted((s.get("latency") or {}).items()):
                mx.add_metric([*lv, hop], _f(st.get("max_ms")) / 1000.0)
        yield from (hist, mx)

    def _streams(self, streams: list[dict[str, Any]]) -> Iterator[Metric]:
        length = GaugeMetricFamily("sensorhub_stream_length", "entries in the stream", labels=["stream"])
        g_labels = ["stream", "group"]
        pending = GaugeMetricFamily("sensorhub_stream_pending_entries", "delivered, not yet acknowledged",
                                    labels=g_labels)
        lag_e = GaugeMetricFamily("sensorhub_stream_lag_entries", "entries not yet delivered to the group",
                                  labels=g_labels)
        lag_s = GaugeMetricFamily("sensorhub_stream_lag_seconds",
                                  "age of the oldest entry pending or not yet delivered", labels=g_labels)
        consumers = GaugeMetricFamily("sensorhub_stream_consumers", "consumers in the group", labels=g_labels)
        for st in streams:
            length.add_metric([st["stream"]], float(st["length"]))
            for g in st["groups"]:
                lv = [st["stream"], g["group"]]
                pending.add_metric(lv, float(g["pending"]))
                lag_e.add_metric(lv, _f(g["lag_entries"]))
                lag_s.add_metric(lv, float(g["lag_s"]))
                consumers.add_metric(lv, float(g["consumers"]))
        yield from (length, pending, lag_e, lag_s, consumers)


def serve(redis: Any, layout: StreamLayout, host: str, port: int, stale_after_s: float = 5.0) -> Any:
    """Start the HTTP endpoint in a background thread; returns the server (``shutdown()`` stops it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(redis, layout, stale_after_s))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


# ---- command line ----
def run(args: argparse.Namespace) -> int:
    from sensorhub.config import load_settings
    from sensorhub.pipeline.redisconn import redis_client

    s = load_settings(args.config)
    r = redis_client(s.redis, args.redis or s.redis.url, socket_timeout=2.0, socket_connect_timeout=2.0)
    host = args.host or s.metrics.prometheus_host
    port = args.port if args.port is not None else s.metrics.prometheus_port
    if port == 0:
        print("no /metrics endpoint: the port is 0 (set metrics.prometheus_port or pass --port)", flush=True)
        return 0
    stop = threading.Event()

    def on_signal(_sig: int, _frm: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = serve(r, StreamLayout(s.redis.prefix, s.redis.partitions), host, port, args.stale_after)
    print(f"serving http://{host}:{server.server_port}/metrics", flush=True)
    deadline = time.monotonic() + args.exit_after if args.exit_after > 0 else None
    try:
        while not stop.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        server.shutdown()
        server.server_close()
    return 0
