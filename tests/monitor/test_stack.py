"""``sensorhub monitor`` against a running ``sensorhub stack`` fed by the device simulator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sensorhub.metrics.hops import ALERT_HOPS, HOPS
from sensorhub.service.stack import stack_down

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    # through the command line, as an operator starts it (stack_up leaves its
    # supervisor's Popen object behind in the calling process); one stack for this module
    d = tmp_path_factory.mktemp("monitor") / "stack"
    try:
        up = subprocess.run([sys.executable, "-m", "sensorhub", "stack", "up", "--dir", str(d), "--json",
                             "--timeout", "90"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert up.returncode == 0, up.stderr
        info: dict[str, Any] = json.loads(up.stdout)
        info["dir"] = str(d)
        yield info
    finally:
        stack_down(d)


def _monitor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sensorhub", "monitor", *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_monitor_follows_a_running_stack(stack: dict[str, Any], wait_until: Callable[..., Any]) -> None:
    sim = subprocess.run(
        [sys.executable, "-m", "firmware_sim", "run", "--stack", stack["dir"], "--devices", "5", "--rate", "1000",
         "--duration", "2", "--fault", "crc=0.01", "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert sim.returncode == 0, sim.stderr

    def settled() -> dict[str, Any] | None:
        p = _monitor("--stack", stack["dir"], "--json")
        assert p.returncode == 0, p.stderr
        st: dict[str, Any] = json.loads(p.stdout)
        t = st["totals"]
        done = t["inserted"] > 0 and t["pending"] == 0 and t["stored"] == t["xadded"]
        return st if done and st["dead_letters"]["stored_today"] == t["dead_lettered"] else None

    st = wait_until(settled, timeout=30, interval=1.0)
    assert st, _monitor("--stack", stack["dir"], "--json").stdout
    assert st["redis"]["ok"] and st["clickhouse"]["ok"]
    (src,) = st["sources"]
    assert src["name"] == "mqtt" and src["status"] == "ok" and src["rows"] > 1000
    (w,) = st["writers"]
    assert not w["stale"] and w["clickhouse_ok"] and not w["lag_alert"]
    t = st["totals"]
    assert t["received"] > 0 and t["dead_lettered"] > 0 and t["missing"] == 0
    assert st["verdict"]["lost"] == "none", st["totals"]["reconcile_detail"]
    assert "ChecksumMismatch" in st["dead_letters"]["latest"][0]["error"]
    assert {"recv_to_xadd", "insert", "recv_to_insert"} <= set(st["latency"])
    # the running pipeline records exactly the hops of the one list (the alert hops: with alert rules)
    assert set(st["latency"]) == set(HOPS) - set(ALERT_HOPS)

    once = _monitor("--stack", stack["dir"], "--once", "--width", "80", "--height", "24")
    assert once.returncode == 0, once.stderr
    assert "clickhouse ● up" in once.stdout and "lost: none" in once.stdout


def test_stack_json_names_the_database_and_query_runs_in_it(stack: dict[str, Any]) -> None:
    import clickhouse_connect

    assert stack["clickhouse_database"] == "sensorhub"
    port = stack["clickhouse_url"].rsplit(":", 1)[1].split("/")[0]
    # secured: the admin account and its password inside the URL
    assert re.fullmatch(rf"http://admin:[A-Za-z0-9_-]{{40,}}@127\.0\.0\.1:{port}/sensorhub", stack["clickhouse_url"])
    assert re.fullmatch(r"redis://admin:[A-Za-z0-9_-]{40,}@127\.0\.0\.1:\d+/0", stack["redis_url"])
    assert {"mqtt", "redis_url", "clickhouse_url", "pids", "supervisor_pid", "dir", "ready", "restarts",
            "monitor", "secure"} <= set(stack)
    assert {"host", "port", "tls_port", "ca_file", "username", "password"} <= set(stack["mqtt"])
    client = clickhouse_connect.get_client(dsn=stack["clickhouse_url"])
    try:
        assert client.command("SELECT currentDatabase()") == "sensorhub"
        stored = int(client.command("SELECT count() FROM readings"))  # no database named
    finally:
        client.close()
    q = subprocess.run([sys.executable, "-m", "sensorhub", "query", "--stack", stack["dir"], "--format", "TSV",
                        "SELECT count(), currentDatabase() FROM readings"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert q.returncode == 0, q.stderr
    assert q.stdout.split() == [str(stored), "sensorhub"]
    bad = subprocess.run([sys.executable, "-m", "sensorhub", "query", "--stack", stack["dir"], "SELECT * FROM nosuch"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error: the query failed in database sensorhub") and "nosuch" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
