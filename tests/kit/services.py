"""Real services for the tests and benchmarks: mosquitto, redis-server, chdb-server.

Every process runs in the foreground of its own process group, on a loopback
port under a run directory of its own, and is stopped by PID. The command
lines and configurations are the ones ``sensorhub stack`` runs
(:mod:`sensorhub.service.stack_services`); this module adds what a test
needs around them: start and wait until ready, signal, kill -9, stop,
restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensorhub.config import DEFAULT_ROUTES
from sensorhub.errors import SensorhubError
from sensorhub.security.broker import INGEST_ACCOUNT, TOOLS_ACCOUNT
from sensorhub.security.credentials import Credentials, ensure_credentials
from sensorhub.service.stack_services import (
    BrokerSecurity,
    chdb_argv,
    free_port,
    http_ready,
    mosquitto_argv,
    redis_argv,
    redis_ready,
)

__all__ = [
    "ManagedProcess",
    "SecureBroker",
    "free_port",
    "mqtt_login",
    "publish_all",
    "start_chdb_server",
    "start_mosquitto",
    "start_redis",
    "wait_tcp",
]


def mqtt_login(client: Any, info: dict[str, Any]) -> Any:
    """Give a paho client the credentials of a stack's JSON (``info["mqtt"]``): the tools
    account, which may publish to every device topic. An ``--insecure`` stack has none."""
    mq = info.get("mqtt", {})
    if mq.get("username"):
        client.username_pw_set(mq["username"], mq["password"])
    return client


def publish_all(client: Any, host: str, port: int, msgs: Sequence[tuple[str, bytes]], timeout: float = 20.0) -> None:
    """Connect the paho ``client``, publish ``msgs`` (topic, payload) at QoS 1, wait until the broker
    has acknowledged each, disconnect."""
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1) for t, p in msgs]
        for info in infos:
            info.wait_for_publish(timeout)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt_answers(host: str, port: int, username: str, password: str) -> bool:
    """True when the broker on ``host:port`` accepts a CONNECT of ``username`` (CONNACK 0): it is
    past its start, signal handlers included, and its password file is loaded."""
    from firmware_sim.mqtt import encode_connect

    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(encode_connect(f"ready-{os.getpid()}", username=username, password=password))
            ack = s.recv(4)
            return len(ack) == 4 and ack[0] == 0x20 and ack[3] == 0
    except OSError:
        return False


def wait_tcp(host: str, port: int, timeout: float) -> bool:
    """True once ``host:port`` accepts a TCP connection, False after ``timeout`` seconds."""
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


def _start(
    name: str, argv: list[str], ready: Callable[[], bool], log_path: Path, host: str, port: int, url: str,
    env: dict[str, str] | None = None, timeout: float = 20.0,
) -> ManagedProcess:
    mp = ManagedProcess(name, argv, ready=ready, log_path=log_path, env=env, host=host, port=port, url=url)
    return mp.start(timeout)


@dataclass
class SecureBroker(ManagedProcess):
    """mosquitto as ``sensorhub stack`` runs it: accounts, per-device ACLs, a TLS listener.

    ``accounts`` maps the service accounts (``sensorhub-ingest`` reads everything,
    ``sensorhub-tools`` reads and writes everything) to their passwords; ``add_device`` and
    ``remove_device`` change the password file and have the broker reload it (SIGHUP).
    """

    tls_port: int = 0
    creds: Credentials | None = None

    @property
    def ca_file(self) -> Path:
        assert self.creds is not None
        return self.creds.ca_file

    @property
    def accounts(self) -> dict[str, str]:
        assert self.creds is not None
        return {name: self.creds.password("mqtt", name) for name in (INGEST_ACCOUNT, TOOLS_ACCOUNT)}

    def password_file(self, account: str) -> Path:
        assert self.creds is not None
        return self.creds.password_file("mqtt", account)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)
        time.sleep(0.2)  # mosquitto reloads between two network loop passes

    def add_device(self, name: str) -> str:
        assert self.creds is not None
        password = self.creds.add_device(name)
        self.reload()
        return password

    def remove_device(self, name: str) -> None:
        assert self.creds is not None
        self.creds.remove_device(name)
        self.reload()


def start_mosquitto(
    run_dir: Path, port: int = 0, host: str = "127.0.0.1", *, secure: bool = False, client_certs: bool = False
) -> ManagedProcess:
    """mosquitto on ``port``; with ``secure`` a :class:`SecureBroker` (accounts, ACLs, TLS on ``tls_port``);
    with ``client_certs`` its TLS listener also asks for a client certificate of the CA, whose
    common name is the user name."""
    port = port or free_port(host)
    if not secure:
        return _start(
            "mosquitto", mosquitto_argv(run_dir, port, host), lambda: wait_tcp(host, port, 0.2),
            run_dir / "mosquitto" / "mosquitto.log", host, port, f"mqtt://{host}:{port}",
        )
    creds = ensure_credentials(run_dir, DEFAULT_ROUTES)
    tls_port = free_port(host)
    security = BrokerSecurity(
        creds.mqtt_password_file, creds.mqtt_acl_file, tls_port, host, creds.ca_file,
        creds.server_cert.cert, creds.server_cert.key, require_client_cert=client_certs,
    )
    mp = SecureBroker(
        "mosquitto", mosquitto_argv(run_dir, port, host, security),
        ready=lambda: wait_tcp(host, tls_port, 0.2) and mqtt_answers(
            host, port, TOOLS_ACCOUNT, creds.password("mqtt", TOOLS_ACCOUNT)),
        log_path=run_dir / "mosquitto" / "mosquitto.log", host=host, port=port, url=f"mqtt://{host}:{port}",
        tls_port=tls_port, creds=creds,
    )
    mp.start()
    return mp


def start_redis(
    run_dir: Path, port: int = 0, host: str = "127.0.0.1", maxmemory: str | None = None
) -> ManagedProcess:
    port = port or free_port(host)
    return _start(
        "redis", redis_argv(run_dir, port, host, maxmemory), lambda: redis_ready(host, port),
        run_dir / "redis" / "redis.log", host, port, f"redis://{host}:{port}/0",
    )


def start_chdb_server(
    run_dir: Path,
    port: int = 0,
    host: str = "127.0.0.1",
    *,
    extra: Sequence[str] = (),
    data: Path | None = None,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    """chdb-server with ``extra`` options; data and log under ``run_dir/chdb`` unless given."""
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    return _start(
        "chdb-server", chdb_argv(run_dir, port, host, data=data, extra=extra), lambda: http_ready(url),
        log_path or run_dir / "chdb" / "chdb-server.log", host, port, url, env=env, timeout=60,
    )
