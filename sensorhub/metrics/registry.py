"""Process metrics: counters, gauges and HDR latency histograms, published to Redis.

Every process owns one :class:`Metrics`. Once a second it writes a JSON
snapshot to the hash ``<prefix>:metrics:<process>`` (field ``state``) with an
expiry, so a dead process disappears from the monitor after ``ttl_s``. The
histograms are cumulative since start (percentiles for the monitor) and also
kept per interval (what the writer stores in ``hop_latency``). Hop names are
those of :mod:`sensorhub.metrics.hops`.

Besides the percentiles, each hop is counted in fixed buckets
(:data:`LATENCY_BUCKETS_US`): the snapshot's ``histograms`` hold, per hop, the
cumulative count of observations at or below each bound, the total count and
the sum. Percentiles cannot be added up across processes; these counts can,
and the Prometheus exporter serves them as histograms.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import psutil
from hdrh.histogram import HdrHistogram

from sensorhub.metrics import gcstats
from sensorhub.metrics.hops import HOPS

__all__ = ["HOPS", "LATENCY_BUCKETS_US", "Metrics"]

# Latency is recorded in microseconds, 1 µs .. 1 hour, 3 significant digits.
_LOWEST, _HIGHEST, _DIGITS = 1, 3_600_000_000, 3

#: Upper bounds (inclusive, µs) of the latency buckets every process publishes; the same
#: for every process, so that Prometheus can add them up. 50 µs to 1 minute.
LATENCY_BUCKETS_US: tuple[int, ...] = (
    50, 100, 250, 500,
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
)

_PUBLISH_SCRIPT = """#!lua flags=allow-oom
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return redis.call('EXPIRE', KEYS[1], ARGV[2])
"""


def _hist() -> HdrHistogram:
    return HdrHistogram(_LOWEST, _HIGHEST, _DIGITS)


def percentiles(h: HdrHistogram) -> dict[str, float]:
    if h.get_total_count() == 0:
        return {"count": 0, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {
        "count": int(h.get_total_count()),
        "p50_ms": h.get_value_at_percentile(50) / 1000.0,
        "p95_ms": h.get_value_at_percentile(95) / 1000.0,
        "p99_ms": h.get_value_at_percentile(99) / 1000.0,
        "max_ms": h.get_max_value() / 1000.0,
    }


def _cumulative(counts: list[int], sum_us: int) -> dict[str, Any]:
    """Per-bucket counts as Prometheus wants them: at or below each bound, then the total."""
    cum, total = [], 0
    for n in counts[:-1]:
        total += n
        cum.append(total)
    return {"cumulative": cum, "count": total + counts[-1], "sum_us": sum_us}


class Metrics:
    """Counters, gauges and histograms of one process; thread-safe."""

    def __init__(self, role: str, name: str) -> None:
        self.role = role
        self.name = name
        self.process = f"{role}:{name}:{socket.gethostname()}:{os.getpid()}"
        self.started = time.time()
        self.counters: dict[str, int] = defaultdict(int)
        self.gauges: dict[str, Any] = {}
        self._hists: dict[str, HdrHistogram] = defaultdict(_hist)
        self._interval: dict[str, HdrHistogram] = defaultdict(_hist)
        # per hop: observations per bucket (the last one past every bound), and their sum
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS_US) + 1))
        self._sums: dict[str, int] = defaultdict(int)
        self._interval_start = time.time()
        self._lock = threading.Lock()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self._rates: dict[str, float] = {}
        self._last_counts: dict[str, int] = {}
        self._last_t = time.monotonic()
        self._script: Any = None

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def set(self, name: str, value: Any) -> None:
        self.gauges[name] = value

    def record_us(self, hop: str, value_us: float, count: int = 1) -> None:
        with self._lock:
            self._record_locked(hop, value_us, count)

    def _record_locked(self, hop: str, value_us: float, count: int) -> None:
        """One value ``count`` times into every view of ``hop``; the caller holds the lock."""
        v = int(value_us)
        if v < _LOWEST:
            v = _LOWEST
        elif v > _HIGHEST:
            v = _HIGHEST
        self._hists[hop].record_value(v, count)
        self._interval[hop].record_value(v, count)
        self._buckets[hop][bisect_left(LATENCY_BUCKETS_US, v)] += count
        self._sums[hop] += v * count

    def record_since(self, hop: str, now: int, times: Sequence[int], per_us: int = 1, most: int = 64) -> None:
        """``now - t`` for every ``t`` of ``times``, with at most ``most`` of them recorded.

        ``now`` and ``times`` are in units of ``1 / per_us`` µs (1 for µs, 1000 for ns). Every
        ``stride``-th value is recorded with the weight of the ``stride`` values it stands for, so
        the counts are exact and the percentiles those of an even sample: recording costs a few µs
        a value (pure-Python HdrHistogram), and a batch of thousands of readings would cost more
        than the rest of its handling.
        """
        n = len(times)
        if not n:
            return
        stride = -(-n // max(1, most))
        with self._lock:
            for i in range(0, n, stride):
                self._record_locked(hop, (now - times[i]) / per_us, min(stride, n - i))

    def take_interval(self) -> tuple[float, float, dict[str, dict[str, float]]]:
        """Per-hop percentiles since the last call (start time, seconds, stats)."""
        with self._lock:
            now = time.time()
            start, self._interval_start = self._interval_start, now
            hists, self._interval = self._interval, defaultdict(_hist)
        return start, now - start, {hop: percentiles(h) for hop, h in hists.items()}

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            counters = dict(self.counters)
            lat = {hop: percentiles(h) for hop, h in self._hists.items()}
            hists = {hop: _cumulative(b, self._sums[hop]) for hop, b in self._buckets.items()}
        dt = now - self._last_t
        if dt >= 0.5:
            self._rates = {
                k: (v - self._last_counts.get(k, 0)) / dt for k, v in counters.items()
            }
            self._last_counts = counters
            self._last_t = now
        mem = self._proc.memory_info()
        return {
            "process": self.process,
            "role": self.role,
            "name": self.name,
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
            "counters": counters,
            "rates": dict(self._rates),
            "gauges": dict(self.gauges),
            "latency": lat,
            "histogram_le_us": list(LATENCY_BUCKETS_US),
            "histograms": hists,
            "rss_bytes": mem.rss,
            "cpu_percent": self._proc.cpu_percent(None),
            "gc": gcstats.snapshot(),
        }

    def publish(self, redis: Any, key: str, ttl_s: int) -> dict[str, Any]:
        """Write the snapshot; works when Redis is full too (same size each time), so the
        monitor still sees a process that cannot write its data."""
        snap = self.snapshot()
        script = self._script
        if script is None or script.registered_client is not redis:
            script = self._script = redis.register_script(_PUBLISH_SCRIPT)
        script(keys=[key], args=[json.dumps(snap), ttl_s])
        return snap
