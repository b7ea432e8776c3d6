"""How fast the service layer recovers and stops: the timing behind the service tests.

The tests only check that these things happen (a killed child is restarted,
a stubborn one is killed after its stop bound, a drain ends at its bound),
bounding time as liveness. This measures how long they take, on this box:

- ``supervisor_restart``: a notify child (imports sensorhub, sends READY=1)
  is killed with SIGKILL, repeatedly; kill to READY of the next run, and the
  supervisor's own ``last_recovery_s`` (exit to READY), with RestartSec 0.5 s.
  ARCHITECTURE.md: a restarted process is back within 5 s.
- ``supervisor_stop``: stopping a child that ignores SIGTERM, stop bound
  0.5 s; the time ``stop()`` takes and its overshoot past the bound.
- ``drain``: :func:`drain` with 50 ms steps and :func:`drain_async` with a
  step that never ends, both bounded at 0.3 s; overshoot past the bound.
- ``ingest_restart``: a whole ``sensorhub stack`` while the simulator
  publishes (4,000 readings/s, QoS 1); the ingest is killed with SIGKILL,
  repeatedly; kill to the stack being READY again with a new ingest PID,
  and whether the run still ended with every reading stored exactly once.

Writes ``benchmarks/results/service.json``; never asserts. Bounded: about a
minute with the defaults.

Usage: ``.venv/bin/python benchmarks/service.py [--rounds 10] [--stack-rounds 3] [--no-stack]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sensorhub.service.lifecycle import drain, drain_async
from sensorhub.service.supervisor import ChildSpec, Supervisor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kit.results import write_results  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "service.json"
RESTART_SEC = 0.5
STOP_BOUND_S = 0.5
DRAIN_BOUND_S = 0.3

# A service child as small as a real one can be: import sensorhub's service layer, say READY, tick.
_CHILD = (
    "import signal, sys, time\n"
    "from sensorhub.service import notify\n"
    "if '--ignore-term' in sys.argv: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "notify.ready('bench child')\n"
    "wd = notify.Watchdog()\n"
    "end = time.monotonic() + 300\n"
    "while time.monotonic() < end:\n"
    "    wd.tick()\n"
    "    time.sleep(0.01)\n"
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _spec(name: str, *args: str, **kw: Any) -> ChildSpec:
    return ChildSpec(name, (sys.executable, "-c", _CHILD, *args), env=_env(), cwd=str(ROOT), **kw)


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(values),
        "min_s": round(ordered[0], 4),
        "p50_s": round(statistics.median(ordered), 4),
        "max_s": round(ordered[-1], 4),
        "values_s": [round(v, 4) for v in values],
    }


def supervisor_restart(rounds: int) -> dict[str, Any]:
    kill_to_ready: list[float] = []
    recovery: list[float] = []
    with Supervisor([_spec("child", watchdog_sec=2.0, restart_sec=RESTART_SEC)]) as sup:
        if not sup.wait_ready(timeout_s=60):
            return {"error": "the child never became READY"}
        for i in range(rounds):
            pid = sup.state("child").pid
            if pid is None:
                return {"error": f"no child PID in round {i}"}
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            if not sup.wait_ready("child", timeout_s=60, min_starts=i + 2):
                return {"error": f"not READY again within 60 s in round {i}"}
            kill_to_ready.append(time.monotonic() - t0)
            st = sup.state("child")
            if st.last_recovery_s is not None:
                recovery.append(st.last_recovery_s)
    return {
        "restart_sec": RESTART_SEC,
        "kill_to_ready": _summary(kill_to_ready),
        "exit_to_ready": _summary(recovery),
        "architecture_bound_s": 5.0,
        "within_bound": all(v < 5.0 for v in kill_to_ready),
    }


def supervisor_stop(rounds: int) -> dict[str, Any]:
    took: list[float] = []
    for _ in range(rounds):
        sup = Supervisor([_spec("stubborn", "--ignore-term", stop_timeout_s=STOP_BOUND_S)])
        sup.start()
        try:
            if not sup.wait_ready(timeout_s=60):
                return {"error": "the child never became READY"}
        finally:
            t0 = time.monotonic()
            sup.stop()
            took.append(time.monotonic() - t0)
    return {
        "stop_bound_s": STOP_BOUND_S,
        "stop": _summary(took),
        "overshoot": _summary([t - STOP_BOUND_S for t in took]),
    }


def drain_timing(rounds: int) -> dict[str, Any]:
    def step(remaining: float) -> bool:
        time.sleep(min(0.05, remaining))
        return False

    async def stuck(remaining: float) -> bool:
        await asyncio.sleep(30)
        return True

    sync_took: list[float] = []
    async_took: list[float] = []
    for _ in range(rounds):
        t0 = time.monotonic()
        drain(step, timeout_s=DRAIN_BOUND_S)
        sync_took.append(time.monotonic() - t0)
        t0 = time.monotonic()
        asyncio.run(drain_async(stuck, timeout_s=DRAIN_BOUND_S))
        async_took.append(time.monotonic() - t0)
    return {
        "bound_s": DRAIN_BOUND_S,
        "drain_overshoot": _summary([t - DRAIN_BOUND_S for t in sync_took]),
        "drain_async_overshoot": _summary([t - DRAIN_BOUND_S for t in async_took]),
    }


def ingest_restart(rounds: int, rate: int) -> dict[str, Any]:
    from sensorhub.service.stack import stack_status

    sh = [sys.executable, "-m", "sensorhub"]
    gap_s = 3.0  # between kills, so each restart is measured on its own
    seconds = 4 + rounds * (gap_s + 2)
    with tempfile.TemporaryDirectory(prefix="sh-bench-svc-") as d:
        run_dir = Path(d) / "stack"
        up = subprocess.run([*sh, "stack", "up", "--dir", str(run_dir), "--json", "--timeout", "120"],
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
        if up.returncode != 0:
            return {"error": f"stack up failed: {up.stderr[-2000:]}"}
        info = json.loads(up.stdout)
        result: dict[str, Any] = {}

        def load() -> None:
            lt = subprocess.run(
                [sys.executable, "-m", "firmware_sim", "loadtest",
                 "--stack", info["dir"],
                 "--rate", str(rate), "--duration", str(seconds), "--per-message", "5", "--qos", "1", "--json"],
                capture_output=True, text=True, timeout=seconds + 300, cwd=ROOT,
            )
            lines = [ln for ln in lt.stdout.splitlines() if ln.startswith("{")]
            result.update(json.loads(lines[-1]) if lines else {"error": lt.stderr[-2000:]})

        kill_to_ready: list[float] = []
        try:
            loader = threading.Thread(target=load, name="bench-loadtest", daemon=True)
            loader.start()
            time.sleep(4)
            for i in range(rounds):
                old = int(stack_status(run_dir)["pids"]["ingest"])
                os.kill(old, signal.SIGKILL)
                t0 = time.monotonic()
                deadline = t0 + 60
                back = None
                while time.monotonic() < deadline:
                    st = stack_status(run_dir)
                    pid = st["pids"].get("ingest")
                    if pid and pid != old and st.get("ready"):
                        back = time.monotonic() - t0
                        break
                    time.sleep(0.02)
                if back is None:
                    return {"error": f"ingest not READY again within 60 s in round {i}"}
                kill_to_ready.append(back)
                time.sleep(gap_s)
            loader.join(seconds + 320)
        finally:
            subprocess.run([*sh, "stack", "down", "--dir", str(run_dir)], capture_output=True, timeout=120)
    return {
        "rate": rate,
        "restart_sec": RESTART_SEC,
        "kill_to_ready": _summary(kill_to_ready),
        "architecture_bound_s": 5.0,
        "within_bound": all(v < 5.0 for v in kill_to_ready),
        "loadtest": {k: result.get(k) for k in ("published", "stored", "lost", "duplicated", "mismatched", "error")},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="kills / stops / drains per in-process case")
    ap.add_argument("--stack-rounds", type=int, default=3, help="ingest kills in the stack case")
    ap.add_argument("--rate", type=int, default=4000, help="simulator readings/s during the stack case")
    ap.add_argument("--no-stack", action="store_true", help="skip the stack case")
    args = ap.parse_args()
    os.chdir(ROOT)
    results: dict[str, Any] = {
        "supervisor_restart": supervisor_restart(args.rounds),
        "supervisor_stop": supervisor_stop(max(1, args.rounds // 2)),
        "drain": drain_timing(args.rounds),
    }
    for name, res in results.items():
        print(json.dumps({name: res}), flush=True)
    if not args.no_stack:
        results["ingest_restart"] = ingest_restart(args.stack_rounds, args.rate)
        print(json.dumps({"ingest_restart": results["ingest_restart"]}), flush=True)
    write_results(OUT, "service", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
