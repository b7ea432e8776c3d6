"""Sparkplug host throughput: DDATA by alias through ``SparkplugHost.on_message``, Cython and twin.

One edge node with one device is born (NBIRTH, DBIRTH with 10 Double metrics
and aliases); then 256 DDATA messages of 10 alias-only metrics, in seq order
(wrapping), are fed round-robin for a few short rounds; the best round counts.
The process pins itself to one CPU. Writes ``benchmarks/results/sparkplug_host.json``.

    .venv/bin/python benchmarks/sparkplug_host.py [--seconds 0.2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kit.encoders import sparkplug_metric, sparkplug_payload  # noqa: E402

from sensorhub.decoders.sparkplug_host import SparkplugHost  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sparkplug_host.json"
METRICS = 10


def payload(seq: int, birth: bool) -> bytes:
    """A Payload of METRICS Double metrics; names and datatypes only in a birth."""
    metrics = [
        sparkplug_metric(
            f"metric_{i}".encode() if birth else None,
            i + 1,
            10 if birth else 0,
            b"\x69" + struct.pack("<d", i * 1.5 + seq),
        )
        for i in range(METRICS)
    ]
    return sparkplug_payload(1_764_072_000_000 + seq, metrics, seq % 256)


def run(impl: str, rounds: int, seconds: float) -> dict[str, Any]:
    if impl == "cython":
        dec = importlib.import_module("sensorhub._ext.sparkplug")
        bmod = importlib.import_module("sensorhub._ext.batch")
    else:
        dec = importlib.import_module("sensorhub.decoders.sparkplug_py")
        bmod = importlib.import_module("sensorhub.decoders.batch_py")
    host = SparkplugHost("bench", dec.Decoder())
    batch = bmod.ReadingBatch(70_000)
    host.on_message("spBv1.0/g/NBIRTH/e", payload(0, True), 1, batch)
    host.on_message("spBv1.0/g/DBIRTH/e/d", payload(1, True), 1, batch)
    msgs = [("spBv1.0/g/DDATA/e/d", payload(s, False)) for s in range(2, 258)]  # wraps to seq 1
    best = 0.0
    for _ in range(rounds):
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for topic, p in msgs:
                host.on_message(topic, p, 1, batch)
            n += len(msgs)
            if len(batch) > 65_536:
                batch.clear()
        best = max(best, n / (time.perf_counter() - t0))
    if host.seq_gaps or host.rebirths_requested:
        raise AssertionError(f"the benchmark's own messages were out of order: {host.counters()}")
    return {"impl": impl, "messages_per_s": best, "readings_per_s": best * METRICS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.2, help="length of one round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    try:
        cpu = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        cpu = None
    results = []
    for impl in ("cython", "python"):
        try:
            r = run(impl, args.rounds, args.seconds)
        except ImportError as exc:
            print(f"{impl}: skipped: {exc}")
            continue
        results.append(r)
        print(
            f"{impl:7} {r['messages_per_s']:12,.0f} messages/s {r['readings_per_s']:14,.0f} readings/s"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "sparkplug_host",
        "case": f"DDATA x{METRICS} by alias",
        "cpu": cpu,
        "results": results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
