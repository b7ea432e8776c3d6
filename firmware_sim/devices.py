"""Virtual devices: their metrics, signals, sequence numbers and messages.

A :class:`Device` turns "publish N readings now" into a :class:`Message`
(topic, payload and the readings it carries, as the store must hold them) in
its format. Signals are drifting sines with noise and steps for state-like
metrics (signal ``random``), or quantized random walks (signal ``walk``, see
:mod:`firmware_sim.signals`); the frame format adds an occasional NaN (JSON
and line protocol cannot carry NaN).

Uniqueness: every published reading has a distinct stored key
``(device, metric, ts, seq)``, and even a distinct ``(device, metric, ts)``
because each message's timestamps are strictly after the previous message's,
so formats without a sequence (line protocol, Sparkplug) stay checkable.
"""

from __future__ import annotations

import math
import random
import struct
import time
from dataclasses import dataclass, field

from firmware_sim.encoders import (
    SP_BOOLEAN,
    SP_DOUBLE,
    SP_INT64,
    SparkplugMetric,
    encode_frame_columns,
    encode_ilp_line,
    encode_json_array,
    encode_json_multi,
    encode_json_single,
    encode_sparkplug,
)
from firmware_sim.signals import SIGNALS, Walk

__all__ = [
    "FORMATS",
    "METRICS",
    "SEQ_UNKNOWN",
    "Device",
    "Message",
    "MetricSpec",
    "make_devices",
    "metric_names",
    "parse_mix",
]

FORMATS = ("frame", "json", "ilp", "sparkplug")
_F32 = struct.Struct("<f")
SEQ_UNKNOWN = -1  # the format carries no per-reading sequence (line protocol, Sparkplug)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric of every device: its frame id, name, and signal shape."""

    metric_id: int
    name: str
    base: float
    amplitude: float
    period_s: float
    noise: float
    step: bool = False


# The metrics every simulated device has. Frame ids are 1..8; the stored name
# of a frame metric comes from the pipeline's dictionary (``m<id>`` when the
# dictionary does not name it), see :func:`metric_names`.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(1, "temp_c", 21.0, 3.0, 600.0, 0.05),
    MetricSpec(2, "rh", 45.0, 8.0, 900.0, 0.2),
    MetricSpec(3, "pressure_kpa", 101.3, 0.8, 1800.0, 0.01),
    MetricSpec(4, "vibration_mm_s", 2.0, 1.5, 7.0, 0.3),
    MetricSpec(5, "current_a", 12.0, 4.0, 45.0, 0.1),
    MetricSpec(6, "speed_rpm", 1450.0, 50.0, 120.0, 2.0),
    MetricSpec(7, "power_kw", 7.5, 2.0, 300.0, 0.05),
    MetricSpec(8, "state", 0.0, 1.0, 60.0, 0.0, step=True),
)


def metric_names(fmt: str, dictionary: dict[int, str] | None = None) -> list[str]:
    """Stored metric names of :data:`METRICS` in format ``fmt``.

    Frame metrics are ids; the pipeline names them through its dictionary, so
    the simulator must be told the same dictionary (empty: ``m<id>``). Line
    protocol metrics are ``<measurement>.<field>`` with measurement ``line``.
    """
    if fmt == "frame":
        d = dictionary or {}
        return [d.get(m.metric_id, f"m{m.metric_id}") for m in METRICS]
    if fmt == "ilp":
        return [f"{ILP_MEASUREMENT}.{m.name}" for m in METRICS]
    if fmt == "sparkplug":
        # Births also carry these two node metrics, and a host stores them as readings.
        return [m.name for m in METRICS] + list(SPARKPLUG_NODE_METRICS)
    return [m.name for m in METRICS]


SPARKPLUG_NODE_METRICS = ("bdSeq", "Node Control/Rebirth")


ILP_MEASUREMENT = "line"


def parse_mix(text: str) -> dict[str, float]:
    """Parse ``frame=0.7,json=0.1,...`` (or one format name) into normalised ratios."""
    text = text.strip()
    if text in FORMATS:
        return {text: 1.0}
    if text == "mixed":
        return {"frame": 0.7, "json": 0.1, "ilp": 0.1, "sparkplug": 0.1}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, ratio = part.partition("=")
        name = name.strip()
        if not sep or name not in FORMATS:
            raise ValueError(f"mix entry {part!r}: expected FORMAT=RATIO with FORMAT one of {', '.join(FORMATS)}")
        r = float(ratio)
        if r < 0 or not math.isfinite(r):
            raise ValueError(f"mix ratio {ratio!r} must be a finite number >= 0")
        out[name] = out.get(name, 0.0) + r
    total = sum(out.values())
    if total <= 0:
        raise ValueError("mix ratios sum to 0")
    return {k: v / total for k, v in out.items() if v > 0}


