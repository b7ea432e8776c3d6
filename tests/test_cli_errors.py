"""The command line as a new user meets it: queries run in the configured database, and every
failure is one line saying what to do, never a traceback. Against real Redis and chdb-server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
import redis
from kit.services import free_port

from sensorhub.config import load_settings
from sensorhub.errors import ConfigError
from sensorhub.service.stack import stack_down, stack_status

ROOT = Path(__file__).resolve().parents[1]


def _sensorhub(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sensorhub", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def _one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one line, an error, and no traceback."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(("error: ", "configuration error: ")), lines[0]
    return lines[0]


@pytest.fixture
def readings_db(ch_client: Any, ch_database: str) -> str:
    ch_client.command(f"CREATE TABLE {ch_database}.readings (device String, value Float64) "
                      "ENGINE = MergeTree ORDER BY device")
    ch_client.insert(f"{ch_database}.readings", [["dev-1", 1.0], ["dev-2", 2.0], ["dev-3", 3.0]],
                     column_names=["device", "value"])
    return ch_database


def test_a_url_with_the_database_is_what_clickhouse_connect_uses(chdb_server: Any, readings_db: str) -> None:
    client = clickhouse_connect.get_client(dsn=f"{chdb_server.url}/{readings_db}")
    try:
        assert client.command("SELECT currentDatabase()") == readings_db
        assert int(client.command("SELECT count() FROM readings")) == 3
    finally:
        client.close()


def test_query_runs_in_the_configured_database(chdb_server: Any, readings_db: str) -> None:
    sql = "SELECT count() FROM readings"
    by_env = _sensorhub("query", sql, "--format", "TSV",
                        env={"SENSORHUB_CLICKHOUSE_URL": chdb_server.url, "SENSORHUB_CLICKHOUSE_DATABASE": readings_db})
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout.strip() == "3"
    by_url = _sensorhub("query", sql, "--format", "TSV", "--clickhouse", f"{chdb_server.url}/{readings_db}")
    assert by_url.returncode == 0, by_url.stderr
    assert by_url.stdout.strip() == "3"


def test_query_failures_are_one_line(chdb_server: Any, readings_db: str) -> None:
    env = {"SENSORHUB_CLICKHOUSE_URL": chdb_server.url, "SENSORHUB_CLICKHOUSE_DATABASE": readings_db}
    bad_table = _sensorhub("query", "SELECT count() FROM nosuch", env=env)
    assert bad_table.returncode == 1
    line = _one_error_line(bad_table)
    assert "nosuch" in line and f"database {readings_db}" in line and "version" not in line

    no_db = _sensorhub("query", "SELECT 1", "--clickhouse", f"{chdb_server.url}/nodb_{readings_db}")
    assert no_db.returncode == 1
    assert "does not exist" in _one_error_line(no_db)

    down = _sensorhub("query", "SELECT 1", "--clickhouse", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    line = _one_error_line(down)
    assert "unreachable" in line and "Connection refused" in line and "is it running" in line

    bad_url = _sensorhub("query", "SELECT 1", "--clickhouse", "ftp://somewhere")
    assert bad_url.returncode == 78
    assert "--clickhouse" in _one_error_line(bad_url)


def test_other_commands_fail_in_one_line(tmp_path: Path, redis_server: Any) -> None:
    free = free_port()
    cases = [
        (("stack", "status", "--dir", str(tmp_path / "none")), 1, "no stack in"),
        (("query", "SELECT 1", "--data", str(tmp_path / "none")), 1, "no such data directory"),
        (("audit", "--clickhouse", f"http://127.0.0.1:{free}"), 1, "unreachable"),
        (("dlq", "list", "--clickhouse", f"http://127.0.0.1:{free}"), 1, "unreachable"),
        (("schema", "apply", "--clickhouse", f"http://127.0.0.1:{free}"), 1, "unreachable"),
        (("ingest", "--source", "nosuch"), 78, "sources.nosuch"),
    ]
    for argv, status, words in cases:
        p = _sensorhub(*argv)
        assert p.returncode == status, (argv, p.stderr)
        assert words in _one_error_line(p), (argv, p.stderr)


def test_audit_fails_in_one_line_naming_redis(chdb_server: Any, spawn: Any) -> None:
    # audit reads Redis with no retry of its own: redis-py's error becomes a StreamError at the command
    port = free_port()
    for extra in ([], ["--reconcile"], ["--json"]):
        p = _sensorhub("audit", "--redis", f"redis://:s3cret@127.0.0.1:{port}/0", "--clickhouse", chdb_server.url,
                       *extra)
        assert p.returncode == 1, p.stderr
        line = _one_error_line(p)
        assert line.startswith("error: Redis: ") and "Connection refused" in line, line
        assert f"redis://127.0.0.1:{port}/0: is Redis running" in line and "redis.url" in line, line
        assert "s3cret" not in line
    # the URL from the configuration: the same line
    p = _sensorhub("audit", env={"SENSORHUB_REDIS_URL": f"redis://127.0.0.1:{port}/0",
                                 "SENSORHUB_CLICKHOUSE_URL": chdb_server.url})
    assert p.returncode == 1 and "is Redis running" in _one_error_line(p), p.stderr
    # a Redis that wants a password nobody gave
    locked = spawn.redis()
    admin = redis.Redis.from_url(locked.url)
    admin.config_set("requirepass", "s3cret")
    admin.close()
    p = _sensorhub("audit", "--redis", locked.url, "--clickhouse", chdb_server.url)
    assert p.returncode == 1, p.stderr
    line = _one_error_line(p)
    assert line.startswith("error: Redis: ") and "password of redis.url" in line, line
    # not a Redis URL at all: a configuration error naming the flag
    p = _sensorhub("audit", "--redis", "ftp://somewhere", "--clickhouse", chdb_server.url)
    assert p.returncode == 78 and "--redis" in _one_error_line(p), p.stderr


def test_configuration_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[nosuch]\nx = 1\n")
    p = _sensorhub("--config", str(cfg), "config", "check")
    assert p.returncode == 78
    assert "nosuch" in _one_error_line(p)
    with pytest.raises(ConfigError, match=r"clickhouse.*the same database"):
        load_settings(clickhouse={"url": "http://127.0.0.1:8123/one", "database": "two"})
    assert load_settings(clickhouse={"url": "http://127.0.0.1:8123/one"}).clickhouse.database == "one"
    assert load_settings(clickhouse={"url": "http://127.0.0.1:8123/one", "database": "one"}).clickhouse.database == "one"


# ---- stack up with a configuration the services reject ----

def test_stack_up_refuses_a_bad_configuration_before_starting_anything(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[mqtt]\nport = 1883\n\n[nosuch]\nx = 1\n")
    d = tmp_path / "stack"
    try:
        p = _sensorhub("--config", str(cfg), "stack", "up", "--dir", str(d), "--json", "--timeout", "300", timeout=60)
    finally:
        stack_down(d)
    assert p.returncode == 78, p.stderr
    check = _sensorhub("--config", str(cfg), "config", "check")
    # the same words as `config check` (the hint after them differs)
    assert _one_error_line(p).split(" (fix it")[0] == _one_error_line(check).split(" (fix it")[0]
    assert "nosuch" in _one_error_line(p)
    assert not (d / "stack.json").exists(), "nothing was started"


def test_stack_up_fails_fast_when_a_child_exits_with_78(tmp_path: Path) -> None:
    # valid as settings, refused by the ingest alone: no such driver
    cfg = tmp_path / "driver.toml"
    cfg.write_text('[sources.mqtt]\ndriver = "nosuch"\n')
    d = tmp_path / "stack"
    try:
        # without the fix this waits for the 300 s --timeout, past the 120 s liveness bound
        p = _sensorhub("--config", str(cfg), "stack", "up", "--dir", str(d), "--json", "--timeout", "300",
                       timeout=120)
        st = stack_status(d)
    finally:
        stack_down(d)
    assert p.returncode == 78, p.stderr
    line = _one_error_line(p)
    assert "ingest exited with status 78" in line and "sources.mqtt.driver" in line and "stopped" in line
    assert not st["running"] and not st["ready"]
    # everything it had started is gone: nothing listens on its ports
    for port in (st["mqtt"]["port"], int(st["redis_url"].rsplit(":", 1)[1].split("/")[0])):
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    state = json.loads((d / "stack.json").read_text())
    assert state["failed"]["ingest"]["status"] == 78


def test_stack_up_starts_again_on_another_port_when_another_program_took_one(tmp_path: Path) -> None:
    """A stack keeps its ports in its directory; if another program listens on one by the next
    start (or took it between the choice and the bind), that service gets another port."""
    d = tmp_path / "stack"

    def up() -> tuple[dict[str, Any], str]:
        p = _sensorhub("stack", "up", "--dir", str(d), "--json", "--insecure", "--timeout", "120", timeout=300)
        assert p.returncode == 0, p.stderr
        return dict(json.loads(p.stdout)), p.stderr

    def ch_port(info: dict[str, Any]) -> int:
        return int(str(info["clickhouse_url"]).rsplit(":", 1)[1].split("/")[0])

    try:
        first, _ = up()
        stack_down(d)
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the old TIME_WAITs
            squatter.bind(("127.0.0.1", ch_port(first)))
            squatter.listen()
            squatter.settimeout(0.2)
            stop = threading.Event()

            def hang_up() -> None:  # so that the first try's writer is not left waiting for a reply
                while not stop.is_set():
                    with contextlib.suppress(OSError):
                        squatter.accept()[0].close()

            threading.Thread(target=hang_up, daemon=True).start()
            second, said = up()
            assert ch_port(second) != ch_port(first)
            client = clickhouse_connect.get_client(dsn=second["clickhouse_url"])
            assert client.command("SELECT 1") == 1
            client.close()
            assert second["mqtt"]["port"] == first["mqtt"]["port"]  # the others keep theirs
            stop.set()
    finally:
        stack_down(d)
    assert "chdb-server: port taken by another program, starting again on another port" in said
