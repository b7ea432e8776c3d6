"""Start, watch and stop the services sensorhub runs beside: mosquitto, redis-server, chdb-server.

Used by ``sensorhub stack``, ``make demo``, the test fixtures and the fault
tests. Every process runs in the foreground of its own process group, on a
loopback port under a run directory of its own, and is stopped by PID. The
configurations written here are the ones the project documents for operators
(docs/operations.md): the broker keeps what it accepted, Redis refuses rather
than evicts.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sensorhub.errors import SensorhubError

__all__ = [
    "ManagedProcess",
    "free_port",
    "mosquitto_config",
    "start_chdb_server",
    "start_mosquitto",
    "start_redis",
    "wait_tcp",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_tcp(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.02)
    return False


@dataclass
class ManagedProcess:
    """One service process: started, checked for readiness, signalled, restarted by PID."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    url: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def start(self, timeout: float = 20.0) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        self.starts += 1
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise SensorhubError(
                    f"{self.name} exited with status {self.proc.returncode} while starting; "
                    f"see {self.log_path}:\n{self.tail()}"
                )
            if self.ready():
                return
            time.sleep(0.05)
        raise SensorhubError(f"{self.name} not ready within {timeout:.0f} s; see {self.log_path}:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 and reap."""
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGSTOP: the process stays but answers nothing."""
        self.signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.signal(signal.SIGCONT)

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def restart(self, hard: bool = False, timeout: float = 20.0) -> None:
        if hard:
            self.kill()
        else:
            self.terminate()
        self.start(timeout)


def _binary(name: str, *extra_dirs: str) -> str:
    path = shutil.which(name) or next(
        (str(Path(d) / name) for d in extra_dirs if (Path(d) / name).exists()), None
    )
    if not path:
        raise SensorhubError(f"{name} is not installed (Debian: apt-get install -y {name.split('-')[0]})")
    return path


def mosquitto_config(
    port: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    max_queued_messages: int = 2_000_000,
    max_queued_bytes: int = 2 << 30,
    session_expiry: str = "7d",
) -> str:
    """The broker configuration sensorhub runs with (tests, demo, and what operators should use).

    - persistence on, saved every second and on shutdown, so a restart keeps
      queued QoS 1 messages and sessions;
    - queue limits sized for an outage of minutes at 40k messages/s: the
      default 1000 queued messages per client would drop the newest;
    - ``max_inflight_messages 0`` leaves the in-flight bound to the client's
      MQTT v5 receive maximum (the default 20 would cap a subscriber that acks
      after its Redis write to a few thousand messages/s);
    - persistent sessions expire after a week away;
    - the broker keeps running as the user that started it: started as root
      it would otherwise switch to the ``mosquitto`` user and could not write
      its persistence file under a run directory it does not own, losing
      every queued message on restart.
    """
    return "\n".join(
        [
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            f"listener {port} {host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {data_dir}/",
            "autosave_interval 1",
            f"max_queued_messages {max_queued_messages}",
            f"max_queued_bytes {max_queued_bytes}",
            "max_inflight_messages 0",
            f"persistent_client_expiration {session_expiry}",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages false",
            "",
        ]
    )


def mosquitto_argv(run_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """Write the broker configuration under ``run_dir/mosquitto`` and return its command line."""
    d = run_dir / "mosquitto"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "mosquitto.conf"
    conf.write_text(mosquitto_config(port, d, host))
    return [_binary("mosquitto", "/usr/sbin"), "-c", str(conf)]


def redis_argv(run_dir: Path, port: int, host: str = "127.0.0.1", maxmemory: str | None = None) -> list[str]:
    """redis-server with AOF (appendfsync everysec) and noeviction, data under ``run_dir/redis``."""
    d = run_dir / "redis"
    d.mkdir(parents=True, exist_ok=True)
    argv = [
        _binary("redis-server", "/usr/bin"),
        "--port", str(port),
        "--bind", host,
        "--dir", str(d),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--protected-mode", "no",
        "--logfile", "",
    ]
    if maxmemory:
        argv += ["--maxmemory", maxmemory]
    return argv


def chdb_argv(run_dir: Path, port: int, host: str = "127.0.0.1", python: str = sys.executable) -> list[str]:
    d = run_dir / "chdb"
    d.mkdir(parents=True, exist_ok=True)
    return [python, "-m", "sensorhub", "chdb-server", "--host", host, "--port", str(port), "--data", str(d / "data")]


def redis_ready(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=0.5) as r:
            return bool(r.read() == b"Ok.\n")
    except OSError:
        return False


def start_mosquitto(run_dir: Path, port: int = 0, host: str = "127.0.0.1") -> ManagedProcess:
    port = port or free_port(host)
    mp = ManagedProcess(
        "mosquitto",
        mosquitto_argv(run_dir, port, host),
        ready=lambda: wait_tcp(host, port, 0.2),
        log_path=run_dir / "mosquitto" / "mosquitto.log",
        host=host,
        port=port,
        url=f"mqtt://{host}:{port}",
    )
    return mp.start()


def start_redis(
    run_dir: Path, port: int = 0, host: str = "127.0.0.1", maxmemory: str | None = None
) -> ManagedProcess:
    port = port or free_port(host)
    mp = ManagedProcess(
        "redis",
        redis_argv(run_dir, port, host, maxmemory),
        ready=lambda: redis_ready(host, port),
        log_path=run_dir / "redis" / "redis.log",
        host=host,
        port=port,
        url=f"redis://{host}:{port}/0",
    )
    return mp.start()


def start_chdb_server(run_dir: Path, port: int = 0, host: str = "127.0.0.1") -> ManagedProcess:
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    mp = ManagedProcess(
        "chdb-server",
        chdb_argv(run_dir, port, host),
        ready=lambda: http_ready(url),
        log_path=run_dir / "chdb" / "chdb-server.log",
        host=host,
        port=port,
        url=url,
    )
    return mp.start(timeout=60)
