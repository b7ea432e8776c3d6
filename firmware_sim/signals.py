"""Signal shapes of the simulated metrics.

Two shapes, chosen per run (``--signal``):

- ``random``: drifting sines with noise (see :mod:`firmware_sim.devices`);
  nearly every value is distinct, the worst case for the store's compression.
- ``walk``: what field sensors send: per device and metric a random walk on a
  grid (multiples of 0.01), where most readings repeat the last value or move
  a quantum or two, with a slow drift, an occasional step (a setpoint
  change), kept within the metric's range. State metrics keep their integer
  states and change rarely.

A walk is a function of its seed and of how many readings were drawn from
it, not of the clock: the same seed gives the same values in every run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["SIGNALS", "Walk", "WalkShape"]

SIGNALS = ("random", "walk")


@dataclass(frozen=True, slots=True)
class WalkShape:
    """How a walk moves; one for every metric of a run."""

    scale: int = 100  # grid points per unit: values are multiples of 1/scale (0.01)
    hold: float = 0.6  # chance that a reading repeats the last value
    max_move: int = 2  # quanta a reading moves at most, steps aside
    max_bias: float = 0.05  # a series moves up with chance 0.5 + bias, |bias| <= this: its drift
    step_rate: float = 0.0005  # chance that a reading is a step
    step_span: float = 0.5  # a step moves at most this fraction of the metric's amplitude
    state_change: float = 0.002  # chance that a state metric changes state
    states: int = 4  # a state metric takes the values 0 .. states - 1

    def max_step(self, amplitude: float) -> int:
        """The largest move between two readings of a metric, in quanta (a step)."""
        return max(self.max_move, int(self.step_span * amplitude * self.scale))


class Walk:
    """The walks of one device: one per metric, each on its own grid position.

    ``metrics`` are ``(base, amplitude, is_state)`` per metric: a walk starts
    near ``base`` and stays within ``base ± amplitude``.
    """

    __slots__ = ("_bias", "_hi", "_level", "_lo", "_rng", "_state", "_steps", "shape")

    def __init__(self, metrics: list[tuple[float, float, bool]], seed: str, shape: WalkShape | None = None) -> None:
        self.shape = shape or WalkShape()
        s = self.shape.scale
        self._rng = random.Random(seed)
        rnd = self._rng.uniform
        self._state = [bool(st) for _, _, st in metrics]
        self._lo = [round((b - a) * s) for b, a, _ in metrics]
        self._hi = [round((b + a) * s) for b, a, _ in metrics]
        self._level = [0 if st else round((b + rnd(-a, a) / 2) * s) for b, a, st in metrics]
        self._bias = [rnd(-self.shape.max_bias, self.shape.max_bias) for _ in metrics]
        self._steps = [self.shape.max_step(a) for _, a, _ in metrics]

    def next(self, m: int) -> float:
        """The next reading of metric ``m``."""
        sh = self.shape
        r = self._rng.random()
        if self._state[m]:
            if r < sh.state_change:
                self._level[m] = self._rng.randrange(sh.states)
            return float(self._level[m])
        if r >= sh.hold:
            level = self._level[m]
            if r >= 1.0 - sh.step_rate:
                move = self._rng.randint(1, self._steps[m])
            else:
                move = self._rng.randint(1, sh.max_move)
            up = self._rng.random() < 0.5 + self._bias[m]
            nxt = level + move if up else level - move
            if not self._lo[m] <= nxt <= self._hi[m]:
                # reflect at the range's edge, and drift back the other way
                nxt = level - move if up else level + move
                self._bias[m] = -self._bias[m]
            self._level[m] = nxt
        # dividing the integer grid position gives the double nearest the decimal (21.37, not 21.370000000000001)
        return self._level[m] / sh.scale
