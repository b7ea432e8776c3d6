"""State collection and ``sensorhub monitor --once/--json`` against real Redis and a real chdb-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import clickhouse_connect
import redis
from kit.services import free_port
from rich.console import Console

from sensorhub.metrics.registry import Metrics
from sensorhub.monitor.state import StateCollector
from sensorhub.monitor.view import render, sort_sources, sparkline
from sensorhub.sinks.schema import apply_schema
from tests.monitor.conftest import LAYOUT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _insert_readings(ch: Any, db: str, n: int) -> None:
    now = datetime.now(UTC)
    rows = [["dev-1", "temp_c", now, float(i), 0, i, now, "line-1"] for i in range(n)]
    ch.insert(f"{db}.readings", rows,
              column_names=["device", "metric", "ts", "value", "quality", "seq", "recv", "source"])


def _collector(redis_client: Any, ch_url: str | None, db: str = "sensorhub", **kw: Any) -> StateCollector:
    def factory() -> Any:
        return clickhouse_connect.get_client(dsn=ch_url, connect_timeout=1, send_receive_timeout=3)

    return StateCollector(redis_client, LAYOUT, database=db, ch_factory=factory if ch_url else None,
                          ch_url=ch_url or "", **kw)


def test_collect_answers_flowing_lost_and_delay(
    fleet: dict[str, Any], redis_client: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    apply_schema(ch_client, ch_database)
    _insert_readings(ch_client, ch_database, 860)
    st = _collector(redis_client, chdb_server.url, ch_database).collect()

    assert st["redis"]["ok"] and st["clickhouse"]["ok"], st["clickhouse"]
    by_name = {s["name"]: s for s in st["sources"]}
    assert set(by_name) == {"line-1", "okx", "line-9"}
    assert by_name["line-1"]["status"] == "ok" and by_name["line-1"]["rows_per_s"] > 0
    assert by_name["line-1"]["dead_letters"] == 2 and by_name["line-1"]["reconnects"] == 1
    assert by_name["okx"]["kind"] == "trade" and by_name["okx"]["rows_per_s"] > 0 and by_name["okx"]["gaps"] == 2
    assert by_name["line-1"]["kind"] == "reading"
    assert by_name["line-9"]["stale"] and by_name["line-9"]["status"] == "stale"

    (w,) = st["writers"]
    assert w["lag_alert"] and w["lag_s"] == 9.0 and w["rows_per_s"] > 0 and w["retries"] == 1
    p = st["pipeline"]
    assert p["lag_alert"] and p["lag_s"] >= 9.0
    # one entry pending in the group, one not yet delivered
    (s0,) = [s for s in st["streams"] if s["stream"] == LAYOUT.readings(0)]
    (g,) = s0["groups"]
    assert s0["length"] == 2 and g["pending"] == 1 and g["lag_entries"] == 1
    assert p["backlog_entries"] == 2

    assert {"recv_to_xadd", "decode_to_xadd", "read_to_insert", "insert"} <= set(st["latency"])
    assert 3.9 < st["latency"]["read_to_insert"]["p99_ms"] < 4.1
    assert len(st["latency"]["insert"]["p99_history"]) == 1

    d = st["dead_letters"]
    assert d["count_today"] == 2 and d["stream_len"] == 1 and d["stored_today"] == 0
    assert d["latest"][0]["error"] == "ChecksumMismatch: crc mismatch"

    t = st["totals"]
    assert (t["received"], t["xadded"], t["inserted"], t["pending"]) == (110, 880, 870, 10)
    assert t["stored"] == 860 and t["missing"] == 10
    v = st["verdict"]
    assert v["flowing"] == "yes"
    assert v["lost"] == "10 inserted rows not in ClickHouse"
    assert v["delay"].startswith("LAG ALERT 9.0 s; read_to_insert p99")


def test_nothing_lost_when_clickhouse_holds_every_inserted_row(
    fleet: dict[str, Any], redis_client: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    apply_schema(ch_client, ch_database)
    _insert_readings(ch_client, ch_database, 870)
    st = _collector(redis_client, chdb_server.url, ch_database).collect()
    assert st["totals"]["missing"] == 0 and st["verdict"]["lost"] == "none"


def test_source_rows_follow_the_kind_the_ingest_publishes(redis_client: Any) -> None:
    # An exchange feed publishes kind "trade" (Source.kind) and counts "trades"; an MQTT source
    # "reading" and "readings". Whatever else a snapshot counts, a source's rows are those of its kind;
    # a snapshot without the gauge is taken by what it counts.
    feed = Metrics("ingest", "feed")
    line = Metrics("ingest", "line")
    feed.process += ":a"
    line.process += ":b"
    for m, kind, own, other in ((feed, "trade", "trades", "readings"), (line, "reading", "readings", "trades")):
        m.set("kind", kind)
        m.set("connected", True)
        m.inc("frames", 3)
        m.inc(own, 7)
        m.inc(other, 2)
        m.publish(redis_client, LAYOUT.metrics_key(m.process), 30)
    bare = Metrics("ingest", "bare")
    bare.process += ":c"
    bare.inc("trades", 4)
    bare.publish(redis_client, LAYOUT.metrics_key(bare.process), 30)
    rows = {s["name"]: (s["kind"], s["rows"]) for s in _collector(redis_client, None).collect()["sources"]}
    assert rows == {"feed": ("trade", 7), "line": ("reading", 7), "bare": ("trade", 4)}


def test_every_source_status_is_in_the_docs(redis_client: Any) -> None:
    # One ingest snapshot per status the monitor gives a source, published as the ingest publishes it.
    gauges: dict[str, dict[str, Any]] = {
        "ok": {"connected": True, "redis_ok": True},
        "down": {"connected": False},
        "redis-err": {"connected": True, "redis_ok": False},
        "parse-errors": {"connected": True, "redis_ok": True, "parse_errors": 9,
                         "unhealthy": "9 of the last 100 trade frames yielded no trade"},
    }
    for i, (name, gs) in enumerate(gauges.items()):
        m = Metrics("ingest", name)
        m.process += f":{i}"
        for k, v in gs.items():
            m.set(k, v)
        m.publish(redis_client, LAYOUT.metrics_key(m.process), 30)
    stale = Metrics("ingest", "stale")
    stale.process += ":s"
    snap = stale.snapshot()
    snap["heartbeat"] -= 30
    redis_client.hset(LAYOUT.metrics_key(stale.process), mapping={"state": json.dumps(snap)})
    statuses = {s["name"]: s["status"] for s in _collector(redis_client, None).collect()["sources"]}
    assert statuses == {name: name for name in [*gauges, "stale"]}
    with open(os.path.join(ROOT, "docs", "monitor.md"), encoding="utf-8") as f:
        doc = f.read()
    assert all(f"`{status}" in doc for status in statuses.values()), statuses


def test_clickhouse_down_is_shown_not_raised(fleet: dict[str, Any], redis_client: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    col = _collector(redis_client, url)
    st = col.collect()
    assert st["clickhouse"]["ok"] is False and st["clickhouse"]["error"]
    assert st["totals"]["stored"] is None
    assert st["verdict"]["lost"] == "unknown (ClickHouse down)"
    assert st["sources"], "Redis figures are still shown"
    text = _text(render(st, width=80, height=24))
    assert "clickhouse ● DOWN" in text and "stored ?" in text


def test_redis_down_is_shown_not_raised() -> None:
    r = redis.Redis(port=free_port(), socket_connect_timeout=1)
    st = StateCollector(r, LAYOUT).collect()
    assert st["redis"]["ok"] is False and "ConnectionError" in st["redis"]["error"]
    assert st["verdict"]["flowing"] == "REDIS DOWN"
    assert "redis ● DOWN" in _text(render(st))


def test_p99_history_is_bounded(fleet: dict[str, Any], redis_client: Any) -> None:
    col = _collector(redis_client, None, history_len=5, history_interval_s=0.0)
    for i in range(12):
        st = col.collect(now=1e9 + i)
    assert len(st["latency"]["insert"]["p99_history"]) == 5
    assert all(len(h) <= 5 for h in col.history.values())


def _text(renderable: Any, width: int = 80) -> str:
    c = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)  # noqa: SIM115
    c.print(renderable)
    out = c.export_text()
    c.file.close()
    return out


def test_render_80x24_and_wide(fleet: dict[str, Any], redis_client: Any) -> None:
    st = _collector(redis_client, None).collect()
    small = _text(render(st, width=80, height=24), 80)
    lines = small.splitlines()
    assert all(len(x) <= 80 for x in lines)
    # the answers and the alert are in the first lines, never cropped
    assert "flowing: yes" in lines[1] and "LAG ALERT" in lines[1]
    assert any("LAG ALERT" in x for x in lines[2:5])
    assert "line-1" in small and "stale" in small
    wide = _text(render(st, width=160, height=45), 160)
    assert "p99 history" in wide and "reconn" in wide and LAYOUT.readings(0) in wide
    focus = _text(render(st, width=80, height=24, focus="dead"), 80).splitlines()
    i = next(n for n, x in enumerate(focus) if x.startswith("DEAD LETTERS today 2"))
    assert i < next(n for n, x in enumerate(focus) if x.startswith("PIPELINE")), "focused panel comes first"
    assert "crc mismatch" in focus[i + 1]


def test_sparkline_and_sort() -> None:
    assert sparkline([0, 1, 2, 4, 8], 10) == "▁▂▃▅█"  # rounded to the nearest of 8 levels
    assert sparkline([5, 5, 5], 2) == "██"
    assert sparkline([0, 0], 4) == "▁▁"
    assert sparkline([], 4) == ""
    a = {"name": "a", "process": "a", "rows_per_s": 1.0, "dead_letters": 0, "redis_errors": 0, "last_frame_age_s": 9.0}
    b = {"name": "b", "process": "b", "rows_per_s": 5.0, "dead_letters": 3, "redis_errors": 0, "last_frame_age_s": None}
    assert [s["name"] for s in sort_sources([b, a], "name")] == ["a", "b"]
    assert [s["name"] for s in sort_sources([a, b], "rate")] == ["b", "a"]
    assert [s["name"] for s in sort_sources([a, b], "errors")] == ["b", "a"]
    assert [s["name"] for s in sort_sources([b, a], "seen")] == ["a", "b"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sensorhub", "monitor", *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env={**os.environ, **(env or {})},
    )


def test_cli_once_and_json(
    fleet: dict[str, Any], redis_server: Any, redis_client: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    apply_schema(ch_client, ch_database)
    _insert_readings(ch_client, ch_database, 870)
    env = {"SENSORHUB_CLICKHOUSE_DATABASE": ch_database}
    conn = ("--redis", redis_server.url, "--clickhouse", chdb_server.url)
    p = _cli(*conn, "--once", "--width", "80", "--height", "24", env=env)
    assert p.returncode == 0, p.stderr
    assert "LAG ALERT" in p.stdout and "lost: none" in p.stdout
    assert "line-1" in p.stdout and "okx" in p.stdout
    assert "stored 870" in p.stdout
    assert max(len(x) for x in p.stdout.splitlines()) <= 80

    j = _cli(*conn, "--json", env=env)
    assert j.returncode == 0, j.stderr
    st = json.loads(j.stdout)
    assert st["pipeline"]["lag_alert"] is True
    assert st["totals"]["stored"] == 870 and st["clickhouse"]["ok"] is True
    assert {s["name"] for s in st["sources"]} == {"line-1", "okx", "line-9"}

    down = _cli("--redis", redis_server.url, "--clickhouse", f"http://127.0.0.1:{free_port()}", "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["clickhouse"]["ok"] is False


def test_today_line_says_what_it_counts(fleet: dict[str, Any], redis_client: Any) -> None:
    # the audit: 110 messages received, carrying 880 readings, 870 of them inserted
    st = _collector(redis_client, None).collect()
    text = " ".join(_text(render(st, width=160, height=45), 160).split())
    assert "received 110 msgs rows: to Redis 880 inserted 870 stored ?" in text
    small = " ".join(_text(render(st, width=80, height=24), 80).split())
    assert "TODAY received 110 msgs rows: to Redis 880 inserted 870" in small


def test_readings_the_writer_dead_lettered_are_not_pending(
    fleet: dict[str, Any], redis_client: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    apply_schema(ch_client, ch_database)
    # 4 of the 10 readings not inserted yet were dead-lettered by the writer (device time)
    redis_client.hincrby(LAYOUT.audit_key("line-1", fleet["minute"], 3), "writer_dead_lettered", 4)
    st = _collector(redis_client, chdb_server.url, ch_database).collect()
    t = st["totals"]
    assert (t["xadded"], t["inserted"], t["writer_dead_lettered"], t["pending"]) == (880, 870, 4, 6)
    assert st["dead_letters"]["count_today"] == 2 + 4


def test_latency_shows_each_minutes_worst_p99_from_hop_latency(
    fleet: dict[str, Any], redis_client: Any, chdb_server: Any, ch_client: Any, ch_database: str
) -> None:
    from datetime import timedelta

    from sensorhub.pipeline.exports import HOP_LATENCY_COLS

    apply_schema(ch_client, ch_database)
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    two_ago, one_ago, long_ago = minute - timedelta(minutes=2), minute - timedelta(minutes=1), minute - timedelta(hours=2)
    rows = [  # process, hop, interval_start, interval_s, count, p50, p95, p99, max
        ["writer:a", "read_to_insert", two_ago, 10.0, 100, 10.0, 20.0, 31.0, 40.0],
        ["writer:a", "read_to_insert", two_ago + timedelta(seconds=10), 10.0, 100, 10.0, 20.0, 38.0, 45.0],
        ["writer:b", "read_to_insert", one_ago, 10.0, 100, 30.0, 90.0, 120.0, 300.0],  # the drift
        ["writer:a", "read_to_insert", one_ago + timedelta(seconds=20), 10.0, 100, 10.0, 20.0, 33.0, 40.0],
        ["writer:a", "read_to_insert", long_ago, 10.0, 100, 10.0, 20.0, 999.0, 999.0],  # outside the window
    ]
    ch_client.insert(f"{ch_database}.hop_latency", rows, column_names=HOP_LATENCY_COLS)
    st = _collector(redis_client, chdb_server.url, ch_database).collect()
    got = st["latency"]["read_to_insert"]["p99_minutes"]
    assert got == [{"minute": int(two_ago.timestamp()), "p99_ms": 38.0},
                   {"minute": int(one_ago.timestamp()), "p99_ms": 120.0}]
    wide = _text(render(st, width=160, height=45), 160)
    assert "p99/min" in wide
    assert any("read_to_insert" in x and "38 120" in x for x in wide.splitlines()), wide
