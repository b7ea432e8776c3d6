"""End-to-end pipeline benchmark: the whole stack on this machine, driven by the simulator.

For each case a fresh ``sensorhub stack`` (mosquitto, redis-server,
chdb-server, one MQTT ingest, one writer) is started, ``sensorhub-sim
loadtest`` publishes at the given rate for ``--seconds`` (QoS 1, 200
devices), waits for the store and verifies. Recorded per case: published,
stored, lost, duplicated, publish→row-visible latency percentiles (device
time to insert time, as the verifier measures), the per-hop percentiles the
processes published, and CPU seconds per process over the run.

Writes benchmarks/results/pipeline.json. Every run is bounded in time.

    python benchmarks/pipeline.py                 # the standard cases
    python benchmarks/pipeline.py --cases 40000x1 --seconds 20
    python benchmarks/pipeline.py --cases 40000x1 --seconds 15 --mqtt-client paho native   # side by side
    python benchmarks/pipeline.py --cases 40000x10 20000x1 --seconds 30 --rounds 2 \\
        --redis-appendfsync always everysec --out benchmarks/results/redis-appendfsync.json

``--redis-appendfsync`` sets the stack's Redis to that AOF policy (``CONFIG SET``, as the admin
account) before the load: the stack runs ``always``; ``everysec`` is the usual Redis choice.
Several drivers, policies and rounds alternate within each case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CASES = ["10000x1", "40000x1", "10000x10", "40000x10", "120000x10"]


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            kids = sum(c.cpu_times().user + c.cpu_times().system for c in psutil.Process(pid).children(recursive=True))
            out[name] = t.user + t.system + kids
        except psutil.Error:
            out[name] = float("nan")
    return out


def _hops(redis_url: str) -> dict[str, Any]:
    r = redis.Redis.from_url(redis_url)
    hops: dict[str, Any] = {}
    for key in r.keys("sh:metrics:*"):
        raw = r.hget(key, "state")
        if not raw:
            continue
        snap = json.loads(raw)
        for hop, st in snap.get("latency", {}).items():
            hops[f"{snap['role']}:{hop}"] = {k: st[k] for k in ("count", "p50_ms", "p95_ms", "p99_ms", "max_ms")}
    r.close()
    return hops


def run_case(rate: int, per_message: int, seconds: float, fmt: str, mode: str, mqtt_client: str = "native",
             appendfsync: str | None = None) -> dict[str, Any]:
    sh = [sys.executable, "-m", "sensorhub"]
    with tempfile.TemporaryDirectory(prefix="sh-bench-") as d:
        run_dir = Path(d) / "stack"
        cfg = Path(d) / "sensorhub.toml"
        cfg.write_text(f'[mqtt]\nclient = "{mqtt_client}"\n')
        up = subprocess.run([*sh, "--config", str(cfg), "stack", "up", "--dir", str(run_dir), "--json"],
                            capture_output=True, text=True, timeout=180)
        if up.returncode != 0:
            raise SystemExit(f"stack up failed: {up.stderr[-2000:]}")
        info = json.loads(up.stdout)
        try:
            r = redis.Redis.from_url(info["redis_url"])
            if appendfsync:
                r.config_set("appendfsync", appendfsync)
            aof_policy = r.config_get("appendfsync")["appendfsync"]
            r.close()
            pids = {k: v for k, v in info["pids"].items() if v}
            cpu0 = _cpu(pids)
            t0 = time.monotonic()
            lt = subprocess.run(
                [sys.executable, "-m", "firmware_sim", "loadtest",
                 "--stack", info["dir"],
                 "--rate", str(rate), "--duration", str(seconds), "--devices", "200",
                 "--format", fmt, "--per-message", str(per_message), "--qos", "1", "--mode", mode,
                 "--drain-timeout", "240", "--json"],
                capture_output=True, text=True, timeout=seconds + 400,
            )
            wall = time.monotonic() - t0
            cpu1 = _cpu(pids)
            lines = [ln for ln in lt.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                raise SystemExit(f"loadtest failed: {lt.stderr[-3000:]}")
            res = json.loads(lines[-1])
            res["case"] = f"{rate}x{per_message}"
            res["mqtt_client"] = mqtt_client
            res["redis_appendfsync"] = aof_policy
            res["target_rate"] = rate
            res["per_message"] = per_message
            res["format"] = fmt
            res["seconds"] = seconds
            res["wall_s"] = round(wall, 1)
            res["cpu_s"] = {k: round(cpu1[k] - cpu0[k], 2) for k in pids}
            res["cpu_cores"] = {k: round((cpu1[k] - cpu0[k]) / wall, 2) for k in pids}
            res["hops"] = _hops(info["redis_url"])
            if res.get("published"):
                res["ingest_cpu_us_per_msg"] = round(res["cpu_s"].get("ingest", 0.0) / res["published"] * 1e6, 1)
            res["zero_loss"] = res["lost"] == 0 and res["duplicated"] == 0 and res["mismatched"] == 0
            return res
        finally:
            subprocess.run([*sh, "stack", "down", "--dir", str(run_dir)], capture_output=True, timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="RATExPER_MESSAGE, e.g. 40000x1")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--format", default="frame")
    p.add_argument("--mode", default="pooled", choices=("pooled", "per-device"))
    p.add_argument("--mqtt-client", nargs="+", default=["native"], choices=("paho", "native"),
                   help="MQTT driver(s) of the ingest; several: each case once per driver")
    p.add_argument("--redis-appendfsync", nargs="+", default=[None], choices=("always", "everysec", "no"),
                   help="the stack's Redis AOF policy; several: each case once per policy")
    p.add_argument("--rounds", type=int, default=1, help="repeat each case's variants, alternating")
    p.add_argument("--out", default=str(RESULTS / "pipeline.json"))
    args = p.parse_args()
    os.chdir(ROOT)
    load_before = os.getloadavg()
    results = []
    for case in args.cases:
        rate_s, _, per_s = case.partition("x")
        variants = [(c, a) for c in args.mqtt_client for a in args.redis_appendfsync]
        for _round, (client, aof) in [(n, v) for n in range(args.rounds) for v in variants]:
            res = run_case(int(rate_s), int(per_s or 1), args.seconds, args.format, args.mode, client, aof)
            res["round"] = _round + 1
            results.append(res)
            print(json.dumps({k: res.get(k) for k in ("case", "mqtt_client", "redis_appendfsync", "round", "published", "stored", "lost", "duplicated",
                                                       "achieved_rate", "p50_ms", "p95_ms", "p99_ms", "max_ms",
                                                       "cpu_cores", "ingest_cpu_us_per_msg")}), flush=True)
    out = {"machine": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0 if all(r["zero_loss"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
