"""How fast the writer drains the backlog a ClickHouse outage leaves, against the live rate.

Each run is the fault scenario ``test_clickhouse_unreachable_then_replay`` (tests/fault): the
simulator at ``--rate`` readings/s for ``--seconds`` through a fresh ``sensorhub stack``; at a
fifth of the run the chdb-server is stopped (SIGSTOP), killed at 40 % of it, and restarted by the
supervisor; every reading must then be stored once. The scenario notes, from the rows:

- ``drain_rows_per_s``: rows inserted per second from the recovery (the server answering again)
  until the writer's lag is under 1 s, live readings included; the figure against the live rate;
- ``writer_resumed_s``: the recovery to the writer's first INSERT (its retry backoff);
- ``drain_from_resume_rows_per_s``: the same rate counted from that first INSERT;
- ``drain_seconds``: rows inserted in each second after it, and the oldest reading's age then.

Variants, alternating within each run: ``as shipped`` and ``wait-for-insert`` (the writer before
``writer.overlap_behind`` and the 1 s backoff cap: it waits for each INSERT even with a backlog,
and its retry backoff climbs to 10 s). Before each scenario a fixed reference is measured on the
box (the Python loop and chdb alone, as the soak's), with the load average. Writes
``benchmarks/results/drain-40k.json`` (``--out``). About 90 s a scenario.

    .venv/bin/python benchmarks/drain.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from kit.results import write_results  # noqa: E402
from soak import git_commit, reference  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "drain-40k.json"
VARIANTS: dict[str, dict[str, str]] = {
    "as shipped": {},
    "wait-for-insert": {"SENSORHUB_WRITER_OVERLAP_BEHIND": "false",
                        "SENSORHUB_WRITER_BACKOFF": '{"initial_s": 0.2, "max_s": 10}'},
}


def _scenario(variant: str, a: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sensorhub-drain-") as d:
        env = {**os.environ, **VARIANTS[variant], "SENSORHUB_FAULT_RATE": str(a.rate),
               "SENSORHUB_FAULT_SECONDS": str(a.seconds), "SENSORHUB_FAULT_RESULTS": d}
        t0 = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/fault/test_faults.py", "-q", "-p", "no:cacheprovider",
             "-k", "clickhouse_unreachable_then_replay"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.seconds + 600,
        )
        result_file = Path(d) / "clickhouse_outage.json"
        r: dict[str, Any] = json.loads(result_file.read_text()) if result_file.exists() else {}
    return {
        "passed": p.returncode == 0,
        "seconds": round(time.monotonic() - t0, 1),
        **({} if p.returncode == 0 else {"pytest_tail": p.stdout[-3000:]}),
        **{k: r.get(k) for k in ("published", "stored", "lost", "duplicated")},
        "notes": r.get("notes", {}),
    }


def _median(rs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r["notes"][key] for r in rs if r["notes"].get(key) is not None]
    return round(statistics.median(vals), 2) if vals else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--rate", type=int, default=40_000)
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--ref-seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    results = []
    commit = git_commit()
    for i in range(a.runs):
        for variant in variants:
            ref = reference(a.ref_seconds)
            r = {"variant": variant, "run": i + 1, "reference": ref, **_scenario(variant, a)}
            n = r["notes"]
            print(json.dumps({k: r[k] for k in ("variant", "run", "passed", "lost", "duplicated")}
                             | {k: n.get(k) for k in ("drain_rows_per_s", "writer_resumed_s",
                                                      "drain_from_resume_rows_per_s")}), flush=True)
            results.append(r)
    summary = {}
    for variant in variants:
        rs = [r for r in results if r["variant"] == variant]
        drain = _median(rs, "drain_rows_per_s")
        from_resume = _median(rs, "drain_from_resume_rows_per_s")
        summary[variant] = {
            "runs": len(rs),
            "passed": sum(1 for r in rs if r["passed"]),
            "lost": sum(r["lost"] or 0 for r in rs),
            "duplicated": sum(r["duplicated"] or 0 for r in rs),
            "median_drain_rows_per_s": drain,
            "median_drain_x_live": round(drain / a.rate, 2) if drain else None,
            "median_writer_resumed_s": _median(rs, "writer_resumed_s"),
            "max_writer_resumed_s": max((r["notes"].get("writer_resumed_s") or 0 for r in rs), default=None),
            "median_drain_from_resume_x_live": round(from_resume / a.rate, 2) if from_resume else None,
            "median_backlog_entries": _median(rs, "backlog_entries_at_recovery"),
            "median_ref_python_s": round(statistics.median(r["reference"]["ref_python_s"] for r in rs), 3),
        }
    write_results(a.out, "drain", results, commit=commit, summary=summary,
                  settings={"rate": a.rate, "seconds": a.seconds, "ref_seconds": a.ref_seconds})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
