"""Sustained latency: the whole stack at a fixed load for minutes, with a reference measured on the same box.

Short runs flatter the pipeline: merges, compaction and GC show up after
minutes. Each run here starts a fresh ``sensorhub stack``, drives it with
``sensorhub-sim loadtest`` (200 devices, QoS 1) for ``--seconds``, then
reads from ClickHouse, per minute and per 10 s of device time, the count and
the percentiles of device time → row inserted. Every 10 s it samples CPU and
RSS of every process (the simulator's too), Redis memory, the active parts of
``readings``, the merges in progress and the bytes on disk. With
``--profile-s`` it records the writer and the chdb-server with py-spy for that
long in the middle of the run and keeps each one's top functions. It draws
the run (latency, RSS and parts over time, merges marked) into a PNG beside
the JSON when matplotlib is there (``make soak`` installs it and py-spy).
Before the stack starts, and again after it stops, it
measures a fixed reference on the same box, so figures from different
machines and moments can be compared:

- ``ref_python_s``: a fixed pure-Python loop (the interpreter's speed);
- ``ref_chdb``: chdb alone in one process, 1,000-row inserts 40 times a
  second for ``--ref-seconds`` (insert p50/p99 ms): the engine's speed.

Writes ``benchmarks/results/soak-<label>.json`` (and ``.png``). The goals it
checks (for the 40k readings/s case): zero loss, p50 < 20 ms, p99 < 50 ms,
max < 250 ms, every minute's p99 < 50 ms. Bounded: the load stops after
``--seconds`` and the drain wait is capped.

    python benchmarks/soak.py --rate 40000 --per-message 10 --seconds 600 --label 40k
    python benchmarks/soak.py --rate 120000 --per-message 10 --seconds 600 --label 120k
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
SAMPLE_S = 10.0

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
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _REF_CHDB, str(ref_seconds)], capture_output=True, text=True,
                         timeout=ref_seconds + 120)
    wall = time.monotonic() - w0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    chdb_ref = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}
    # the engine's CPU for those inserts (start-up included), in cores over the reference's wall time
    chdb_ref["cpu_cores"] = round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall, 2)
    return {"ref_python_s": round(py, 3), "ref_chdb": chdb_ref, "loadavg": os.getloadavg()}


_STORE_SQL = """
SELECT
  (SELECT count() FROM system.parts WHERE active AND database = currentDatabase() AND table = 'readings'),
  (SELECT count() FROM system.parts WHERE active AND database = currentDatabase()),
  (SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND database = currentDatabase()),
  (SELECT count() FROM system.merges WHERE database = currentDatabase()),
  (SELECT max(total_size_bytes_compressed) FROM system.merges WHERE database = currentDatabase())
