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
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sensorhub.service import daemons
from sensorhub.service.daemons import ManagedProcess

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
        p = daemons.start_mosquitto(self._dir("mosquitto"))
        self.procs.append(p)
        return p

    def redis(self, maxmemory: str | None = None) -> ManagedProcess:
        p = daemons.start_redis(self._dir("redis"), maxmemory=maxmemory)
        self.procs.append(p)
        return p

    def chdb(self) -> ManagedProcess:
        p = daemons.start_chdb_server(self._dir("chdb"))
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
