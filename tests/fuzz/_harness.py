"""Shared driver of the fuzz harnesses: atheris when installed, else a bounded random loop.

Usage of every ``fuzz_<fmt>.py``::

    python tests/fuzz/fuzz_frame.py [--runs N] [--seconds S] [--plain] [libFuzzer flags...]

A harness feeds the same input to the Cython decoder and its pure-Python twin
and fails (a "crash") when either raises anything but a ``DecodeError``, when
their outcomes differ, or when a failed decode changed the batch. With
atheris (and without ``--plain``) ``--runs``/``--seconds`` become
``-atheris_runs``/``-max_total_time``; the plain loop mutates seed payloads
with a seeded RNG and prints executions per second at the end.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sensorhub import errors  # noqa: E402
from sensorhub._ext import batch as cy_batch  # noqa: E402
from sensorhub.decoders import batch_py  # noqa: E402

RECV_NS = 1_764_072_009_000_000_000


def outcome(decoder: Any, batch_cls: Any, topic: str | None, payload: bytes, exact: bool) -> tuple[Any, ...]:
    """What decoding ``payload`` does: rows, or the error (class, and offset/message when ``exact``)."""
    b = batch_cls(8)
    b.append("keep", "me", 1, 2.0, 0, 3, 4)
    before = b.rows()
    try:
        n = decoder.decode(topic, payload, RECV_NS, b)
    except errors.DecodeError as e:
        if b.rows() != before:
            raise AssertionError(f"{type(decoder).__module__}: a failed decode changed the batch") from e
        return ("error", type(e), e.offset, str(e)) if exact else ("error", type(e))
    rows = b.rows()[1:]
    if n != len(rows):
        raise AssertionError(f"{type(decoder).__module__}: returned {n}, appended {len(rows)}")
    for r in rows:
        r["value"] = struct.pack("<d", r["value"])
    return ("ok", rows)


def make_check(cy_decoder: Any, py_decoder: Any, exact: bool) -> Callable[[bytes, str | None], None]:
    def check(payload: bytes, topic: str | None) -> None:
        a = outcome(cy_decoder, cy_batch.ReadingBatch, topic, payload, exact)
        b = outcome(py_decoder, batch_py.ReadingBatch, topic, payload, exact)
        if a != b:
            raise AssertionError(f"implementations differ on {payload!r} (topic {topic!r}):\n  cython {a}\n  python {b}")

    return check


def mutate(rng: random.Random, data: bytes, alphabet: bytes) -> bytes:
    """A few random edits: overwrite, insert, delete, splice a run of bytes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randint(0, len(buf))
        op = rng.randrange(4)
        if op == 0 and pos < len(buf):
            buf[pos] = rng.choice(alphabet) if rng.random() < 0.7 else rng.randrange(256)
        elif op == 1:
            buf[pos:pos] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
        elif op == 2:
            del buf[pos : pos + rng.randint(1, 8)]
        else:
            a = rng.randint(0, len(buf))
            buf[pos:pos] = buf[a : a + rng.randint(1, 16)]
    return bytes(buf)


def main(
    name: str,
    one_input: Callable[[bytes], None],
    plain_input: Callable[[random.Random], bytes],
) -> int:
    ap = argparse.ArgumentParser(description=f"fuzz the {name} decoders (Cython against the twin)")
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="bounded random loop even when atheris is installed")
    args, rest = ap.parse_known_args()
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        atheris = None
    if atheris is not None and not args.plain:
        # coverage feedback comes from the twin's Python code (the Cython
        # module is not built with sanitizer coverage); instrument all of it
        atheris.instrument_all()
        argv = [sys.argv[0], f"-atheris_runs={args.runs}", f"-max_total_time={int(args.seconds)}", *rest]
        atheris.Setup(argv, one_input)
        atheris.Fuzz()
        return 0
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    runs = 0
    while runs < args.runs and time.perf_counter() - t0 < args.seconds:
        one_input(plain_input(rng))
        runs += 1
    dt = time.perf_counter() - t0
    print(f"{name}: {runs} executions in {dt:.1f} s ({runs / dt:,.0f}/s), 0 crashes")
    return 0
