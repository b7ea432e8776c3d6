"""Signal shapes: the walk is quantized, moves in bounded steps, repeats, and comes from its seed alone."""

from __future__ import annotations

import itertools
import math
import zlib
from collections import defaultdict

import pytest

from firmware_sim.cli import build_parser
from firmware_sim.devices import METRICS, make_devices
from firmware_sim.signals import WalkShape

T0_US = 1_700_000_000_000_000


def _series(signal: str, seed: int, messages: int = 1500) -> dict[tuple[int, int], list[float]]:
    """Values per (device, metric) in publishing order, from frame messages of 10 readings."""
    out: dict[tuple[int, int], list[float]] = defaultdict(list)
    for d in make_devices(3, {"frame": 1.0}, seed=seed, nan_rate=0.0, signal=signal):
        for k in range(messages):
            for m, _ts, _seq, v in d.next_message(10, now_us=T0_US + k * 50_000).readings:
                out[(d.index, m)].append(v)
    return out


def test_walk_values_are_on_the_grid_within_range_in_bounded_steps() -> None:
    shape = WalkShape()
    series = _series("walk", seed=7)
    moves = repeats = small = 0
    for (_dev, m), values in series.items():
        spec = METRICS[m]
        assert len(values) > 1000
        if spec.step:
            assert set(values) <= {float(s) for s in range(shape.states)}
            continue
        for v in values:
            # exactly the double a decimal with two places parses to
            assert v == round(v * shape.scale) / shape.scale, v
            assert spec.base - spec.amplitude - 1e-9 <= v <= spec.base + spec.amplitude + 1e-9
        bound = shape.max_step(spec.amplitude)
        for a, b in itertools.pairwise(values):
            q = round(abs(b - a) * shape.scale)
            assert q <= bound, (spec.name, a, b)
            moves += 1
            repeats += q == 0
            small += q <= shape.max_move
    # most readings repeat the last value; nearly all others move a quantum or two
    assert repeats / moves > 0.5
    assert small / moves > 0.999
    assert small < moves  # and the occasional step does happen


def test_walk_is_a_function_of_the_seed() -> None:
    a, b, c = _series("walk", seed=11, messages=300), _series("walk", seed=11, messages=300), _series(
        "walk", seed=12, messages=300
    )
    assert a == b
    assert a != c


def test_random_signal_is_the_one_earlier_runs_published() -> None:
    """Same seed, same payloads as before the walk existed (checksum of the first 200 messages)."""
    devices = make_devices(4, {"frame": 0.5, "json": 0.5}, seed=3)
    payloads = b"".join(
        d.next_message(10, now_us=T0_US + k * 50_000).payload for k in range(50) for d in devices
    )
    assert zlib.crc32(payloads) == 2380264868
    values = [v for vs in _series("random", seed=7, messages=200).values() for v in vs if not math.isnan(v)]
    # nearly every value distinct, and off any 0.01 grid
    assert len(set(values)) > 0.8 * len(values)
    assert sum(v == round(v * 100) / 100 for v in values) < 0.2 * len(values)


def test_signal_is_chosen_on_the_command_line() -> None:
    p = build_parser()
    assert p.parse_args(["run"]).signal == "random"
    assert p.parse_args(["run", "--signal", "walk"]).signal == "walk"
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--signal", "sine"])
    with pytest.raises(ValueError, match="signal 'sine'"):
        make_devices(1, {"frame": 1.0}, signal="sine")
