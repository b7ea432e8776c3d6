"""A Redis Cluster on one machine: each node's command line, the ``create`` call, and the wait for ``ok``.

``node_argv`` is one node as ``sensorhub`` runs Redis anywhere (AOF with
``appendfsync always``, ``noeviction``), plus cluster mode: its own
``nodes-<port>.conf`` and data under ``<run_dir>/redis-cluster/<port>``. With
``aclfile`` the node's users are those of the file; with ``admin_password``
the node authenticates to its master as ``admin`` when it replicates. The
password goes into a config file of the node's own (mode 0600) whose path is
the first argument, never into argv. ``create_argv`` is ``redis-cli --cluster
create``; its password, when the nodes ask for one, is in ``create_env``
(``REDISCLI_AUTH``), not in argv either. ``wait_ok`` returns once every node
says ``cluster_state:ok``, agrees on every node and slot, and every master
has its replicas attached and in sync.

Nothing here starts or stops processes: the caller owns them (by PID), the
test fixtures and ``sensorhub stack`` alike.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sensorhub.errors import SensorhubError
from sensorhub.security import write_private
from sensorhub.service.stack_services import redis_durability_args

__all__ = ["create_argv", "create_env", "free_ports", "node_argv", "node_dir", "node_state", "wait_ok"]

SLOTS = 16384
BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` ports free on ``host`` whose cluster bus ports (+10000) are free too."""
    rng = random.Random()
    out: list[int] = []
    for _ in range(10_000):
        port = rng.randrange(20_000, 65_535 - BUS_OFFSET)
        if port in out or port + BUS_OFFSET in out or any(port == o + BUS_OFFSET for o in out):
            continue
        if _free(host, port) and _free(host, port + BUS_OFFSET):
            out.append(port)
            if len(out) == n:
                return out
    raise SensorhubError(f"no {n} free port pairs (port, port + {BUS_OFFSET}) on {host}")


def node_dir(run_dir: Path, port: int) -> Path:
    return run_dir / "redis-cluster" / str(port)


def node_argv(
    run_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    *,
    aclfile: Path | None = None,
    admin_password: str | None = None,
    maxmemory: str | None = None,
    node_timeout_ms: int = 5000,
    redis_server: str = "redis-server",
) -> list[str]:
    """``redis-server`` as one cluster node on ``host:port``, data under :func:`node_dir`.

    ``node_timeout_ms`` is how long a master may be unreachable before its
    replica takes over (``cluster-node-timeout``). With ``admin_password`` the
    node's config file (``redis.conf`` in its directory, 0600, the first
    argument) holds ``masteruser admin`` and ``masterauth``: a replica logs in
    to its master with them.
    """
    d = node_dir(run_dir, port)
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "redis.conf"
    lines = ["# written by sensorhub: the node's secrets stay out of its command line"]
    if admin_password is not None:
        if "\n" in admin_password or '"' in admin_password:
            raise SensorhubError("the Redis admin password may not hold a newline or a double quote")
        lines += ["masteruser admin", f'masterauth "{admin_password}"']
    write_private(conf, "\n".join(lines) + "\n")
    argv = [
        redis_server, str(conf),
        "--port", str(port),
        "--bind", host,
        "--dir", str(d),
        "--cluster-enabled", "yes",
        "--cluster-config-file", f"nodes-{port}.conf",
        "--cluster-node-timeout", str(node_timeout_ms),
        # a replica (re)synchronises at once: nothing is gained by waiting for more to join
        "--repl-diskless-sync-delay", "0",
        *redis_durability_args(maxmemory, aclfile),
    ]
    return argv


def create_argv(
    nodes: Sequence[tuple[str, int]], replicas: int = 1, *, user: str | None = None, redis_cli: str = "redis-cli"
) -> list[str]:
    """``redis-cli --cluster create`` of ``nodes`` (masters first, as redis-cli assigns them),
    ``replicas`` per master; ``user`` logs in with the password of :func:`create_env`."""
    argv = [redis_cli]
    if user:
        argv += ["--user", user]
    argv += ["--cluster", "create", *(f"{h}:{p}" for h, p in nodes), "--cluster-replicas", str(replicas),
             "--cluster-yes"]
    return argv


def create_env(password: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of :func:`create_argv`: ``REDISCLI_AUTH`` holds the password (not argv)."""
    env = dict(os.environ if base is None else base)
    if password:
        env["REDISCLI_AUTH"] = password
    return env


def _client(host: str, port: int, username: str | None, password: str | None) -> Any:
    import redis

    return redis.Redis(host=host, port=port, username=username, password=password, socket_timeout=2.0,
                       socket_connect_timeout=2.0)


def node_state(host: str, port: int, username: str | None = None, password: str | None = None) -> dict[str, Any]:
    """What one node says: ``CLUSTER INFO`` fields, its role and connected replicas."""
    r = _client(host, port, username, password)
    try:
        info = r.execute_command("CLUSTER INFO")
        if isinstance(info, bytes):
            info = info.decode()
        fields: dict[str, Any] = (
            dict(line.split(":", 1) for line in info.splitlines() if ":" in line) if isinstance(info, str) else info
        )
        repl = r.info("replication")
        fields["role"] = repl.get("role")
        fields["connected_slaves"] = int(repl.get("connected_slaves", 0))
        # replicas past their initial sync: only those confirm a WAIT
        fields["online_replicas"] = sum(
            1 for k, v in repl.items() if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        )
        return fields
    finally:
        r.close()


def wait_ok(
    nodes: Sequence[tuple[str, int]],
    replicas: int,
    timeout: float = 30.0,
    username: str | None = None,
    password: str | None = None,
) -> None:
    """Until every node says ``cluster_state:ok``, knows every node and every slot, and every
    master has ``replicas`` replicas connected and in sync; raises :class:`SensorhubError` after ``timeout``."""
    import redis

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            states = [node_state(h, p, username, password) for h, p in nodes]
            ok = all(
                s.get("cluster_state") == "ok"
                and int(s.get("cluster_known_nodes", 0)) == len(nodes)
                and int(s.get("cluster_slots_assigned", 0)) == SLOTS
                for s in states
            )
            masters = [s for s in states if s["role"] == "master"]
            if ok and masters and all(s["online_replicas"] >= replicas for s in masters):
                return
            last = states
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise SensorhubError(f"the Redis Cluster on {list(nodes)} is not ok within {timeout:.0f} s: {last}")
