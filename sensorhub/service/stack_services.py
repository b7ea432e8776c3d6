"""What ``sensorhub stack`` runs beside the pipeline: mosquitto, redis-server, chdb-server.

The command lines and configurations of the three services, the readiness
probes the stack's supervisor polls, and the free loopback ports it picks.
The configurations are the ones the project documents for operators
(docs/operations.md): the broker keeps what it accepted, Redis refuses rather
than evicts. The tests and benchmarks start the same command lines through
their own process harness (``tests/kit/services.py``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sensorhub.errors import SensorhubError

__all__ = [
    "BrokerSecurity",
    "binary",
    "chdb_argv",
    "free_port",
    "http_ready",
    "mosquitto_argv",
    "mosquitto_config",
    "redis_argv",
    "redis_durability_args",
    "redis_ready",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def binary(name: str, *extra_dirs: str) -> str:
    """The path of the program `name` (on PATH, or in one of `extra_dirs`); names the package when missing."""
    path = shutil.which(name) or next(
        (str(Path(d) / name) for d in extra_dirs if (Path(d) / name).exists()), None
    )
    if not path:
        raise SensorhubError(f"{name} is not installed (Debian: apt-get install -y {name.split('-')[0]})")
    return path


@dataclass(frozen=True)
class BrokerSecurity:
    """What makes the broker default-deny: accounts, ACLs, and a TLS listener.

    ``password_file`` holds mosquitto hashes, ``acl_file`` the per-account and per-device rules
    (:mod:`sensorhub.security.broker`). ``tls_port`` is the TLS listener (TLS 1.2 or later) on
    ``tls_host``; with ``require_client_cert`` a client must also present a certificate the CA
    signed, and its common name becomes its user name.
    """

    password_file: Path
    acl_file: Path
    tls_port: int | None = None
    tls_host: str = "127.0.0.1"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    require_client_cert: bool = False

    def lines(self) -> list[str]:
        out = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {self.password_file}",
            f"acl_file {self.acl_file}",
        ]
        if self.tls_port:
            out += [
                f"listener {self.tls_port} {self.tls_host}",
                f"cafile {self.ca_file}",
                f"certfile {self.cert_file}",
                f"keyfile {self.key_file}",
                "tls_version tlsv1.2",
                f"require_certificate {'true' if self.require_client_cert else 'false'}",
            ]
            if self.require_client_cert:
                out.append("use_identity_as_username true")
        return out


def mosquitto_config(
    port: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    max_queued_messages: int = 2_000_000,
    max_queued_bytes: int = 2 << 30,
    session_expiry: str = "7d",
    security: BrokerSecurity | None = None,
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
    - with ``security`` (the default of ``sensorhub stack``): no anonymous
      client, every account checked against the password file and the ACL,
      and a TLS listener beside the plain one; without it (``--insecure``)
      anyone who reaches the port may publish and subscribe to anything.
    """
    listeners = [f"listener {port} {host}", *(security.lines() if security else ["allow_anonymous true"])]
    return "\n".join(
        [
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            *listeners,
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


def mosquitto_argv(
    run_dir: Path, port: int, host: str = "127.0.0.1", security: BrokerSecurity | None = None
) -> list[str]:
    """Write the broker configuration under ``run_dir/mosquitto`` and return its command line."""
    d = run_dir / "mosquitto"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "mosquitto.conf"
    conf.write_text(mosquitto_config(port, d, host, security=security))
    return [binary("mosquitto", "/usr/sbin"), "-c", str(conf)]


def redis_argv(
    run_dir: Path, port: int, host: str = "127.0.0.1", maxmemory: str | None = None, aclfile: Path | None = None
) -> list[str]:
    """redis-server with AOF (appendfsync always) and noeviction, data under ``run_dir/redis``.

    With ``aclfile`` (the default of ``sensorhub stack``) its users are those of the file, the
    default user off (:func:`sensorhub.security.credentials.redis_acl_text`)."""
    d = run_dir / "redis"
    d.mkdir(parents=True, exist_ok=True)
    return [binary("redis-server", "/usr/bin"), "--port", str(port), "--bind", host, "--dir", str(d),
            *redis_durability_args(maxmemory, aclfile)]


def redis_durability_args(maxmemory: str | None = None, aclfile: Path | None = None) -> list[str]:
    """What every redis-server sensorhub starts runs with, a single one or a cluster node: AOF with
    ``appendfsync always``, no RDB snapshots, ``noeviction`` (a full Redis refuses, it never
    drops an entry), in the foreground, logging to stdout; ``maxmemory`` and the ACL file when given."""
    args = [
        "--appendonly", "yes",
        # "always": the AOF is written (and synced) before the replies of that event-loop turn go
        # out. With "everysec" Redis postpones the write for up to 2 s while a background fsync is
        # slow and replies meanwhile, so a kill -9 lost an acknowledged XADD (one reading in ten
        # lost in a fault test) and a writer's XACKs. Cost, 30-s A/B side by side on this box:
        # within run-to-run noise (benchmarks/results/redis-appendfsync.json).
        "--appendfsync", "always",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--protected-mode", "no",
        "--logfile", "",
    ]
    if maxmemory:
        args += ["--maxmemory", maxmemory]
    if aclfile is not None:
        args += ["--aclfile", str(aclfile)]
    return args


def chdb_argv(
    run_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    python: str = sys.executable,
    data: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``sensorhub chdb-server`` with its data under ``data`` (default ``run_dir/chdb/data``)."""
    d = run_dir / "chdb"
    d.mkdir(parents=True, exist_ok=True)
    data = d / "data" if data is None else data
    return [python, "-m", "sensorhub", "chdb-server", "--host", host, "--port", str(port), "--data", str(data), *extra]


def redis_ready(host: str, port: int) -> bool:
    """True when redis-server on ``host:port`` answers PING (or refuses it for want of credentials:
    it is up)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def http_ready(url: str) -> bool:
    """True when the ClickHouse HTTP interface at ``url`` answers ``/ping``."""
    try:
        with urllib.request.urlopen(url + "/ping", timeout=0.5) as r:
            return bool(r.read() == b"Ok.\n")
    except OSError:
        return False
