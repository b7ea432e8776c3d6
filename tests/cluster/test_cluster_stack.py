"""``sensorhub stack up --redis-cluster 3 --replicas 1 --ingests 2 --writers 2``: the scaled-out appliance.

A real Redis Cluster (3 masters, 3 replicas, each node with the stack's ACL
file, replicas logging in to their masters as admin), two ingests in one MQTT
v5 shared subscription, two writers in one consumer group. The simulator's
load goes through it with nothing lost or doubled; the monitor (its read-only
account) and the audit read the cluster; a restart on the same directory
finds the cluster in the nodes' ``nodes.conf`` instead of creating it again;
``stack down`` stops every node.

The kill -9 of one of the two writers and one of the two ingests under load
runs in ``make faults`` only (``SENSORHUB_FAULT_REDIS_FAILOVER=1``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from sensorhub.service.stack import stack_down, stack_status

SCALE = ("--redis-cluster", "3", "--replicas", "1", "--ingests", "2", "--writers", "2")
LOAD = ("--rate", "2000", "--per-message", "10", "--devices", "20", "--format", "frame")


class _ClusterStack:
    """The stack of ``d``, started with :data:`SCALE` (what run_loadtest needs: ``dir``)."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.info: dict[str, Any] = {}

    def up(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "sensorhub", "stack", "up", "--dir", str(self.dir), "--json",
                              "--timeout", "120", *SCALE], capture_output=True, text=True, timeout=150)
        assert out.returncode == 0, f"stack up failed:\n{out.stdout}\n{out.stderr}"
        self.info = json.loads(out.stdout)
        return self.info

    def down(self) -> None:
        stack_down(self.dir)

    def sensorhub(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sensorhub", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def cluster_stack(tmp_path: Path) -> Any:
    s = _ClusterStack(tmp_path / "stack")
    yield s
    s.down()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def _creates(d: Path) -> int:
    return (d / "supervisor.log").read_text().count("creating the Redis Cluster")


def test_a_cluster_stack_with_two_ingests_and_two_writers_loses_and_doubles_nothing(
    cluster_stack: Any, loadtest: Callable[..., dict[str, Any]]
) -> None:
    info = cluster_stack.up()
    d = cluster_stack.dir
    # the children, the nodes, and the cluster URL with the admin account
    assert {"ingest-1", "ingest-2", "writer-1", "writer-2", "mosquitto", "chdb-server"} <= set(info["pids"])
    assert not {"ingest", "writer", "redis"} & set(info["pids"])
    nodes = info["redis_nodes"]
    assert len(nodes) == 6 and sorted(n["role"] for n in nodes) == ["master"] * 3 + ["replica"] * 3
    assert all(n["pid"] == info["pids"][f"redis-{i}"] for i, n in enumerate(nodes, 1))
    assert info["redis_url"].startswith("redis://admin:") and info["redis_url"].count(",") == 5
    # every node has the stack's users, and its replication secret in its own 0600 file
    admin = (d / "secrets" / "redis-admin").read_text().strip()
    for n in nodes:
        port = int(n["url"].rsplit(":", 1)[1].split("/")[0])
        conf = d / "redis-cluster" / str(port) / "redis.conf"
        assert conf.stat().st_mode & 0o777 == 0o600 and "masteruser admin" in conf.read_text()
        r = redis.Redis(host="127.0.0.1", port=port, username="admin", password=admin)
        try:
            assert r.config_get("aclfile")["aclfile"] == str(d / "redis" / "users.acl")
            assert r.config_get("masteruser")["masteruser"] == "admin"
            assert {"monitor", "ingest", "writer"} <= set(r.acl_users())
        finally:
            r.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).set("x", 1)  # the default user is off

    result = loadtest(cluster_stack, *LOAD, "--duration", "4")
    assert result["published"] > 0 and result["lost"] == 0 and result["duplicated"] == 0, result

    # both ingests took a share through the shared subscription, and the audit reconciles over every master
    audit = cluster_stack.sensorhub("audit", "--reconcile", "--json", "--redis", info["redis_url"],
                                    "--clickhouse", info["clickhouse_url"])
    assert audit.returncode == 0, audit.stdout + audit.stderr
    rows = json.loads(audit.stdout)["rows"]
    assert {r["source"] for r in rows if r["xadded"]} == {"mqtt-1", "mqtt-2"}
    assert sum(r["xadded"] for r in rows) == result["published"]

    # the monitor reads the cluster with its read-only account (CLUSTER SLOTS, COMMAND)
    mon = cluster_stack.sensorhub("monitor", "--stack", str(d), "--once", "--json")
    assert mon.returncode == 0, mon.stdout + mon.stderr
    state = json.loads(mon.stdout)
    assert state["redis"]["ok"], state["redis"]
    assert {w["name"] for w in state["writers"]} >= {"writer-1", "writer-2"}, state["writers"]

    # a restart on the same directory: the same nodes, the cluster found again, not created again
    node_pids = [n["pid"] for n in nodes]
    cluster_stack.down()
    assert not any(_alive(p) for p in node_pids)
    assert _creates(d) == 1
    again = cluster_stack.up()
    assert [n["url"] for n in again["redis_nodes"]] == [n["url"] for n in nodes]
    assert _creates(d) == 1
    result = loadtest(cluster_stack, *LOAD, "--duration", "1")
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    cluster_stack.down()
    assert not any(_alive(n["pid"]) for n in again["redis_nodes"])
    assert not stack_status(d)["running"]


@pytest.mark.fault
@pytest.mark.skipif(not os.environ.get("SENSORHUB_FAULT_REDIS_FAILOVER"), reason="make faults only")
@pytest.mark.parametrize("victims", [("writer-1",), ("ingest-1",), ("writer-2", "ingest-2")])
def test_kill_9_of_a_writer_or_an_ingest_of_two_under_load(
    cluster_stack: Any, loadtest: Callable[..., dict[str, Any]], victims: tuple[str, ...]
) -> None:
    cluster_stack.up()
    got: dict[str, Any] = {}
    load = threading.Thread(target=lambda: got.update(loadtest(cluster_stack, *LOAD, "--duration", "8")))
    load.start()
    time.sleep(3)
    before = stack_status(cluster_stack.dir)["pids"]
    for name in victims:
        os.kill(int(before[name]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = stack_status(cluster_stack.dir)
        if st["ready"] and all(st["pids"].get(n) not in (None, before[n]) for n in victims):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{victims} did not come back")
    load.join(120)
    assert got["published"] > 0 and got["lost"] == 0 and got["duplicated"] == 0, got