"""


class Sampler(threading.Thread):
    """Every SAMPLE_S seconds: CPU (cores) and RSS (MB) per process, Redis memory, parts, merges, bytes on disk."""

    def __init__(self, pids: dict[str, int], redis_url: str, clickhouse_url: str) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.pids = dict(pids)
        self.redis_url, self.clickhouse_url = redis_url, clickhouse_url
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self._procs: dict[str, psutil.Process] = {}
        self._last: dict[str, Any] = {}

    def add(self, name: str, pid: int) -> None:
        """Sample one more process from now on (the simulator, once it started)."""
        try:
            p = psutil.Process(pid)
            self._last[name] = p.cpu_times()
            self._procs[name] = p
        except psutil.Error:
            pass

    def _store(self, ch: Any, r: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            out["redis_used_mb"] = round(int(r.info("memory")["used_memory"]) / 2**20, 1)
        except Exception as exc:  # a sample is best effort; the run goes on
            out["redis_error"] = str(exc)[:200]
        try:
            parts, all_parts, disk, merges, largest = ch.query(_STORE_SQL).result_rows[0]
            out.update(readings_parts=int(parts), parts=int(all_parts), disk_mb=round(int(disk or 0) / 2**20, 1),
                       merges=int(merges), largest_merge_mb=round(int(largest or 0) / 2**20, 1))
        except Exception as exc:
            out["clickhouse_error"] = str(exc)[:200]
        return out

    def run(self) -> None:
        import clickhouse_connect
        import redis

        for name, pid in self.pids.items():
            self.add(name, pid)
        ch = clickhouse_connect.get_client(dsn=self.clickhouse_url, send_receive_timeout=30)
        r = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        t_last = time.monotonic()
        t0 = t_last
        try:
            while not self.stop.wait(SAMPLE_S):
                now = time.monotonic()
                row: dict[str, Any] = {"t_s": round(now - t0, 1), "cpu": {}, "rss_mb": {}}
                for n, p in list(self._procs.items()):
                    try:
                        ct = p.cpu_times()
                        last = self._last[n]
                        row["cpu"][n] = round((ct.user + ct.system - last.user - last.system) / (now - t_last), 2)
                        row["rss_mb"][n] = round(p.memory_info().rss / 2**20, 1)
                        self._last[n] = ct
                    except psutil.Error:
                        continue
                t_last = now
                row.update(self._store(ch, r))
                self.samples.append(row)
        finally:
            ch.close()
            r.close()


def profile(pids: dict[str, int], seconds: float, out_dir: Path, label: str) -> dict[str, Any]:
    """py-spy on each process for ``seconds`` at once: the 15 functions most often on top of a stack."""
    import shutil

    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy is not installed (make soak installs it)"}
    procs = {}
    for name, pid in pids.items():
        raw = out_dir / f"soak-{label}-{name}.folded"
        procs[name] = (raw, subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50",
             "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))
    out: dict[str, Any] = {}
    for name, (raw, proc) in procs.items():
        try:
            _, err = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            err = "py-spy did not finish"
        if not raw.exists():
            out[name] = {"error": (err or "")[-500:]}
            continue
        top: dict[str, int] = {}
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            total += int(n)
            leaf = stack.rsplit(";", 1)[-1]
            top[leaf] = top.get(leaf, 0) + int(n)
        raw.unlink()
        out[name] = {"samples": total, "top_self": [
            {"function": f, "share": round(n / total, 3)} for f, n in sorted(top.items(), key=lambda kv: -kv[1])[:15]
        ]}
    return out


def per_interval(clickhouse_url: str, devices_prefix: str, seconds: int) -> list[dict[str, Any]]:
    """Per ``seconds`` of device time: readings and device → inserted latency percentiles (ms)."""
    import clickhouse_connect

    ch = clickhouse_connect.get_client(dsn=clickhouse_url, send_receive_timeout=600)
    rows = ch.query(
        f"""
        SELECT toStartOfInterval(ts, INTERVAL {int(seconds)} SECOND) AS m, count(),
               quantilesTDigest(0.5, 0.95, 0.99)(d), max(d)
        FROM (SELECT ts, (toUnixTimestamp64Micro(inserted) - toUnixTimestamp64Micro(ts)) / 1000.0 AS d
              FROM readings WHERE startsWith(device, {{p:String}}))
        GROUP BY m ORDER BY m
        """,
        parameters={"p": devices_prefix},
    ).result_rows
    ch.close()
    key = "minute" if seconds == 60 else "start"
    return [
        {key: str(m), "readings": int(n), "p50_ms": round(q[0], 2), "p95_ms": round(q[1], 2),
         "p99_ms": round(q[2], 2), "max_ms": round(mx, 2)}
        for m, n, q, mx in rows
    ]


def plot(out: dict[str, Any], png: Path) -> str | None:
    """Latency per 10 s, RSS per process and active parts over the run, merges marked; None if drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (make soak installs it)"
    from datetime import datetime

    iv = out["per_10s"]
    if not iv:
        return "no rows"
    t0 = datetime.fromisoformat(iv[0]["start"])
    xs = [(datetime.fromisoformat(r["start"]) - t0).total_seconds() for r in iv]
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for k, style in (("p50_ms", "-"), ("p99_ms", "-"), ("max_ms", ":")):
        a1.plot(xs, [r[k] for r in iv], style, label=k.replace("_ms", ""))
    a1.axhline(50, color="grey", lw=0.8, ls="--")
    a1.set_yscale("log")
    a1.set_ylabel("device time → row, ms")
    a1.legend(loc="upper left")
    tl = out["timeline"]
    # the sampler's clock starts with the load, like the readings' device time (within a second or two)
    ts = [s["t_s"] for s in tl]
    for name in (tl[0]["rss_mb"] if tl else {}):
        a2.plot(ts, [s["rss_mb"].get(name) for s in tl], label=name)
    a2.set_ylabel("RSS, MB")
    a2.legend(loc="upper left", fontsize=8)
    a3.plot(ts, [s.get("readings_parts") for s in tl], label="active parts of readings")
    a3.plot(ts, [s.get("redis_used_mb") for s in tl], label="Redis used, MB")
    a3.set_ylabel("count / MB")
    a3.set_xlabel("seconds into the run")
    a3.legend(loc="upper left", fontsize=8)
    for s in tl:
        if s.get("merges"):
            for a in (a1, a2, a3):
                a.axvspan(s["t_s"] - SAMPLE_S, s["t_s"], color="orange", alpha=0.12, lw=0)
    r = out["result"]
    fig.suptitle(f"{out['label']}: {out['rate']} readings/s x{out['per_message']}, {out['seconds']:.0f} s; "
                 f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms; "
                 f"Python ref {out['reference_before']['ref_python_s']} s (orange: merges running)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return None


def git_commit() -> str:
    """This checkout's short HEAD, with ``-dirty`` when tracked files differ from it; "" without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("-dirty" if dirty else "")


def run(args: argparse.Namespace) -> dict[str, Any]:
    sh = [sys.executable, "-m", "sensorhub"]
    commit = git_commit()  # what runs: the checkout as the stack starts
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
        pids = {k: v for k, v in info["pids"].items() if v}
        sampler = Sampler(pids, info["redis_url"], info["clickhouse_url"])
        spied: dict[str, Any] = {}
        try:
            sampler.start()
            t0 = time.monotonic()
            lt = subprocess.Popen(
                [sys.executable, "-m", "firmware_sim", "loadtest",
                 "--stack", info["dir"],
                 "--rate", str(args.rate), "--duration", str(args.seconds), "--devices", "200",
                 "--format", args.format, "--per-message", str(args.per_message), "--qos", "1",
                 "--drain-timeout", "300", "--full-limit", "0", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            sampler.add("simulator", lt.pid)
            if args.profile_s:
                # in the middle of the run, once merges have had time to start
                time.sleep(max(0.0, args.seconds / 2 - args.profile_s / 2))
                spied = profile({k: pids[k] for k in ("writer", "chdb-server") if k in pids},
                                args.profile_s, RESULTS, args.label)
            try:
                stdout, stderr = lt.communicate(timeout=args.seconds + 900)
            except subprocess.TimeoutExpired:
                lt.kill()
                stdout, stderr = lt.communicate()
            wall = time.monotonic() - t0
            sampler.stop.set()
            lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
            if not lines:
                raise SystemExit(f"loadtest failed: {stderr[-3000:]}")
            res: dict[str, Any] = json.loads(lines[-1])
            minutes = per_interval(info["clickhouse_url"], "dev", 60)
            tens = per_interval(info["clickhouse_url"], "dev", 10)
        finally:
            sampler.stop.set()
            subprocess.run([*sh, "stack", "down", "--dir", str(run_dir)], capture_output=True, timeout=180)
    ref_after = reference(args.ref_seconds)
    # every minute of device time but the first and the last, which the load only partly covers;
    # not by their count of readings: a minute that stalled holds fewer and must count
    full = minutes[1:-1]
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
        "label": args.label, "commit": commit, "rate": args.rate, "per_message": args.per_message, "seconds": args.seconds,
        "format": args.format, "config": Path(args.config).read_text() if args.config else "",
        "after_up": list(args.after_up),
        "wall_s": round(wall, 1),
        "result": {k: res.get(k) for k in ("published", "stored", "lost", "duplicated", "mismatched",
                                           "achieved_rate", "p50_ms", "p95_ms", "p99_ms", "max_ms")},
        "goals": goals, "per_minute": minutes, "per_10s": tens, "cpu_cores_mean": cpu, "rss_mb": rss,
        "timeline": sampler.samples, "profile": spied,
        "reference_before": ref_before, "reference_after": ref_after,
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
    p.add_argument("--profile-s", type=float, default=0.0,
                   help="record the writer and the chdb-server with py-spy for this long, mid-run")
    args = p.parse_args()
    args.label = args.label or f"{args.rate // 1000}k-x{args.per_message}"
    os.chdir(ROOT)
    out = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{args.label}.json"
    path.write_text(json.dumps(out, indent=1))
    why = plot(out, path.with_suffix(".png"))
    if why:
        print(f"no plot: {why}", file=sys.stderr)
    print(json.dumps({"file": str(path.relative_to(ROOT)), **out["result"], "goals": out["goals"],
                      "ref_chdb_p99_before": out["reference_before"]["ref_chdb"].get("p99_ms")}))
    return 0 if out["goals"]["zero_loss"] else 1


if __name__ == "__main__":
    sys.exit(main())