@dataclass(slots=True)
class Message:
    """One MQTT message and the readings the store must hold for it.

    ``readings`` rows are ``(metric_index, ts_us, seq, value)``; ``metric_index``
    indexes the device's ``names``. A faulty message (``fault`` set) carries no
    readings: it must end in ``dead_letters``.
    """

    device: int
    topic: str
    payload: bytes
    readings: list[tuple[int, int, int, float]]
    fault: str | None = None
    birth: bool = False


@dataclass(slots=True)
class Device:
    """One simulated device: identity, format, signals and sequence state."""

    index: int
    device_id: str
    line: str
    fmt: str
    names: list[str]
    stored_device: str
    rng: random.Random
    nan_rate: float = 0.001
    float32: bool = False
    ts_offset_us: int = 0
    frame_seq: int = 0
    json_seq: int = 0
    sp_seq: int = 0
    bd_seq: int = 0
    last_ts_us: int = 0
    phase: list[float] = field(default_factory=list)
    drift: list[float] = field(default_factory=list)
    step_value: float = 0.0
    walk: Walk | None = None  # signal "walk"; None: drifting sines ("random")
    metric_cursor: int = 0
    json_shape: int = 0

    topic: str = ""
    device_bytes: bytes = b""

    def __post_init__(self) -> None:
        self.topic = self._data_topic()
        self.device_bytes = self.device_id.encode("ascii")

    def _data_topic(self) -> str:
        """The topic the device publishes its data to."""
        if self.fmt == "sparkplug":
            return f"spBv1.0/{self.line}/NDATA/{self.device_id}"
        return f"sensors/{self.line}/{self.device_id}/{self.fmt}"

    def sparkplug_topic(self, kind: str) -> str:
        """``spBv1.0/<group>/<kind>/<edge_node>``: the group is the line, the edge node the device."""
        return f"spBv1.0/{self.line}/{kind}/{self.device_id}"

    # ------------------------------------------------------------ signals

    def _value(self, m: int, t_s: float) -> float:
        if self.walk is not None:
            return self.walk.next(m)
        spec = METRICS[m]
        if spec.step:
            # A state that changes now and then: a step signal.
            if self.rng.random() < 0.002:
                self.step_value = float(self.rng.randrange(0, 4))
            return self.step_value
        v = (
            spec.base
            + spec.amplitude * math.sin(2 * math.pi * t_s / spec.period_s + self.phase[m])
            + self.drift[m] * (t_s % 3600.0)
        )
        if spec.noise:
            # Uniform noise with the given standard deviation: cheaper than gauss().
            v += (self.rng.random() - 0.5) * spec.noise * 3.4641016151377544
        return v

    def _next_ts(self, n: int, now_us: int | None) -> int:
        """Base timestamp for a message of ``n`` readings: now, but strictly after the last message."""
        ts = (time.time_ns() // 1000 if now_us is None else now_us) + self.ts_offset_us
        if ts <= self.last_ts_us:
            ts = self.last_ts_us + 1
        self.last_ts_us = ts + n  # readings use ts .. ts+n-1
        return ts

    def _pick_metrics(self, n: int) -> list[int]:
        m = len(METRICS)
        out = [(self.metric_cursor + i) % m for i in range(n)]
        self.metric_cursor = (self.metric_cursor + n) % m
        return out

    # ------------------------------------------------------------ messages

    def next_message(self, n: int, now_us: int | None = None) -> Message:
        """Build the device's next data message of ``n`` readings (``n`` >= 1)."""
        if self.fmt == "frame":
            return self._frame(n, now_us)
        if self.fmt == "json":
            return self._json(n, now_us)
        if self.fmt == "ilp":
            return self._ilp(n, now_us)
        return self._sparkplug(n, now_us)

    def _frame(self, n: int, now_us: int | None) -> Message:
        base = self._next_ts(n, now_us)
        t_s = base / 1e6
        seq0 = self.frame_seq * 65536
        rnd = self.rng.random
        nan_rate = self.nan_rate
        ids: list[int] = []
        qs: list[int] = []
        vals: list[float] = []
        rows: list[tuple[int, int, int, float]] = []
        for i, m in enumerate(self._pick_metrics(n)):
            # One draw decides NaN (rare), quality uncertain/bad (2%), or a plain good value.
            r = rnd()
            v = math.nan if r < nan_rate else self._value(m, t_s)
            q = 0 if r < 0.98 else (1 if r < 0.99 else 2)
            if self.float32:
                # What the store holds is the float32 value widened back.
                v = _F32.unpack(_F32.pack(v))[0]
            ids.append(METRICS[m].metric_id)
            qs.append(q)
            vals.append(v)
            rows.append((m, base + i, seq0 + i, v))
        payload = encode_frame_columns(
            self.device_bytes, self.frame_seq, base, ids, qs, vals, float32=self.float32
        )
        self.frame_seq = (self.frame_seq + 1) & 0xFFFFFFFF
        return Message(self.index, self.topic, payload, rows)

    def _json(self, n: int, now_us: int | None) -> Message:
        base = self._next_ts(n, now_us)
        t_s = base / 1e6
        metrics = self._pick_metrics(n)
        rows: list[tuple[int, int, int, float]] = []
        # Rotate through the three shapes so every message kind is exercised.
        shape = self.json_shape
        self.json_shape = (shape + 1) % 3
        if n == 1 and shape == 0:
            m = metrics[0]
            v = self._value(m, t_s)
            seq = self.json_seq
            self.json_seq += 1
            rows.append((m, base, seq, v))
            return Message(self.index, self.topic, encode_json_single(self.names[m], v, base, seq), rows)
        if shape == 1 and n <= len(METRICS):
            # Shape 2: distinct metrics at one time, one shared seq.
            seq = self.json_seq
            self.json_seq += 1
            vals = []
            for m in metrics:
                v = self._value(m, t_s)
                vals.append((self.names[m], v))
                rows.append((m, base, seq, v))
            return Message(self.index, self.topic, encode_json_multi(vals, base, seq), rows)
        objs = []
        for i, m in enumerate(metrics):
            v = self._value(m, t_s)
            seq = self.json_seq
            self.json_seq += 1
            objs.append(encode_json_single(self.names[m], v, base + i, seq))
            rows.append((m, base + i, seq, v))
        return Message(self.index, self.topic, encode_json_array(objs), rows)

    def _ilp(self, n: int, now_us: int | None) -> Message:
        base = self._next_ts(n, now_us)
        t_s = base / 1e6
        metrics = self._pick_metrics(n)
        rows: list[tuple[int, int, int, float]] = []
        lines = []
        # One line per group of distinct metrics; each line its own timestamp.
        k = len(METRICS)
        for start in range(0, n, k):
            ts_us = base + start
            fields: list[tuple[str, float | int | bool | str]] = []
            for m in metrics[start : start + k]:
                spec = METRICS[m]
                v = self._value(m, t_s)
                if spec.step:
                    # State is an integer field (``2i``), stored as a number.
                    iv = int(v)
                    fields.append((spec.name, iv))
                    v = float(iv)
                else:
                    fields.append((spec.name, v))
                rows.append((m, ts_us, SEQ_UNKNOWN, v))
            if start == 0 and self.rng.random() < 0.05:
                # A string field is not a reading: the decoder counts and skips it.
                fields.append(("note", "ok, running"))
            lines.append(encode_ilp_line(ILP_MEASUREMENT, [("device", self.device_id)], fields, ts_us * 1000))
        return Message(self.index, self.topic, b"\n".join(lines), rows)

    # ------------------------------------------------------------ Sparkplug B

    def _sp_seq(self) -> int:
        s = self.sp_seq
        self.sp_seq = (s + 1) & 0xFF
        return s

    def sparkplug_death(self) -> bytes:
        """NDEATH payload (the will of the current connection): its bdSeq."""
        return encode_sparkplug(
            int(time.time() * 1000), None, [SparkplugMetric("bdSeq", None, None, SP_INT64, self.bd_seq)]
        )

    def sparkplug_birth(self) -> Message:
        """NBIRTH: bdSeq, ``Node Control/Rebirth`` and every metric with its name, alias and value.

        A host stores a birth's numeric and boolean metrics as readings (the
        spec makes them readings), so the birth's rows are part of the truth:
        ``bdSeq`` and ``Node Control/Rebirth`` (0) included. Its timestamp is
        kept off every data timestamp.
        """
        self.sp_seq = 0
        base = self._next_ts(1, None)
        ts_ms = self._ms_after(base)
        n = len(METRICS)
        metrics = [
            SparkplugMetric("bdSeq", None, ts_ms, SP_INT64, self.bd_seq),
            SparkplugMetric("Node Control/Rebirth", None, ts_ms, SP_BOOLEAN, False),
        ]
        rows: list[tuple[int, int, int, float]] = [
            (n, ts_ms * 1000, SEQ_UNKNOWN, float(self.bd_seq)),
            (n + 1, ts_ms * 1000, SEQ_UNKNOWN, 0.0),
        ]
        for m, spec in enumerate(METRICS):
            v = self._value(m, ts_ms / 1000)
            metrics.append(SparkplugMetric(spec.name, m + 1, ts_ms, SP_DOUBLE, v))
            rows.append((m, ts_ms * 1000, SEQ_UNKNOWN, v))
        payload = encode_sparkplug(ts_ms, self._sp_seq(), metrics)
        return Message(self.index, self.sparkplug_topic("NBIRTH"), payload, rows, birth=True)

    def _ms_after(self, ts_us: int) -> int:
        """A millisecond timestamp not earlier than ``ts_us`` and after every one used before."""
        ms = -(-ts_us // 1000)
        self.last_ts_us = max(self.last_ts_us, ms * 1000 + 1000)
        return ms

    def _sparkplug(self, n: int, now_us: int | None) -> Message:
        base = self._next_ts(n, now_us)
        metrics = self._pick_metrics(n)
        k = len(METRICS)
        first_ms = self._ms_after(base)
        rows: list[tuple[int, int, int, float]] = []
        sp: list[SparkplugMetric] = []
        for i, m in enumerate(metrics):
            # Readings of one metric in one message get distinct milliseconds.
            ts_ms = first_ms + i // k
            v = self._value(m, ts_ms / 1000)
            sp.append(SparkplugMetric(None, m + 1, ts_ms, SP_DOUBLE, v))
            rows.append((m, ts_ms * 1000, SEQ_UNKNOWN, v))
        self.last_ts_us = max(self.last_ts_us, (first_ms + (n - 1) // k + 1) * 1000)
        payload = encode_sparkplug(first_ms, self._sp_seq(), sp)
        return Message(self.index, self.topic, payload, rows)


def make_devices(
    count: int,
    mix: dict[str, float],
    *,
    lines: int = 4,
    seed: int = 1,
    dictionary: dict[int, str] | None = None,
    nan_rate: float = 0.001,
    float32: bool = False,
    prefix: str = "dev",
    signal: str = "random",
) -> list[Device]:
    """Create ``count`` devices ``<prefix>-0001``.. spread over ``line1..line<lines>``.

    Formats are assigned by ``mix`` ratio deterministically (largest remainder),
    so the same arguments always give the same devices in every process.
    ``signal`` is the shape of their values: ``random`` or ``walk``.
    """
    if count < 1:
        raise ValueError("need at least one device")
    if signal not in SIGNALS:
        raise ValueError(f"signal {signal!r}: expected one of {', '.join(SIGNALS)}")
    walk_metrics = [(m.base, m.amplitude, m.step) for m in METRICS]
    quotas = {f: r * count for f, r in mix.items()}
    alloc = {f: int(q) for f, q in quotas.items()}
    rest = count - sum(alloc.values())
    for f in sorted(quotas, key=lambda f: quotas[f] - alloc[f], reverse=True)[:rest]:
        alloc[f] += 1
    fmts: list[str] = []
    # Interleave the formats over device numbers so every line gets a share.
    pending = {f: c for f, c in alloc.items() if c}
    while pending:
        for f in sorted(pending):
            fmts.append(f)
            pending[f] -= 1
        pending = {f: c for f, c in pending.items() if c}
    devices = []
    for i, fmt in enumerate(fmts):
        rng = random.Random(seed * 1_000_003 + i)
        dev_id = f"{prefix}-{i + 1:04d}"
        line = f"line{i % lines + 1}"
        stored = f"{line}/{dev_id}" if fmt == "sparkplug" else dev_id
        devices.append(
            Device(
                index=i,
                device_id=dev_id,
                line=line,
                fmt=fmt,
                names=metric_names(fmt, dictionary),
                stored_device=stored,
                rng=rng,
                nan_rate=nan_rate if fmt == "frame" else 0.0,
                float32=float32 and fmt == "frame",
                phase=[rng.uniform(0, 2 * math.pi) for _ in METRICS],
                drift=[rng.uniform(-1e-4, 1e-4) * m.amplitude for m in METRICS],
                # its own generator, so the NaN and quality draws stay those of signal "random"
                walk=Walk(walk_metrics, f"walk:{seed}:{i}") if signal == "walk" else None,
            )
        )
    return devices
