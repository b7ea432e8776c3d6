"""Sustained latency: the whole stack at a fixed load for minutes, with a reference measured on the same box.

Short runs flatter the pipeline: merges, compaction and GC show up after
minutes. Each run here starts a fresh ``sensorhub stack``, drives it with
``sensorhub-sim loadtest`` (200 devices, QoS 1) for ``--seconds``, then
reads from ClickHouse, per minute of device time, the count and the
percentiles of device time → row inserted. Every 5 s it samples CPU and RSS
of every process. Before the stack starts, and again after it stops, it
measures a fixed reference on the same box, so figures from different
machines and moments can be compared:

- ``ref_python_s``: a fixed pure-Python loop (the interpreter's speed);
- ``ref_chdb``: chdb alone in one process, 1,000-row inserts 40 times a
  second for ``--ref-seconds`` (insert p50/p99 ms): the engine's speed.

Writes ``benchmarks/results/soak-<label>.json``. The goals it checks (for
the 40k readings/s case): zero loss, p50 < 20 ms, p99 < 50 ms, max < 250 ms,
every minute's p99 < 50 ms. Bounded: the load stops after ``--seconds`` and
the drain wait is capped.

    python benchmarks/soak.py --rate 40000 --per-message 10 --seconds 600 --label 40k
    python benchmarks/soak.py --rate 120000 --per-message 10 --seconds 600 --label 120k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SAMPLE_S = 5.0

_REF_CHDB = r"""
import json, sys, tempfile, time
import chdb.session as cs
secs = float(sys.argv[1])
s = cs.Session(tempfile.mkdtemp(prefix="soak-ref-"))
s.query("CREATE TABLE r (device LowCardinality(String), metric LowCardinality(String), "
        "ts DateTime64(6, 'UTC'), value Float64, seq UInt64) ENGINE = MergeTree ORDER BY (device, metric, ts)")
lat = []
t_end = time.monotonic() + secs
i = 0
while time.monotonic() < t_end:
    t0 = time.perf_counter()
    s.query(f"INSERT INTO r SELECT concat('d', toString(number % 200)), 'm', "
            f"fromUnixTimestamp64Micro(toInt64({i} * 1000 + number)), number * 0.5, {i} * 1000 + number "
            f"FROM numbers(1000)")
    lat.append((time.perf_counter() - t0) * 1000)
    i += 1
    time.sleep(max(0.0, 0.025 - (time.perf_counter() - t0)))
