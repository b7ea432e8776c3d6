"""Scale-out side by side: the single-Redis stack against a Redis Cluster stack with two ingests and two writers.

Each round starts a fresh ``sensorhub stack`` (secured, as shipped), drives it with
``sensorhub-sim loadtest --stack`` at ``--rate`` readings/s in frames of ``--per-message`` for
``--seconds`` (QoS 1, 200 devices), verifies, and stops it. The two setups alternate, ``--rounds``
times each, on the same box in one run, so their ratio is what to read:

- ``single``: one redis-server, one ingest, one writer;
- ``cluster``: ``--redis-cluster 3 --replicas 1 --ingests 2 --writers 2`` (every ingest
  transaction waits for its replica, ``WAIT``).

Recorded per round: published, stored, lost, duplicated, the loadtest's latency percentiles
(device time to row visible) and CPU seconds per process. Writes
benchmarks/results/cluster.json. Every run is bounded in count and time; loopback only.

    python benchmarks/cluster.py                       # 40k readings/s, frames of 10, 60 s, 2 rounds each
    python benchmarks/cluster.py --seconds 20 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from kit.results import write_results  # noqa: E402

SETUPS: dict[str, list[str]] = {
    "single": [],
    "cluster": ["--redis-cluster", "3", "--replicas", "1", "--ingests", "2", "--writers", "2"],
}
KEYS = ("published", "stored", "lost", "duplicated", "mismatched", "achieved_rate", "p50_ms", "p95_ms", "p99_ms",
        "max_ms")


def _cpu_s(pids: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = round(t.user + t.system, 2)
        except psutil.Error:
            out[name] = float("nan")
    return out


def one_round(setup: str, args: argparse.Namespace, tmp: Path, n: int) -> dict[str, Any]:
    d = tmp / f"{setup}-{n}"
    sh = [sys.executable, "-m", "sensorhub"]
    up = subprocess.run([*sh, "stack", "up", "--dir", str(d), "--json", "--timeout", "180", *SETUPS[setup]],
                        capture_output=True, text=True, timeout=240)
    if up.returncode != 0:
        raise SystemExit(f"stack up ({setup}) failed:\n{up.stdout}\n{up.stderr}")
    info = json.loads(up.stdout)
    pids = {k: v for k, v in info["pids"].items() if v}
    try:
        cpu0 = _cpu_s(pids)
        t0 = time.monotonic()
        sim = subprocess.run(
            [sys.executable, "-m", "firmware_sim", "loadtest", "--stack", str(d), "--rate", str(args.rate),
             "--per-message", str(args.per_message), "--duration", str(args.seconds), "--devices", "200",
             "--format", "frame", "--qos", "1", "--drain-timeout", "120", "--json"],
            capture_output=True, text=True, timeout=args.seconds + 300,
        )
        wall = time.monotonic() - t0
        lines = [ln for ln in sim.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise SystemExit(f"loadtest ({setup}) printed no result:\n{sim.stdout}\n{sim.stderr}")
        r = json.loads(lines[-1])
        cpu1 = _cpu_s(pids)
    finally:
        subprocess.run([*sh, "stack", "down", "--dir", str(d)], capture_output=True, timeout=120)
    out = {k: r.get(k) for k in KEYS}
    out.update(setup=setup, round=n, wall_s=round(wall, 1),
               cpu_s={k: round(cpu1[k] - cpu0[k], 2) for k in cpu0})
    print(json.dumps(out))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=40_000)
    p.add_argument("--per-message", type=int, default=10)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster.json")
    args = p.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        for n in range(1, args.rounds + 1):
            for setup in SETUPS:  # alternating: each round of one right beside one of the other
                results.append(one_round(setup, args, Path(tmp), n))
    summary: dict[str, Any] = {}
    for setup in SETUPS:
        rows = [r for r in results if r["setup"] == setup]
        summary[setup] = {
            "rounds": len(rows),
            "lost": sum(int(r["lost"] or 0) for r in rows),
            "duplicated": sum(int(r["duplicated"] or 0) for r in rows),
            **{f"median_{k}": statistics.median(float(r[k]) for r in rows)
               for k in ("achieved_rate", "p50_ms", "p99_ms", "max_ms")},
        }
    summary["p99_ratio_cluster_to_single"] = round(
        summary["cluster"]["median_p99_ms"] / max(summary["single"]["median_p99_ms"], 1e-9), 2)
    write_results(args.out, "cluster", results, rate=args.rate, per_message=args.per_message,
                  seconds=args.seconds, setups={k: " ".join(v) or "(defaults)" for k, v in SETUPS.items()},
                  summary=summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
