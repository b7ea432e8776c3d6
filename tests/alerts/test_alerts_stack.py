"""Alerts through the real processes: mosquitto → ingest → Redis → evaluator → gateway, ClickHouse.

One stack for the module (tests/alerts/conftest.py); each test has devices of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from alertkit import T0, AlertStack
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect


def temps(values: list[float], start: float, step: float = 1.0, metric: str = "temp_c") -> list[tuple[str, float, float]]:
    return [(metric, v, start + i * step) for i, v in enumerate(values)]


def test_a_crossing_opens_exactly_one_alert_and_clearing_closes_it(alert_stack: AlertStack) -> None:
    alert_stack.publish("hot-1", temps([70, 85, 86, 90, 88, 79, 76, 74, 72], T0))
    alert_stack.mark("hot-1")
    ev = alert_stack.events("hot-1")
    assert [(e["state"], e["value"]) for e in ev] == [("open", 85.0), ("closed", 74.0)]
    opened, closed = ev
    for e in ev:
        assert {"rule", "device", "metric", "value", "state", "severity", "ts", "recv"} <= set(e)
        assert e["rule"] == "hot" and e["metric"] == "temp_c" and e["severity"] == "critical"
    assert opened["ts"] == pytest.approx(T0 + 1) and closed["ts"] == pytest.approx(T0 + 7)
    assert opened["id"] == closed["id"]


def test_hysteresis_keeps_a_flapping_value_from_storming(alert_stack: AlertStack) -> None:
    # around the limit (80) but never down to clear_at (75): one alert, still open
    alert_stack.publish("hot-flap", temps([81, 79, 82, 78, 81, 79, 83, 77] * 10, T0, step=0.5))
    alert_stack.mark("hot-flap")
    assert [e["state"] for e in alert_stack.events("hot-flap")] == ["open"]
    open_now = [json.loads(v) for v in alert_stack.redis.hvals(alert_stack.keys.open)]
    assert [a["device"] for a in open_now if a["device"] == "hot-flap"] == ["hot-flap"]


def test_for_s_delays_the_alert_until_the_value_stayed_over(alert_stack: AlertStack) -> None:
    # above 80 at 0, 4 and 8 s of device time: not yet 10 s
    alert_stack.publish("slow-1", temps([85, 86, 87], T0, step=4.0))
    alert_stack.mark("slow-1")
    assert alert_stack.events("slow-1") == []
    alert_stack.publish("slow-1", temps([88], T0 + 12))
    alert_stack.mark("slow-1")
    ev = alert_stack.events("slow-1")
    assert [(e["state"], e["ts"]) for e in ev] == [("open", pytest.approx(T0 + 12))]


def test_a_device_that_stops_is_silent_then_back(alert_stack: AlertStack, wait_for: Any) -> None:
    alert_stack.publish("quiet-1", temps([1.0], T0, metric="x"))
    opened = wait_for(lambda: alert_stack.events("quiet-1"), what="the silent alert", timeout=30)
    assert [(e["state"], e["rule"], e["severity"]) for e in opened] == [("open", "quiet", "info")]
    assert opened[0]["value"] >= 1.5
    alert_stack.publish("quiet-1", temps([2.0], T0 + 60, metric="x"))
    ev = wait_for(lambda: [e for e in alert_stack.events("quiet-1") if e["state"] == "closed"] and
                  alert_stack.events("quiet-1"), what="the closed silent alert")
    assert [e["state"] for e in ev][:2] == ["open", "closed"] and ev[1]["id"] == ev[0]["id"]


def _reader(ws: ClientConnection, out: list[dict[str, Any]]) -> threading.Thread:
    def run() -> None:
        try:
            for msg in ws:
                out.append(json.loads(msg))
        except ConnectionClosed:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _until_filter_reply(ws: ClientConnection, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything the gateway queued for this client before it answers a new filter (a barrier)."""
    ws.send(json.dumps(spec))
    got = []
    while True:
        m = json.loads(ws.recv(timeout=30))
        if m.get("type") == "filter":
            return got
        got.append(m)


