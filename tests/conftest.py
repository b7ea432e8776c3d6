"""Real services for the tests: mosquitto, redis-server and the ClickHouse HTTP server.

Each is started on an ephemeral loopback port in a temporary directory and
stopped by PID. Session-scoped instances serve the ordinary tests (each test
gets a clean Redis keyspace and a fresh ClickHouse database); fault tests
that kill or stop a service get their own instances from ``spawn``.

``SENSORHUB_TEST_CLICKHOUSE_URL`` makes the ClickHouse fixtures use that real
server instead of the embedded chdb-server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kit import services
from kit.services import ManagedProcess

EXTERNAL_CH = os.environ.get("SENSORHUB_TEST_CLICKHOUSE_URL", "")


class Spawner:
    """Starts service processes for one test or session and stops them all after."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[ManagedProcess] = []
        self._n = 0

    def _dir(self, name: str) -> Path:
        self._n += 1
        d = self.root / f"{name}-{self._n}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def mosquitto(self) -> ManagedProcess:
        p = services.start_mosquitto(self._dir("mosquitto"))
        self.procs.append(p)
        return p

    def redis(self, maxmemory: str | None = None) -> ManagedProcess:
        p = services.start_redis(self._dir("redis"), maxmemory=maxmemory)
        self.procs.append(p)
        return p

    def chdb(self) -> ManagedProcess:
        p = services.start_chdb_server(self._dir("chdb"))
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate(timeout=10)


@pytest.fixture(scope="session")
def session_spawner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawner]:
    sp = Spawner(tmp_path_factory.mktemp("services"))
    yield sp
    sp.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    """Private service instances for a test that kills, stops or fills them."""
    sp = Spawner(tmp_path / "services")
    yield sp
    sp.close()


@pytest.fixture(scope="session")
def mosquitto(session_spawner: Spawner) -> ManagedProcess:
    return session_spawner.mosquitto()


@pytest.fixture(scope="session")
def redis_server(session_spawner: Spawner) -> ManagedProcess:
    return session_spawner.redis()


class _External:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[-1]) if self.url.count(":") == 2 else 8123


@pytest.fixture(scope="session")
def chdb_server(session_spawner: Spawner) -> Any:
    if EXTERNAL_CH:
        return _External(EXTERNAL_CH)
    return session_spawner.chdb()


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """mosquitto as the secured stack runs it (accounts, per-device ACLs, TLS), one per test module."""
    b = services.start_mosquitto(tmp_path_factory.mktemp("secure-mosquitto"), secure=True)
    yield b
    b.terminate(timeout=10)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs: a data disk that fills up in a moment."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(d)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def redis_client(redis_server: ManagedProcess) -> Iterator[Any]:
    import redis

    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    yield r
    r.close()


@pytest.fixture
def ch_database() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def ch_client(chdb_server: Any, ch_database: str) -> Iterator[Any]:
    """A clickhouse-connect client on a fresh database, dropped after the test."""
    import clickhouse_connect

    admin = clickhouse_connect.get_client(dsn=chdb_server.url)
    admin.command(f"CREATE DATABASE IF NOT EXISTS {ch_database}")
    client = clickhouse_connect.get_client(dsn=chdb_server.url, database=ch_database)
    yield client
    client.close()
    admin.command(f"DROP DATABASE IF EXISTS {ch_database}")
    admin.close()


@pytest.fixture
def wait_until() -> Callable[..., Any]:
    """Poll ``fn`` until it returns a truthy value or ``timeout`` passes; returns the last value."""
    import time

    def _wait(fn: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        value = fn()
        while not value and time.monotonic() < deadline:
            time.sleep(interval)
            value = fn()
        return value

    return _wait


class Stack:
    """A running ``sensorhub stack`` (mosquitto, redis, chdb-server, ingest, writer) under ``dir``."""

    def __init__(self, d: Path, config: Path | None = None, redis_maxmemory: str | None = None) -> None:
        import json
        import subprocess
        import sys

        self.dir = d
        argv = [sys.executable, "-m", "sensorhub"]
        if config:
            argv += ["--config", str(config)]
        argv += ["stack", "up", "--dir", str(d), "--json", "--timeout", "120"]
        if redis_maxmemory:
            argv += ["--redis-maxmemory", redis_maxmemory]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=150)
        if out.returncode != 0:
            raise RuntimeError(f"stack up failed:\n{out.stdout}\n{out.stderr}")
        self.info: dict[str, Any] = json.loads(out.stdout)
        self.mqtt_port: int = self.info["mqtt"]["port"]
        self.redis_url: str = self.info["redis_url"]
        self.clickhouse_url: str = self.info["clickhouse_url"]

    def status(self) -> dict[str, Any]:
        from sensorhub.service.stack import stack_status

        return stack_status(self.dir)

    def pid(self, name: str) -> int:
        return int(self.status()["pids"][name])

    def signal(self, name: str, sig: int) -> int:
        pid = self.pid(name)
        os.kill(pid, sig)
        return pid

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 30.0) -> int:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            pid = st["pids"].get(name)
            if pid and pid != old_pid and st.get("ready"):
                return int(pid)
            time.sleep(0.1)
        raise TimeoutError(f"{name} did not come back within {timeout} s")

    def ch(self) -> Any:
        import clickhouse_connect

        return clickhouse_connect.get_client(dsn=self.clickhouse_url)

    def redis(self) -> Any:
        import redis as redis_mod

        return redis_mod.Redis.from_url(self.redis_url)

    def log(self, name: str) -> str:
        return (self.dir / "logs" / f"{name}.log").read_text(errors="replace")

    def down(self) -> None:
        from sensorhub.service.stack import stack_down

        stack_down(self.dir)


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(config_text: str | None = None, redis_maxmemory: str | None = None) -> Stack:
        cfg = None
        if config_text:
            cfg = tmp_path / f"sensorhub-{len(stacks)}.toml"
            cfg.write_text(config_text)
        s = Stack(tmp_path / f"stack-{len(stacks)}", cfg, redis_maxmemory)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.down()


@pytest.fixture
def loadtest() -> Callable[..., dict[str, Any]]:
    """``loadtest(stack, *args)`` runs ``sensorhub-sim loadtest`` against a stack."""
    return run_loadtest


def run_loadtest(stack: Stack, *args: str, timeout: float = 300) -> dict[str, Any]:
    """``sensorhub-sim loadtest`` against a stack; returns its JSON result."""
    import json
    import subprocess
    import sys

    argv = [
        sys.executable, "-m", "firmware_sim", "loadtest",
        "--stack", str(stack.dir),  # the broker, its account and ClickHouse, from the stack
        "--json", *args,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadtest printed no result (status {out.returncode}):\n{out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result