lat.sort()
print(json.dumps({"inserts": len(lat), "p50_ms": round(lat[len(lat) // 2], 2),
                  "p99_ms": round(lat[int(len(lat) * 0.99)], 2), "max_ms": round(lat[-1], 2)}))
"""


def reference(ref_seconds: float) -> dict[str, Any]:
    """The fixed reference: a pure-Python loop and chdb alone, on this box, now."""
    t0 = time.process_time()
    x = 0
    for i in range(5_000_000):
        x += i & 7
    py = time.process_time() - t0
    out = subprocess.run([sys.executable, "-c", _REF_CHDB, str(ref_seconds)], capture_output=True, text=True,
                         timeout=ref_seconds + 120)
    chdb_ref = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}
    return {"ref_python_s": round(py, 3), "ref_chdb": chdb_ref, "loadavg": os.getloadavg()}


class Sampler(threading.Thread):
    """CPU (cores used) and RSS (MB) of every stack process every SAMPLE_S seconds."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.pids = pids
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        procs = {}
        for name, pid in self.pids.items():
            try:
                procs[name] = psutil.Process(pid)
            except psutil.Error:
                pass
        last = {n: p.cpu_times() for n, p in procs.items()}
        t_last = time.monotonic()
        t0 = t_last
        while not self.stop.wait(SAMPLE_S):
            now = time.monotonic()
            row: dict[str, Any] = {"t_s": round(now - t0, 1), "cpu": {}, "rss_mb": {}}
            for n, p in procs.items():
                try:
                    ct = p.cpu_times()
                    row["cpu"][n] = round((ct.user + ct.system - last[n].user - last[n].system) / (now - t_last), 2)
                    row["rss_mb"][n] = round(p.memory_info().rss / 2**20, 1)
                    last[n] = ct
                except psutil.Error:
                    continue
            t_last = now
            self.samples.append(row)


def per_minute(clickhouse_url: str, devices_prefix: str) -> list[dict[str, Any]]:
    """Per minute of device time: readings and device → inserted latency percentiles (ms)."""
    import clickhouse_connect

    ch = clickhouse_connect.get_client(dsn=clickhouse_url, send_receive_timeout=600)
    rows = ch.query(
        """
        SELECT toStartOfMinute(ts) AS m, count(),
               quantilesTDigest(0.5, 0.95, 0.99)(d), max(d)
        FROM (SELECT ts, (toUnixTimestamp64Micro(inserted) - toUnixTimestamp64Micro(ts)) / 1000.0 AS d
              FROM readings WHERE startsWith(device, {p:String}))
        GROUP BY m ORDER BY m
        """,
        parameters={"p": devices_prefix},
    ).result_rows
    ch.close()
    return [
        {"minute": str(m), "readings": int(n), "p50_ms": round(q[0], 2), "p95_ms": round(q[1], 2),
         "p99_ms": round(q[2], 2), "max_ms": round(mx, 2)}
        for m, n, q, mx in rows
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    sh = [sys.executable, "-m", "sensorhub"]
    ref_before = reference(args.ref_seconds)
    with tempfile.TemporaryDirectory(prefix="sh-soak-") as d:
        run_dir = Path(d) / "stack"
        argv = [*sh]
        if args.config:
            argv += ["--config", args.config]
        up = subprocess.run([*argv, "stack", "up", "--dir", str(run_dir), "--json"],
                            capture_output=True, text=True, timeout=180)
        if up.returncode != 0:
            raise SystemExit(f"stack up failed: {up.stderr[-2000:]}")
        info = json.loads(up.stdout)
        if args.after_up:
            import clickhouse_connect

            ch = clickhouse_connect.get_client(dsn=info["clickhouse_url"])
            for stmt in args.after_up:
                ch.command(stmt)
            ch.close()
        sampler = Sampler({k: v for k, v in info["pids"].items() if v})
        try:
            sampler.start()
            t0 = time.monotonic()
            lt = subprocess.run(
                [sys.executable, "-m", "firmware_sim", "loadtest",
                 "--stack", info["dir"],
                 "--rate", str(args.rate), "--duration", str(args.seconds), "--devices", "200",
                 "--format", args.format, "--per-message", str(args.per_message), "--qos", "1",
                 "--drain-timeout", "300", "--full-limit", "0", "--json"],
                capture_output=True, text=True, timeout=args.seconds + 900,
            )
            wall = time.monotonic() - t0
            sampler.stop.set()
            lines = [ln for ln in lt.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                raise SystemExit(f"loadtest failed: {lt.stderr[-3000:]}")
            res: dict[str, Any] = json.loads(lines[-1])
            minutes = per_minute(info["clickhouse_url"], "dev")
        finally:
            sampler.stop.set()
            subprocess.run([*sh, "stack", "down", "--dir", str(run_dir)], capture_output=True, timeout=180)
    ref_after = reference(args.ref_seconds)
    full = [m for m in minutes if m["readings"] >= 0.9 * args.rate * 60]  # whole minutes of load
    goals = {
        "zero_loss": res.get("lost") == 0 and res.get("duplicated") == 0,
        "p50_under_20ms": (res.get("p50_ms") or 1e9) < 20,
        "p99_under_50ms": (res.get("p99_ms") or 1e9) < 50,
        "max_under_250ms": (res.get("max_ms") or 1e9) < 250,
        "every_minute_p99_under_50ms": bool(full) and all(m["p99_ms"] < 50 for m in full),
    }
    cpu = {n: round(statistics.fmean(s["cpu"].get(n, 0.0) for s in sampler.samples), 2)
           for n in (sampler.samples[0]["cpu"] if sampler.samples else {})}
    rss = {n: {"first": sampler.samples[0]["rss_mb"].get(n), "max": max(s["rss_mb"].get(n, 0) for s in sampler.samples),
               "last": sampler.samples[-1]["rss_mb"].get(n)}
           for n in (sampler.samples[0]["rss_mb"] if sampler.samples else {})}
    return {
        "label": args.label, "rate": args.rate, "per_message": args.per_message, "seconds": args.seconds,
        "format": args.format, "config": Path(args.config).read_text() if args.config else "",
        "after_up": list(args.after_up),
        "wall_s": round(wall, 1),
        "result": {k: res.get(k) for k in ("published", "stored", "lost", "duplicated", "mismatched",
                                           "achieved_rate", "p50_ms", "p95_ms", "p99_ms", "max_ms")},
        "goals": goals, "per_minute": minutes, "cpu_cores_mean": cpu, "rss_mb": rss,
        "timeline": sampler.samples, "reference_before": ref_before, "reference_after": ref_after,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=40_000)
    p.add_argument("--per-message", type=int, default=10)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--format", default="frame")
    p.add_argument("--config", default=None, help="sensorhub TOML for the stack (e.g. to compare a setting)")
    p.add_argument("--after-up", action="append", default=[], metavar="SQL",
                   help="a statement run once the stack is up (to compare a schema variant side by side)")
    p.add_argument("--ref-seconds", type=float, default=20.0)
    p.add_argument("--label", default=None)
    args = p.parse_args()
    args.label = args.label or f"{args.rate // 1000}k-x{args.per_message}"
    os.chdir(ROOT)
    out = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{args.label}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({"file": str(path.relative_to(ROOT)), **out["result"], "goals": out["goals"],
                      "ref_chdb_p99_before": out["reference_before"]["ref_chdb"].get("p99_ms")}))
    return 0 if out["goals"]["zero_loss"] else 1


if __name__ == "__main__":
    sys.exit(main())
