"""What ``WAIT`` costs the ingest: flush latency with and without waiting for a replica.

One ingest flush is, per partition, the transaction ``sensorhub ingest``
writes (:meth:`sensorhub.pipeline.ingest.Ingest._transactions`): XADD of a
packed block of readings, the audit HINCRBYs and EXPIRE, the dedup log XADD.
It runs through :class:`sensorhub.pipeline.slots.Transactions`, the class the
ingest uses, in a closed loop, on loopback:

- ``single``: one redis-server, no replica (the flush is one MULTI; no WAIT);
- ``single+replica``: a primary with one replica, one MULTI per flush,
  ``redis.min_replicas`` 0 (no WAIT) against unset (WAIT 1);
- ``cluster``: 3 masters with one replica each, one MULTI per partition
  (8), those of one master back to back and followed by one WAIT, every
  master in the same round trip, against ``min_replicas = 0``.

Recorded per case: flushes, p50/p90/p99/max of one flush (ms), flushes/s,
readings/s. Writes benchmarks/results/redis-wait.json. Bounded: about 30 s.

    .venv/bin/python benchmarks/redis_wait.py [--flushes 2000] [--readings 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from sensorhub.config import load_settings
from sensorhub.decoders import ReadingBatch
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.redisconn import redis_client
from sensorhub.pipeline.slots import Transactions
from sensorhub.pipeline.streams import F_BLOCK, F_KIND, F_SOURCE, KIND_READINGS, encode_block
from sensorhub.service import redis_cluster
from sensorhub.service.stack_services import free_port, redis_argv, redis_ready

OUT = Path(__file__).resolve().parent / "results" / "redis-wait.json"
PARTITIONS = 8


def _block(n: int) -> bytes:
    b = ReadingBatch(n)
    t0 = time.time_ns() // 1000
    for i in range(n):
        b.append(f"dev-{i % 25}", "temp_c", t0 + i, float(i), 0, i, t0 + i)
    return encode_block(b, time.time_ns())


def _flush(lay: StreamLayout, block: bytes, minute: int, txid: bytes) -> dict[int, list[list[Any]]]:
    """Per partition, the commands of one ingest flush (readings, audit, dedup log)."""
    per: dict[int, list[list[Any]]] = {}
    for p in range(lay.partitions):
        key = lay.audit_key("bench", minute, p)
        per[p] = [
            ["XADD", lay.readings(p), "MAXLEN", "~", 10_000, "*", F_BLOCK, block, F_SOURCE, b"bench", F_KIND, KIND_READINGS],
            ["HINCRBY", key, "received", 10], ["HINCRBY", key, "decoded", 256], ["HINCRBY", key, "xadded", 256],
            ["EXPIRE", key, 3600],
            ["XADD", lay.acklog("bench", p), "MAXLEN", "~", 4096, "*", b"d", b"x" * 120, b"c", b"", b"tx", txid],
        ]
    return per


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _measure(client: Any, min_replicas: int | None, flushes: int, readings: int) -> dict[str, Any]:
    lay = StreamLayout("bench", PARTITIONS)
    tx = Transactions(client, min_replicas, 1000)
    tx.refresh()
    block = _block(readings // PARTITIONS)
    minute = int(time.time() // 60)
    times: list[float] = []
    waited = 0
    start = time.perf_counter()
    for i in range(flushes):
        per = _flush(lay, block, minute, i.to_bytes(16, "big"))
        t0 = time.perf_counter()
        if tx.cluster:
            work = [(cmds[0][1], cmds) for cmds in per.values()]
            waited += sum(tx.waits(k) > 0 for k, _c in work)
            for outcome in tx.execute_many(work):
                if isinstance(outcome, Exception):
                    raise outcome
        else:
            waited += tx.waits(lay.readings(0)) > 0
            tx.execute(lay.readings(0), [c for cmds in per.values() for c in cmds])
        times.append((time.perf_counter() - t0) * 1000)
    wall = time.perf_counter() - start
    return {
        "flushes": flushes,
        "transactions_with_wait": waited,
        "p50_ms": round(_pct(times, 0.50), 3),
        "p90_ms": round(_pct(times, 0.90), 3),
        "p99_ms": round(_pct(times, 0.99), 3),
        "max_ms": round(max(times), 3),
        "mean_ms": round(sum(times) / len(times), 3),
        "flushes_per_s": round(flushes / wall),
        "readings_per_s": round(flushes * (readings // PARTITIONS) * PARTITIONS / wall),
    }


def _start(argv: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while not redis_ready("127.0.0.1", port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"redis-server on {port} did not start; see {log}")
        time.sleep(0.05)
    return proc


def _wait_online(port: int, timeout: float = 30.0) -> None:
    r = redis.Redis(port=port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.info("replication").get("slave0", {}).get("state") == "online":
            return
        time.sleep(0.05)
    raise RuntimeError(f"the replica of {port} is not in sync")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flushes", type=int, default=2000)
    ap.add_argument("--readings", type=int, default=256, help="readings per flush, over the 8 partitions")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="redis-wait-") as tmp:
        root = Path(tmp)
        try:
            # a single Redis, then a primary with one replica
            primary = free_port()
            procs.append(_start([*redis_argv(root / "primary", primary), "--repl-diskless-sync-delay", "0"],
                                primary, root / "primary.log"))
            c = redis.Redis(port=primary)
            results["single"] = {"no_wait": _measure(c, None, args.flushes, args.readings)}
            replica = free_port()
            procs.append(_start([*redis_argv(root / "replica", replica), "--replicaof", "127.0.0.1", str(primary)],
                                replica, root / "replica.log"))
            _wait_online(primary)
            results["single+replica"] = {
                "no_wait": _measure(c, 0, args.flushes, args.readings),
                "wait": _measure(c, None, args.flushes, args.readings),
            }
            c.flushall()
            # a cluster of 3 masters and 3 replicas
            ports = redis_cluster.free_ports(6)
            for p in ports:
                procs.append(_start(redis_cluster.node_argv(root, p), p, root / f"node-{p}.log"))
            out = subprocess.run(redis_cluster.create_argv([("127.0.0.1", p) for p in ports], 1),
                                 capture_output=True, text=True, timeout=60, env=redis_cluster.create_env(None))
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
            redis_cluster.wait_ok([("127.0.0.1", p) for p in ports], 1, 60)
            rc = redis_client(load_settings(redis={"url": f"redis://127.0.0.1:{ports[0]}/0", "cluster": True}).redis)
            results["cluster"] = {
                "no_wait": _measure(rc, 0, args.flushes, args.readings),
                "wait": _measure(rc, None, args.flushes, args.readings),
            }
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for case in results.values():
        if "wait" in case:
            case["wait_cost_p50_ms"] = round(case["wait"]["p50_ms"] - case["no_wait"]["p50_ms"], 3)
            case["wait_cost_p99_ms"] = round(case["wait"]["p99_ms"] - case["no_wait"]["p99_ms"], 3)
    doc = {
        "benchmark": "redis_wait",
        "flush": {"partitions": PARTITIONS, "readings": args.readings // PARTITIONS * PARTITIONS,
                  "what": "the ingest's transactions of one flush; a cluster: one per partition"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
        "seconds": round(time.monotonic() - started, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
