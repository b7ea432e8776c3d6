"""A real Redis Cluster on loopback for the tests: 3 masters and their replicas, started and stopped by PID.

The nodes' command lines come from :mod:`sensorhub.service.redis_cluster`
(the same ones ``sensorhub stack`` runs); this adds what a test needs: start,
``redis-cli --cluster create``, wait until ok, find the master of a key, kill
one with ``-9`` and wait for its replica to take over, and clean keys between
tests.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from kit.services import ManagedProcess
from sensorhub.errors import SensorhubError
from sensorhub.service import redis_cluster
from sensorhub.service.stack_services import redis_ready

__all__ = ["LocalCluster"]


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each on ``host``, data under ``root``."""

    def __init__(
        self, root: Path, masters: int = 3, replicas: int = 1, host: str = "127.0.0.1", node_timeout_ms: int = 1000
    ) -> None:
        self.root = root
        self.host = host
        self.replicas = replicas
        self.ports = redis_cluster.free_ports(masters * (1 + replicas), host)
        self.nodes: dict[int, ManagedProcess] = {}
        for port in self.ports:
            argv = redis_cluster.node_argv(root, port, host, node_timeout_ms=node_timeout_ms)
            self.nodes[port] = ManagedProcess(
                f"redis-{port}", argv, ready=lambda port=port: redis_ready(host, port),
                log_path=redis_cluster.node_dir(root, port) / "redis.log", host=host, port=port,
                url=f"redis://{host}:{port}/0",
            )

    # ---- lifecycle ----
    def start(self, timeout: float = 30.0) -> LocalCluster:
        try:
            for mp in self.nodes.values():
                mp.start(timeout)
            out = subprocess.run(
                redis_cluster.create_argv([(self.host, p) for p in self.ports], self.replicas),
                capture_output=True, text=True, timeout=timeout, env=redis_cluster.create_env(None),
            )
            if out.returncode != 0:
                raise SensorhubError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
            redis_cluster.wait_ok([(self.host, p) for p in self.ports], self.replicas, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for mp in self.nodes.values():
            mp.terminate(timeout=10)

    # ---- what the tests use ----
    @property
    def url(self) -> str:
        """A URL naming two nodes: a cluster URL."""
        return f"redis://{self.host}:{self.ports[0]},{self.host}:{self.ports[1]}/0"

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The ``redis`` settings of a process on this cluster."""
        return {"url": f"redis://{self.host}:{self.ports[0]}/0", "cluster": True, **extra}

    def client(self) -> Any:
        from redis.cluster import RedisCluster

        return RedisCluster(host=self.host, port=self.ports[0], socket_timeout=5.0)

    def live_ports(self) -> list[int]:
        return [p for p, mp in self.nodes.items() if mp.alive()]

    def masters(self) -> list[int]:
        return [p for p in self.live_ports() if redis_cluster.node_state(self.host, p)["role"] == "master"]

    def master_of(self, key: str) -> int:
        r = self.client()
        try:
            return int(r.get_node_from_key(key).port)
        finally:
            r.close()

    def flush(self) -> None:
        """Every key gone, on every master (replicas follow)."""
        import redis

        for p in self.masters():
            r = redis.Redis(host=self.host, port=p)
            try:
                r.flushall()
            finally:
                r.close()

    def kill(self, port: int) -> None:
        """kill -9 the node on ``port``."""
        self.nodes[port].kill()

    def replica_of(self, master: int) -> int:
        """The port of a replica of the master on ``master``."""
        import redis

        r = redis.Redis(host=self.host, port=master)
        try:
            info = r.info("replication")
        finally:
            r.close()
        return int(info["slave0"]["port"])

    def wait_failover(self, dead: int, timeout: float = 30.0) -> None:
        """Until the dead master ``dead`` has been replaced (a replica promoted) and the cluster is ok again."""
        want = len(self.ports) // (1 + self.replicas)
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                states = {p: redis_cluster.node_state(self.host, p) for p in self.live_ports()}
                masters = [p for p, s in states.items() if s["role"] == "master"]
                if all(s.get("cluster_state") == "ok" for s in states.values()) and len(masters) == want:
                    return
                last = states
            except Exception as exc:  # a node busy failing over
                last = exc
            time.sleep(0.1)
        raise SensorhubError(f"no failover of {dead} within {timeout:.0f} s: {last}")
