"""Decoder throughput: readings/s of every decoder, Cython and twin, on one core.

Run: ``.venv/bin/python benchmarks/decoders.py [--quick] [--only SUBSTRING]``.
Prints a table and writes ``benchmarks/results/decoders.json``.

Each :class:`Case` is a format, a list of realistic payloads and how many
readings each holds. A case is timed for each implementation (``cython``,
``python``) by decoding its payloads round-robin into one batch (cleared every
64k rows, as the ingest loop flushes it) for a few short rounds; the best
round counts, because on a shared machine the slow rounds measure the
neighbours. The process pins itself to one CPU. :data:`REFERENCES` time
third-party parsers alone on the same JSON payloads, as a floor to compare
with (they build Python objects and fill no batch).

To add a format or a payload shape: write a payload builder (a function of
a seeded ``random.Random`` returning the payloads) and append a ``Case`` to
:data:`CASES`; nothing else changes.
The runtime stays bounded: each case costs about ``rounds × round_s`` seconds
per implementation.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kit.encoders import frame, sparkplug_metric, sparkplug_payload  # noqa: E402

from sensorhub.decoders import FORMATS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "decoders.json"
RECV_NS = 1_764_072_009_000_000_000
DICTIONARY = {i: f"metric_{i:03d}" for i in range(64)}
N_PAYLOADS = 256  # distinct payloads per case, decoded round-robin


@dataclass
class Case:
    """One benchmark: payloads of one format with ``readings`` readings each."""

    name: str
    fmt: str  # a key of sensorhub.decoders.FORMATS
    build: Callable[[random.Random], list[bytes]]
    readings: int
    topic_device: str | None = "press-01"
    dictionary: dict[int, str] = field(default_factory=lambda: dict(DICTIONARY))


# ---------------------------------------------------------------- payload builders


def frames(n: int, float32: bool = False) -> Callable[[random.Random], list[bytes]]:
    """Firmware frames of ``n`` readings from one device, as a device sends them."""

    def build(rng: random.Random) -> list[bytes]:
        return [
            frame(
                "press-01",
                seq,
                1_764_072_000_000_000 + seq * 1000,
                [(i % 64, i * 100, 0, 20.0 + rng.random() * 5) for i in range(n)],
                float32=float32,
            )
            for seq in range(N_PAYLOADS)
        ]

    return build


def json_shape1(rng: random.Random) -> list[bytes]:
    """``{"metric", "value", "ts", "seq", "quality"}``: one reading per message."""
    # ts written with its six decimals, as firmware prints it
    return [
        (
            f'{{"metric": "metric_{seq % 8}", "value": {round(20 + rng.random() * 5, 3)}, '
            f'"ts": 1764072000.{seq:06d}, "seq": {seq}, "quality": 0}}'
        ).encode()
        for seq in range(N_PAYLOADS)
    ]


def json_shape2(n: int) -> Callable[[random.Random], list[bytes]]:
    """``{"ts", "seq", "values": {n metrics}}``: n readings at one time."""

    def build(rng: random.Random) -> list[bytes]:
        return [
            json.dumps(
                {
                    "ts": 1764072000.5 + seq,
                    "seq": seq,
                    "values": {f"metric_{i}": round(rng.uniform(-100, 100), 4) for i in range(n)},
                }
            ).encode()
            for seq in range(N_PAYLOADS)
        ]

    return build


def ilp_lines(n: int, lines: int = 1) -> Callable[[random.Random], list[bytes]]:
    """Influx line protocol: ``lines`` lines of ``n`` float fields, one tag, a ns timestamp."""

    def build(rng: random.Random) -> list[bytes]:
        out = []
        for k in range(N_PAYLOADS):
            text = []
            for line in range(lines):
                fields = ",".join(
                    f"metric_{i}={round(rng.uniform(-100, 100), 3)}" for i in range(n)
                )
                ts = 1_764_072_000_000_000_000 + (k * lines + line) * 1_000_000
                text.append(f"machine,line=l1 {fields} {ts}")
            out.append("\n".join(text).encode())
        return out

    return build


def sparkplug_ddata(n: int) -> Callable[[random.Random], list[bytes]]:
    """Sparkplug B DDATA of ``n`` named Double metrics (as a node without aliases sends it)."""

    def build(rng: random.Random) -> list[bytes]:
        return [
            sparkplug_payload(
                1_764_072_000_000 + seq,
                [
                    sparkplug_metric(f"metric_{i}".encode(), None, 0, b"\x69" + struct.pack("<d", rng.uniform(-100, 100)))
                    for i in range(n)
                ],
                seq % 256,
            )
            for seq in range(N_PAYLOADS)
        ]

    return build


CASES: list[Case] = [
    Case("frame f64 x1", "frame", frames(1), 1),
    Case("frame f64 x10", "frame", frames(10), 10),
    Case("frame f64 x100", "frame", frames(100), 100),
    Case("frame f32 x100", "frame", frames(100, float32=True), 100),
    Case("json shape1 x1", "json", json_shape1, 1),
    Case("json shape2 x10", "json", json_shape2(10), 10),
    Case("ilp x1", "ilp", ilp_lines(1), 1),
    Case("ilp x10", "ilp", ilp_lines(10), 10),
    Case("ilp 10 lines x10", "ilp", ilp_lines(10, lines=10), 100),
    Case(
        "sparkplug DDATA x10",
        "sparkplug",
        sparkplug_ddata(10),
        10,
        topic_device="plant1/press7/sensorA",
    ),
]


def _msgspec() -> Callable[[bytes], Any]:
    import msgspec

    return msgspec.json.Decoder().decode


def _orjson() -> Callable[[bytes], Any]:
    import orjson

    return orjson.loads


def _stdlib() -> Callable[[bytes], Any]:
    return json.loads


#: (name, parser factory, case names it runs on): parsers alone, no batch
REFERENCES: list[tuple[str, Callable[[], Callable[[bytes], Any]], tuple[str, ...]]] = [
    ("msgspec.json.decode", _msgspec, ("json shape1 x1", "json shape2 x10")),
    ("orjson.loads", _orjson, ("json shape1 x1", "json shape2 x10")),
    ("json.loads (stdlib)", _stdlib, ("json shape1 x1", "json shape2 x10")),
]


# ---------------------------------------------------------------- timing


def _pin_one_core() -> int | None:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        return cpus[-1]
    except (AttributeError, OSError):
        return None


def _best_rate(step: Callable[[], int], rounds: int, round_s: float) -> float:
    """Best payloads/s over ``rounds`` rounds of about ``round_s`` seconds each."""
    step()  # warm caches and the name tables
    best = 0.0
    for _ in range(rounds):
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + round_s
        while True:
            done += step()
            t = time.perf_counter()
            if t >= deadline:
                break
        best = max(best, done / (t - t0))
    return best


def time_decoder(
    case: Case, impl: str, payloads: list[bytes], rounds: int, round_s: float
) -> dict[str, Any]:
    stem = FORMATS[case.fmt]
    if impl == "cython":
        mod = importlib.import_module(f"sensorhub._ext.{stem}")
        batch_mod = importlib.import_module("sensorhub._ext.batch")
    else:
        mod = importlib.import_module(f"sensorhub.decoders.{stem}_py")
        batch_mod = importlib.import_module("sensorhub.decoders.batch_py")
    decoder = mod.Decoder(case.dictionary)
    batch = batch_mod.ReadingBatch(70_000)
    decode = decoder.decode
    topic = case.topic_device
    for p in payloads:  # every payload must decode, or the numbers mean nothing
        decode(topic, p, RECV_NS, batch)
    batch.clear()

    def step() -> int:
        for p in payloads:
            decode(topic, p, RECV_NS, batch)
        if len(batch) > 65_536:
            batch.clear()
        return len(payloads)

    rate = _best_rate(step, rounds, round_s)
    return {"payloads_per_s": rate, "readings_per_s": rate * case.readings}


def time_reference(
    parse: Callable[[bytes], Any], payloads: list[bytes], rounds: int, round_s: float
) -> float:
    def step() -> int:
        for p in payloads:
            parse(p)
        return len(payloads)

    return _best_rate(step, rounds, round_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter rounds (a smoke run)")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = ap.parse_args(argv)
    rounds, round_s = (2, 0.05) if args.quick else (5, 0.2)
    cpu = _pin_one_core()
    rng = random.Random(1)
    results: list[dict[str, Any]] = []
    built: dict[str, list[bytes]] = {}
    t_start = time.perf_counter()
    print(f"{'case':24} {'impl':22} {'payloads/s':>14} {'readings/s':>14}")
    for case in CASES:
        if args.only not in case.name:
            continue
        payloads = built[case.name] = case.build(rng)
        for impl in ("cython", "python"):
            try:
                r = time_decoder(case, impl, payloads, rounds, round_s)
            except ImportError as exc:  # a decoder not built or not written yet
                print(f"{case.name:24} {impl:22} skipped: {exc}")
                continue
            results.append(
                {
                    "case": case.name,
                    "format": case.fmt,
                    "impl": impl,
                    "readings_per_payload": case.readings,
                    **r,
                }
            )
            print(
                f"{case.name:24} {impl:22} {r['payloads_per_s']:14,.0f} {r['readings_per_s']:14,.0f}"
            )
    for ref_name, factory, case_names in REFERENCES:
        parse = factory()
        for case in CASES:
            if case.name not in case_names or case.name not in built:
                continue
            rate = time_reference(parse, built[case.name], rounds, round_s)
            results.append(
                {
                    "case": case.name,
                    "format": case.fmt,
                    "impl": f"reference {ref_name}",
                    "readings_per_payload": case.readings,
                    "payloads_per_s": rate,
                    "readings_per_s": rate * case.readings,
                }
            )
            print(f"{case.name:24} {ref_name:22} {rate:14,.0f} {rate * case.readings:14,.0f}")
    elapsed = time.perf_counter() - t_start
    report = {
        "benchmark": "decoders",
        "unit": "best round, one pinned core",
        "rounds": rounds,
        "round_s": round_s,
        "cpu": cpu,
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "elapsed_s": round(elapsed, 2),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