def test_clients_filter_by_device_and_severity(alert_stack: AlertStack, wait_for: Any) -> None:
    url = alert_stack.alerts_url
    with contextlib.ExitStack() as clients:
        everything = clients.enter_context(connect(url, open_timeout=10, additional_headers=alert_stack.ws_headers))
        by_device = clients.enter_context(connect(url + "?device=filt-a*", open_timeout=10, additional_headers=alert_stack.ws_headers))
        critical = clients.enter_context(connect(url + "?severity=critical", open_timeout=10, additional_headers=alert_stack.ws_headers))
        first_msg = clients.enter_context(connect(url, open_timeout=10, additional_headers=alert_stack.ws_headers))
        bad = clients.enter_context(connect(url + "?severity=loud", open_timeout=10, additional_headers=alert_stack.ws_headers))
        with pytest.raises(ConnectionClosed) as e:
            bad.recv(timeout=10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1008 and "severity" in e.value.rcvd.reason
        assert _until_filter_reply(first_msg, {"device": "filt-b*", "severity": "warning"}) == []
        all_seen: list[dict[str, Any]] = []
        _reader(everything, all_seen)
        alert_stack.publish("filt-a1", [("v", 60.0, T0), ("w", 70.0, T0)])  # warning and critical
        alert_stack.publish("filt-b1", [("v", 60.0, T0), ("w", 70.0, T0)])
        alert_stack.mark("filt-a1")
        alert_stack.mark("filt-b1")
        want = {(d, r) for d in ("filt-a1", "filt-b1") for r in ("filt", "filt-critical")}
        wait_for(lambda: want <= {(m.get("device"), m.get("rule")) for m in all_seen},
                 what="every event at the unfiltered client")

        def seen(ws: ClientConnection, keep: dict[str, Any]) -> set[tuple[str, str]]:
            return {(m["device"], m["rule"]) for m in _until_filter_reply(ws, keep)
                    if m.get("type") == "alert" and m["rule"] != "marker" and m["device"].startswith("filt-")}

        assert seen(by_device, {"device": "filt-a*"}) == {("filt-a1", "filt"), ("filt-a1", "filt-critical")}
        assert seen(critical, {"severity": "critical"}) == {("filt-a1", "filt-critical"), ("filt-b1", "filt-critical")}
        assert seen(first_msg, {"device": "filt-b*"}) == {("filt-b1", "filt")}
        msg = next(m for m in all_seen if m.get("device") == "filt-a1" and m.get("rule") == "filt")
        assert {"rule", "device", "metric", "value", "state", "severity", "ts", "recv", "sent"} <= set(msg)
        assert msg["sent"] >= msg["recv"]


def test_a_slow_client_is_dropped_while_the_others_keep_receiving(alert_stack: AlertStack, wait_for: Any) -> None:
    url = alert_stack.alerts_url
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # and it never reads
    sock.connect((host, int(port)))
    with contextlib.ExitStack() as clients:
        slow = clients.enter_context(connect(url + "?device=storm-*", sock=sock, open_timeout=10, additional_headers=alert_stack.ws_headers))
        slow.close_timeout = 1
        fast = clients.enter_context(connect(url + "?device=storm-*", open_timeout=10, additional_headers=alert_stack.ws_headers))
        got: list[dict[str, Any]] = []
        _reader(fast, got)
        dropped_before = _dropped(alert_stack)
        rounds = 0
        # bursts of crossings (every other reading opens, the next closes) until the gateway gives up on it
        while _dropped(alert_stack) <= dropped_before:
            rounds += 1
            assert rounds <= 40, "the slow client was never dropped"
            alert_stack.publish("storm-1", temps([60.0, 40.0] * 250, T0 + rounds * 1000, step=0.001, metric="v"))
            alert_stack.mark("storm-1")
        # the fast client got every event of the storm, in order, while the slow one was dropped
        alert_stack.mark("storm-1")
        stored = [e["pos"] for e in alert_stack.events("storm-1", rules=("storm", "marker"))]
        wait_for(lambda: len([m for m in got if m.get("device") == "storm-1"]) >= len(stored),
                 what="every storm event at the fast client", timeout=60)
        assert [m["pos"] for m in got if m.get("device") == "storm-1"] == stored
        assert len(stored) >= 500
        assert fast.close_code is None


def _dropped(alert_stack: AlertStack) -> int:
    return int(alert_stack.metrics("gateway").get("counters", {}).get("clients_dropped", 0))


def test_the_alerts_table_holds_each_alert_once(alert_stack: AlertStack, wait_for: Any) -> None:
    alert_stack.publish("hot-table", temps([90, 70, 91, 70, 92], T0))
    alert_stack.mark("hot-table")
    events = alert_stack.events("hot-table")
    assert [e["state"] for e in events] == ["open", "closed", "open", "closed", "open"]
    ch = clickhouse_connect.get_client(dsn=alert_stack.info["clickhouse_url"])
    try:
        def rows() -> int:
            return int(ch.command("SELECT count() FROM alerts WHERE device = 'hot-table' AND rule = 'hot'"))

        def final_rows() -> list[tuple[Any, ...]]:
            q = ch.query("SELECT state, value, close_value, threshold, severity FROM alerts FINAL "
                         "WHERE device = 'hot-table' AND rule = 'hot' ORDER BY opened")
            return [tuple(r) for r in q.result_rows]

        want = [("closed", 90.0, 70.0, 80.0, "critical"), ("closed", 91.0, 70.0, 80.0, "critical"),
                ("open", 92.0, None, 80.0, "critical")]
        wait_for(lambda: len(final_rows()) == 3 and final_rows()[1][0] == "closed", what="the three alerts")
        assert final_rows() == want
        # no event stored twice: an alert's open and closed rows at most (one, once merged or
        # inserted together), each once
        assert rows() <= len(events)
        hot = "FROM alerts WHERE device = 'hot-table' AND rule = 'hot'"
        assert int(ch.command(f"SELECT uniqExact(id, state) {hot}")) == rows()
        assert int(ch.command(f"SELECT uniqExact(id) {hot}")) == 3
    finally:
        ch.close()


def test_the_monitor_and_prometheus_show_open_alerts(alert_stack: AlertStack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from sensorhub.metrics.hops import ALERT_HOPS
    from sensorhub.metrics.prometheus import SnapshotCollector
    from sensorhub.monitor.state import StateCollector
    from sensorhub.pipeline.keys import StreamLayout

    alert_stack.publish("hot-mon", temps([95.0], T0))
    alert_stack.mark("hot-mon")
    open_now = [json.loads(v) for v in alert_stack.redis.hvals(alert_stack.keys.open)]
    crit = sum(1 for a in open_now if a["severity"] == "critical")
    st = StateCollector(alert_stack.redis, StreamLayout()).collect()
    assert st["alerts"]["open"] == len(open_now) and st["alerts"]["open_by_severity"]["critical"] == crit
    assert any(a["device"] == "hot-mon" for a in st["alerts"]["latest"])
    assert {p["role"] for p in st["alerts"]["processes"]} == {"alerts", "gateway"}
    assert set(ALERT_HOPS) <= set(st["latency"])  # the hops only a stack with rules records

    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(alert_stack.redis, StreamLayout()))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    gauge = {s.labels["severity"]: s.value for s in fams["sensorhub_alerts_open"].samples}
    assert gauge["critical"] == crit
    opened = {s.labels["severity"]: s.value for s in fams["sensorhub_alerts_opened"].samples
              if s.name == "sensorhub_alerts_opened_total"}
    assert opened["critical"] >= crit >= 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class _Page:
    """One page in headless Chromium, driven over the DevTools protocol (a WebSocket)."""

    def __init__(self, url: str, profile: Path) -> None:
        assert CHROMIUM is not None
        argv = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
                "--remote-allow-origins=*", f"--user-data-dir={profile}", url]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root inside its sandbox
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._conn = contextlib.ExitStack()
        try:
            self._open(profile)
        except BaseException:
            self.close()
            raise

    def _open(self, profile: Path) -> None:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None, f"chromium exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.loads(r.read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = self._conn.enter_context(connect(page["webSocketDebuggerUrl"], open_timeout=10, max_size=None))
        self._id = 0

    def eval(self, expression: str) -> Any:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "returnByValue": True}}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self._id:
                return msg["result"]["result"].get("value")

    def close(self) -> None:
        self._conn.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_the_page_shows_an_alert_open_then_closed(alert_stack: AlertStack, wait_for: Any, tmp_path: Path) -> None:
    with urllib.request.urlopen(alert_stack.page_url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/html")
    page = _Page(alert_stack.page_url, tmp_path / "chromium")
    try:
        wait_for(lambda: page.eval("document.getElementById('status').textContent") == "live",
                 what="the page's WebSocket", timeout=60)
        alert_stack.publish("hot-page", temps([99.0], T0))
        alert_stack.mark("hot-page")
        (opened,) = alert_stack.events("hot-page")
        row = f"document.getElementById('alert-{opened['id']}')"
        state = f"(() => {{ const tr = {row}; return tr ? tr.dataset.state : null; }})()"
        wait_for(lambda: page.eval(state) == "open", what="the open alert on the page")
        cells = page.eval(f"Array.from({row}.cells).map(td => td.textContent)")
        assert cells[:5] == ["open", "critical", "hot", "hot-page", "temp_c"] and cells[5] == "99"
        alert_stack.publish("hot-page", temps([60.0], T0 + 1))
        wait_for(lambda: page.eval(state) == "closed", what="the closed alert on the page")
        # the page counts what it was sent: every alert open now (history on connect, then live)
        assert page.eval("document.getElementById('open-count').textContent") == str(
            alert_stack.redis.hlen(alert_stack.keys.open))
    finally:
        page.close()
