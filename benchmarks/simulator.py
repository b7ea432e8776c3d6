"""How fast firmware_sim publishes, and what each message costs in CPU.

Starts a private mosquitto (the project's configuration) on a free loopback
port and runs ``python -m firmware_sim run`` in a child process per case:

- maximum rate (target far above what can be reached) for per-device
  connections and a pool of 4, QoS 0 and 1, 1 and 10 readings per message;
- the best single-process case again with ``--procs 2`` (overall);
- a fixed operating point (40k readings/s as 4k messages of 10, and 20k
  single-reading messages/s) to measure CPU per message when not saturated,
  and how far the achieved rate lands from the target;
- the rate held: 5,000 readings/s from 200 devices for 10 s, in process, with
  the error of the whole run and of each full second against the target
  (the publisher tests only check that the rate is a ceiling).

Each case reports published messages/s and readings/s, the simulator's CPU
seconds per 1k messages (publishing phase, connects excluded) and the broker's
CPU seconds per 1k messages. No subscriber is attached: this measures the
publisher and the broker's accept path, not delivery. Results go to
``benchmarks/results/simulator.json``. Bounded: about a minute in all.

Usage: ``.venv/bin/python benchmarks/simulator.py [--seconds 3]``
"""

from __future__ import annotations

import argparse
import json
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
from kit.services import start_mosquitto  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "simulator.json"


def run_case(broker: Any, name: str, seconds: float, extra: list[str]) -> dict[str, Any]:
    broker_proc = psutil.Process(broker.pid)
    b0 = sum(broker_proc.cpu_times()[:2])
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            sys.executable, "-m", "firmware_sim", "run",
            "--mqtt", f"{broker.host}:{broker.port}",
            "--duration", str(seconds), "--truth", f"{tmp}/t.truth", "--json",
            "--client-prefix", f"bench{time.monotonic_ns()}", "--ack-timeout", "10",
            *extra,
        ]
        t0 = time.monotonic()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90, cwd=ROOT)
        wall = time.monotonic() - t0
    b1 = sum(broker_proc.cpu_times()[:2])
    if out.returncode != 0:
        return {"case": name, "error": out.stderr.strip()[-500:]}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    msgs = r["published_messages"]
    target = float(extra[extra.index("--rate") + 1]) if "--rate" in extra else None
    res = {
        "case": name,
        "args": " ".join(extra),
        "messages_per_s": round(msgs / r["elapsed_s"]),
        "readings_per_s": round(r["achieved_rate"]),
        "sim_cpu_s_per_1k_messages": round(r["cpu_s"] / msgs * 1000, 4) if msgs else None,
        "sim_cpu_cores": round(r["cpu_s"] / r["elapsed_s"], 2),
        "broker_cpu_s_per_1k_messages": round((b1 - b0) / msgs * 1000, 4) if msgs else None,
        "unacked": r["unacked_messages"],
        "wall_s": round(wall, 1),
    }
    if target is not None and target < 1_000_000:  # an operating point, not a maximum-rate case
        res["target_readings_per_s"] = target
        res["rate_error_pct"] = round((r["achieved_rate"] - target) / target * 100, 2)
    print(json.dumps(res), flush=True)
    return res


def rate_held(broker: Any, rate: int = 5000, seconds: float = 10.0) -> dict[str, Any]:
    """The simulator in process, so that its per-second counts are at hand."""
    import asyncio

    from firmware_sim.sim import SimConfig, Simulator

    cfg = SimConfig(host=broker.host, port=broker.port, devices=200, rate=rate, duration_s=seconds,
                    truth_path=None, client_prefix=f"benchrate{time.monotonic_ns()}", device_prefix="rate")
    st = asyncio.run(Simulator(cfg).run())
    target = rate * seconds
    full = st.per_second[1:int(seconds)]  # the first second is cut by the start
    res = {
        "case": f"rate held {rate} readings/s, 200 devices, {seconds:g} s",
        "target_readings": target,
        "published": st.published,
        "rate_error_pct": round((st.published - target) / target * 100, 2),
        "per_second": st.per_second,
        "per_second_error_pct_max": round(max((abs(c - rate) / rate * 100 for c in full), default=0.0), 2),
        "unacked": st.unacked_messages,
    }
    print(json.dumps(res), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="publishing time per case")
    args = ap.parse_args()
    s = args.seconds
    tmp = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    broker = start_mosquitto(tmp)
    results: list[dict[str, Any]] = []
    try:
        common = ["--devices", "200", "--rate", "2000000", "--format", "frame"]
        for mode in ("per-device", "pooled"):
            for qos in (0, 1):
                for n in (1, 10):
                    results.append(run_case(
                        broker, f"max {mode} qos{qos} x{n}", s,
                        [*common, "--mode", mode, "--qos", str(qos), "--per-message", str(n)],
                    ))
        ok = [r for r in results if "error" not in r and "qos1" in r["case"] and "x1" in r["case"]]
        best = max(ok, key=lambda r: r["messages_per_s"]) if ok else None
        if best is not None:
            results.append(run_case(broker, f"overall 2 procs: {best['case']}", s,
                                    [*best["args"].split(), "--procs", "2"]))
        for mode in ("per-device", "pooled"):
            results.append(run_case(broker, f"operating point 40k readings/s, x10, qos1, {mode}", s,
                                    ["--devices", "200", "--rate", "40000", "--per-message", "10", "--qos", "1",
                                     "--mode", mode]))
            results.append(run_case(broker, f"operating point 20k messages/s, x1, qos1, {mode}", s,
                                    ["--devices", "200", "--rate", "20000", "--per-message", "1", "--qos", "1",
                                     "--mode", mode]))
        results.append(run_case(broker, "operating point 20k messages/s, x1, qos1, mixed formats, pooled", s,
                                ["--devices", "200", "--rate", "20000", "--per-message", "1", "--qos", "1",
                                 "--format", "mixed"]))
        results.append(rate_held(broker))
    finally:
        broker.terminate()
    write_results(OUT, "simulator", results, seconds_per_case=s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
