"""The Prometheus exporter against real Redis with snapshots from real Metrics objects, scraped over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kit.services import free_port
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sensorhub.metrics import hops
from sensorhub.metrics.prometheus import serve
from sensorhub.metrics.registry import LATENCY_BUCKETS_US, Metrics
from tests.monitor.conftest import LAYOUT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _one(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    hits = [v for lab, v in m.get(name, []) if all(lab.get(k) == want for k, want in labels.items())]
    assert len(hits) == 1, (name, labels, m.get(name))
    return hits[0]


@pytest.fixture
def exporter(redis_client: Any) -> Iterator[str]:
    server = serve(redis_client, LAYOUT, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


def test_scrape_has_every_family(fleet: dict[str, Any], exporter: str) -> None:
    m = _scrape(exporter)
    ing, okx, stale, wr = (fleet[k].process for k in ("ingest", "okx", "stale", "writer"))
    assert _one(m, "sensorhub_process_up", process=okx) == 1
    assert _one(m, "sensorhub_exporter_redis_up") == 1
    # processes: live and stale
    assert _one(m, "sensorhub_process_up", process=ing) == 1
    assert _one(m, "sensorhub_process_up", process=stale) == 0
    assert _one(m, "sensorhub_process_heartbeat_age_seconds", process=stale) > 25
    assert _one(m, "sensorhub_process_resident_memory_bytes", process=wr) > 1e6
    assert _one(m, "sensorhub_rate_per_second", process=ing, counter="readings") > 0
    # sources
    assert _one(m, "sensorhub_source_readings_total", process=ing, source="line-1") == 880
    assert _one(m, "sensorhub_source_dead_letters_total", source="line-1") == 2
    assert _one(m, "sensorhub_source_trades_total", source="okx") == 35
    assert _one(m, "sensorhub_source_connected", source="okx") == 1
    assert _one(m, "sensorhub_source_last_message_age_seconds", source="okx") == pytest.approx(0.4)
    assert _one(m, "sensorhub_source_reconnects_total", source="line-1") == 1
    assert _one(m, "sensorhub_source_gaps_total", source="okx", kind="trade") == 2
    assert _one(m, "sensorhub_source_redis_ok", source="line-1") == 1
    # writer
    assert _one(m, "sensorhub_writer_rows_total", process=wr) == 750
    assert _one(m, "sensorhub_writer_retries_total", consumer="writer-1") == 1
    assert _one(m, "sensorhub_writer_lag_seconds", consumer="writer-1") == 9
    assert _one(m, "sensorhub_writer_lag_alert", consumer="writer-1") == 1
    assert _one(m, "sensorhub_writer_clickhouse_up", consumer="writer-1") == 1
    assert _one(m, "sensorhub_writer_batch_rows", consumer="writer-1") == 300
    # latency per hop: histograms in seconds, cumulative buckets
    assert _one(m, "sensorhub_hop_latency_seconds_bucket", hop="read_to_insert", le="0.0025") == 0
    assert _one(m, "sensorhub_hop_latency_seconds_bucket", hop="read_to_insert", le="0.005") == 10
    assert _one(m, "sensorhub_hop_latency_seconds_bucket", hop="read_to_insert", le="+Inf") == 10
    assert _one(m, "sensorhub_hop_latency_seconds_count", hop="read_to_insert") == 10
    assert _one(m, "sensorhub_hop_latency_seconds_sum", hop="read_to_insert") == pytest.approx(0.04)
    assert _one(m, "sensorhub_hop_latency_seconds_bucket", hop="recv_to_xadd", le="0.001", source="line-1") == 0
    assert _one(m, "sensorhub_hop_latency_seconds_bucket", hop="recv_to_xadd", le="0.0025", source="line-1") == 100
    assert _one(m, "sensorhub_hop_latency_max_seconds", hop="insert") == pytest.approx(0.003, rel=0.01)
    assert _one(m, "sensorhub_hop_latency_seconds_count", hop="insert") == 3
    assert "sensorhub_hop_latency_seconds" not in m, "no per-process quantile gauges"
    # streams, read with XINFO at scrape time
    s0 = LAYOUT.readings(0)
    assert _one(m, "sensorhub_stream_length", stream=s0) == 2
    assert _one(m, "sensorhub_stream_length", stream=LAYOUT.dlq(0)) == 1
    assert _one(m, "sensorhub_stream_pending_entries", stream=s0, group="writers") == 1
    assert _one(m, "sensorhub_stream_lag_entries", stream=s0, group="writers") == 1
    assert _one(m, "sensorhub_stream_lag_seconds", stream=s0, group="writers") < 60
    assert _one(m, "sensorhub_stream_consumers", stream=s0, group="writers") == 1


def test_scrape_follows_new_snapshots(fleet: dict[str, Any], redis_client: Any, exporter: str) -> None:
    w = fleet["writer"]
    w.inc("rows", 250)
    w.set("lag_alert", False)
    w.publish(redis_client, LAYOUT.metrics_key(w.process), 30)
    m = _scrape(exporter)
    assert _one(m, "sensorhub_writer_rows_total", consumer="writer-1") == 1000
    assert _one(m, "sensorhub_writer_lag_alert", consumer="writer-1") == 0


def test_scrape_has_feed_health(redis_client: Any, exporter: str) -> None:
    # What an ingest publishes for an exchange feed whose trade frames keep failing, and for a healthy one.
    sick, well = Metrics("ingest", "sick-feed"), Metrics("ingest", "well-feed")
    sick.process += ":a"
    well.process += ":b"
    sick.set("parse_errors", 9)
    sick.set("unhealthy", "9 of the last 100 trade frames yielded no trade")
    well.set("parse_errors", 0)
    well.set("unhealthy", None)
    for p in (sick, well):
        p.set("kind", "trade")
        p.publish(redis_client, LAYOUT.metrics_key(p.process), 30)
    assert _types(exporter)["sensorhub_source_parse_errors"] == "counter"
    m = _scrape(exporter)
    assert _one(m, "sensorhub_source_parse_errors_total", source="sick-feed") == 9
    assert _one(m, "sensorhub_source_parse_errors_total", source="well-feed") == 0
    assert _one(m, "sensorhub_source_unhealthy", source="sick-feed") == 1
    assert _one(m, "sensorhub_source_unhealthy", source="well-feed") == 0


def test_redis_down_is_a_metric_not_an_error() -> None:
    import redis

    server = serve(redis.Redis(port=free_port(), socket_connect_timeout=1), LAYOUT, "127.0.0.1", 0)
    try:
        m = _scrape(f"http://127.0.0.1:{server.server_port}/metrics")
        assert _one(m, "sensorhub_exporter_redis_up") == 0
    finally:
        server.shutdown()
        server.server_close()


def _exporter(redis_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sensorhub", "metrics-exporter", "--redis", redis_url, "--exit-after", "30", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )


def _served(p: subprocess.Popen[str], port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """One scrape of the exporter ``p`` on ``port``; then SIGTERM, on which it exits 0."""
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == f"serving http://127.0.0.1:{port}/metrics"
        m = _scrape(f"http://127.0.0.1:{port}/metrics")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
        return m
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_metrics_exporter_command(fleet: dict[str, Any], redis_server: Any, wait_until: Any) -> None:
    port = free_port()
    m = _served(_exporter(redis_server.url, "--port", str(port)), port)
    assert _one(m, "sensorhub_source_readings_total", source="line-1") == 880


def _types(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return {f.name: f.type for f in text_string_to_metric_families(resp.read().decode())}


def test_hop_latency_histograms_match_prometheus_client_and_add_up(redis_client: Any, exporter: str) -> None:
    """Two ingest processes observe the same hop; the scrape is what prometheus_client's own
    Histogram gives for the same observations, and the two series sum to the whole."""
    values_us = [1, 49, 50, 51, 999, 1_000, 1_001, 7_500, 250_000, 250_001, 61_000_000, 4_000_000_000]
    reference = CollectorRegistry()
    ref = Histogram("ref_seconds", "the same observations", registry=reference,
                    buckets=[us / 1e6 for us in LATENCY_BUCKETS_US])
    procs = [Metrics("ingest", "line-1"), Metrics("ingest", "line-2")]
    for i, p in enumerate(procs):
        p.process += f":{i}"
    for i, us in enumerate(values_us):
        procs[i % 2].record_us(hops.RECV_TO_XADD, us, 3)
        for _ in range(3):
            # what record_us stores: whole µs, clamped to the HDR range 1 µs .. 1 h
            ref.observe(min(us, 3_600_000_000) / 1e6)
    for p in procs:
        p.publish(redis_client, LAYOUT.metrics_key(p.process), 30)

    assert _types(exporter)["sensorhub_hop_latency_seconds"] == "histogram"
    m = _scrape(exporter)
    want = {s.labels["le"]: s.value for f in text_string_to_metric_families(generate_latest(reference).decode())
            for s in f.samples if s.name == "ref_seconds_bucket"}
    assert len(want) == len(LATENCY_BUCKETS_US) + 1
    for le, n in want.items():
        series = [v for lab, v in m["sensorhub_hop_latency_seconds_bucket"]
                  if lab["hop"] == "recv_to_xadd" and lab["le"] == le]
        assert len(series) == 2 and sum(series) == n, (le, series, n)
    counts = [v for lab, v in m["sensorhub_hop_latency_seconds_count"] if lab["hop"] == "recv_to_xadd"]
    sums = [v for lab, v in m["sensorhub_hop_latency_seconds_sum"] if lab["hop"] == "recv_to_xadd"]
    assert sum(counts) == 3 * len(values_us)
    assert sum(sums) == pytest.approx(3 * sum(min(us, 3_600_000_000) for us in values_us) / 1e6)
    # each series is cumulative
    for proc in (p.process for p in procs):
        series = sorted(((float(lab["le"]), v) for lab, v in m["sensorhub_hop_latency_seconds_bucket"]
                         if lab["process"] == proc), key=lambda x: x[0])
        assert [v for _, v in series] == sorted(v for _, v in series)


def test_prometheus_port_zero_means_no_endpoint(redis_server: Any) -> None:
    p = _exporter(redis_server.url, env={"SENSORHUB_METRICS_PROMETHEUS_PORT": "0"})
    try:
        out, err = p.communicate(timeout=20)  # returns at once rather than serving until --exit-after
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "no /metrics endpoint" in out and "serving" not in out


def test_prometheus_port_setting_is_the_listen_port(fleet: dict[str, Any], redis_server: Any) -> None:
    port = free_port()
    m = _served(_exporter(redis_server.url, env={"SENSORHUB_METRICS_PROMETHEUS_PORT": str(port)}), port)
    assert _one(m, "sensorhub_hop_latency_seconds_count", hop="insert") == 3
