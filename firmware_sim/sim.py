"""The simulator: devices, connections, rate control, faults, and the ground truth.

One :class:`Simulator` runs in one process on one asyncio loop. A scheduler
task earns message credit at the profile's rate every tick and spends it
round-robin over the devices, so every device publishes at the same share of
the total. A device whose connection cannot take more (in-flight window full,
socket pushed back, reconnecting) is skipped for that turn; credit is capped at
one second's worth so a stall is not followed by an unbounded burst.

Connections: ``per-device`` gives every device its own MQTT connection (as
real devices have); ``pooled`` shares ``pool`` connections among the devices
(a device always uses the same one, which keeps its messages in order).
Sparkplug devices are edge nodes and always have their own connection, since
their NDEATH is the will of that connection.

Credentials: every connection authenticates with the one account
(``username``/``password``), or, with ``device_credentials`` (device id ->
password), each device with its own (user name = device id), as real devices
do where the broker lets a device publish only as itself. That needs
``per-device`` connections: a pooled one carries many devices. The control
connection (rebirth commands) keeps the one account. ``tls`` puts every
connection on TLS (:func:`sensorhub.security.tlsctx.client_context`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_sim.devices import Device, Message, make_devices
from firmware_sim.encoders import FRAME_RULES, corrupt_frame
from firmware_sim.mqtt import MqttConnection, MqttError, Will, topic_field
from firmware_sim.truth import FLAG_SKEWED, TruthWriter
from sensorhub.security.tlsctx import client_context

__all__ = ["PROFILES", "FaultConfig", "RunStats", "SimConfig", "Simulator", "parse_fault", "rate_at"]

log = logging.getLogger("firmware_sim")

PROFILES = ("steady", "ramp", "burst", "overload")
MAX_MESSAGES_PER_TICK = 5000

# Fault names accepted by ``--fault NAME[=VALUE]`` and what VALUE means.
FAULTS = {
    "malformed": "fraction of messages followed by an invalid one (every frame rule in turn)",
    **{r: f"fraction of messages followed by a frame breaking '{r}'" for r in FRAME_RULES},
    "duplicate": "fraction of messages published twice",
    "out-of-order": "fraction of messages sent after the device's next one",
    "clock-skew": "seconds added to the clock of every tenth device (alternating sign)",
    "reconnect-storm": "seconds between storms: every connection disconnects and reconnects at once",
    "die": "seconds between device deaths: a connection dropped without DISCONNECT (Sparkplug: NDEATH by will)",
}


def parse_fault(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME=VALUE`` -> (name, value), with a default value per fault."""
    name, sep, val = text.partition("=")
    name = name.strip()
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; one of {', '.join(FAULTS)}")
    defaults = {"clock-skew": 120.0, "reconnect-storm": 10.0, "die": 2.0}
    v = float(val) if sep else defaults.get(name, 0.01)
    if not math.isfinite(v) or (name not in ("clock-skew",) and v <= 0):
        raise ValueError(f"fault {name}: value {val!r} must be a positive number")
    return name, v


@dataclass
class FaultConfig:
    """Which faults to inject and how often (see :data:`FAULTS`)."""

    faults: dict[str, float] = field(default_factory=dict)

    def rate(self, name: str) -> float:
        return self.faults.get(name, 0.0)


@dataclass
class SimConfig:
    """Everything one simulator process needs; ``rate`` is readings per second for this process."""

    host: str = "127.0.0.1"
    port: int = 1883
    devices: int = 200
    mix: dict[str, float] = field(default_factory=lambda: {"frame": 1.0})
    per_message: int = 1
    qos: int = 1
    rate: float = 1000.0
    duration_s: float = 10.0
    count: int | None = None
    profile: str = "steady"
    mode: str = "pooled"
    pool: int = 4
    mqtt_version: int = 4
    clean: bool = True
    session_expiry_s: int = 0
    max_inflight: int = 512
    lines: int = 4
    seed: int = 1
    dictionary: dict[int, str] = field(default_factory=dict)
    nan_rate: float = 0.001
    float32: bool = False
    signal: str = "random"
    faults: FaultConfig = field(default_factory=FaultConfig)
    truth_path: Path | None = None
    full_limit: int = 2_000_000
    shard: int = 0
    shards: int = 1
    client_prefix: str = "sim"
    keepalive_s: int = 30
    tick_s: float = 0.005
    drain_timeout_s: float = 10.0
    device_prefix: str = "dev"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: device id -> password; each device connects as itself (per-device mode)
    device_credentials: dict[str, str] | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass
class RunStats:
    """What a run did; ``published`` counts readings that count as published (births included)."""

    published: int = 0
    birth_readings: int = 0
    published_messages: int = 0
    sent_messages: int = 0
    unacked_messages: int = 0
    refused_messages: int = 0  # the broker said no (MQTT 5 PUBACK reason >= 0x80): not published
    dead_letters_sent: int = 0
    duplicates_sent: int = 0
    reconnects: int = 0
    deaths: int = 0
    rebirths: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    start_unix_us: int = 0
    end_unix_us: int = 0
    per_second: list[int] = field(default_factory=list)

    @property
    def achieved_rate(self) -> float:
        """Published data readings (births left out) per second over the publishing time."""
        return (self.published - self.birth_readings) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["achieved_rate"] = round(self.achieved_rate, 1)
        d["cpu_us_per_message"] = (
            round(self.cpu_s / self.published_messages * 1e6, 2) if self.published_messages else None
        )
        return d


def rate_at(profile: str, base: float, t: float, duration: float) -> float:
    """Target readings/s at ``t`` seconds into a run of ``duration`` seconds."""
    if profile == "steady":
        return base
    if profile == "ramp":
        # From a tenth of the rate to the full rate over the run.
        frac = min(1.0, t / duration) if duration > 0 else 1.0
        return base * (0.1 + 0.9 * frac)
    if profile == "burst":
        # One second of three times the rate every ten seconds, the base otherwise.
        return base * 3.0 if (t % 10.0) < 1.0 else base
    if profile == "overload":
        return base * 3.0
    raise ValueError(f"unknown profile {profile!r}; one of {', '.join(PROFILES)}")


class Simulator:
    """Runs one process's share of the devices against one broker."""

    def __init__(self, cfg: SimConfig, progress: Callable[[RunStats], None] | None = None) -> None:
        if cfg.per_message < 1 or cfg.per_message > 1024:
            raise ValueError("per_message must be 1..1024")
        if cfg.duration_s <= 0 and not cfg.count:
            raise ValueError("a run needs a duration or a count")
        if cfg.device_credentials is not None and cfg.mode != "per-device":
            raise ValueError("device credentials need --mode per-device: a pooled connection publishes "
                             "for many devices, and a device may publish only as itself")
        self.cfg = cfg
        self.progress = progress
        all_devices = make_devices(
            cfg.devices,
            cfg.mix,
            lines=cfg.lines,
            seed=cfg.seed,
            dictionary=cfg.dictionary,
            nan_rate=cfg.nan_rate,
            float32=cfg.float32,
            prefix=cfg.device_prefix,
            signal=cfg.signal,
        )
        # Global tables (the same in every process) so truth files merge by concatenation.
        self.device_names = [d.stored_device for d in all_devices]
        metric_table: dict[str, int] = {}
        for d in all_devices:
            for n in d.names:
                metric_table.setdefault(n, len(metric_table))
        self.metric_names = list(metric_table)
        self.metric_maps = {d.index: [metric_table[n] for n in d.names] for d in all_devices}
        self.devices = [d for d in all_devices if d.index % cfg.shards == cfg.shard]
        if cfg.device_credentials is not None:
            missing = [d.device_id for d in self.devices if d.device_id not in cfg.device_credentials]
            if missing:
                raise ValueError(f"device credentials: no password for {len(missing)} device(s), "
                                 f"e.g. {', '.join(missing[:3])}")
        self.ssl_context: ssl.SSLContext | None = (
            client_context(cfg.ca_file, cfg.cert_file, cfg.key_file) if cfg.tls else None
        )
        skew = cfg.faults.rate("clock-skew")
        self.skewed: set[int] = set()
        if skew:
            for d in self.devices:
                if d.index % 10 == 0:
                    d.ts_offset_us = int(skew * 1e6) * (1 if (d.index // 10) % 2 == 0 else -1)
                    self.skewed.add(d.index)
        self.truth = TruthWriter(
            cfg.truth_path,
            self.device_names,
            self.metric_names,
            full_limit=cfg.full_limit,
            meta={"shards": cfg.shards, "per_message": cfg.per_message, "qos": cfg.qos},
        )
        self.stats = RunStats()
        self.rng = random.Random(cfg.seed * 7919 + cfg.shard)
        self.conns: dict[int, MqttConnection] = {}  # device index -> its connection
        self.all_conns: list[MqttConnection] = []
        self.topics: dict[str, bytes] = {}
        self._second_counts: dict[int, int] = {}
        self._t0 = 0.0
        self._malformed_turn = 0
        self._held: dict[int, Message] = {}
        self._reconnecting: set[int] = set()
        self._bg: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ acks and truth

    def _on_ack(self, msg: Message | None) -> None:
        st = self.stats
        if msg is not None and msg.readings:
            st.published_messages += 1
            st.published += len(msg.readings)
            if msg.birth:
                # Birth readings are in the truth but not part of the rate.
                st.birth_readings += len(msg.readings)
            else:
                sec = int(time.monotonic() - self._t0)
                self._second_counts[sec] = self._second_counts.get(sec, 0) + len(msg.readings)
            self.truth.add(
                msg.device,
                self.metric_maps[msg.device],
                msg.readings,
                FLAG_SKEWED if msg.device in self.skewed else 0,
            )

    def _topic(self, topic: str) -> bytes:
        t = self.topics.get(topic)
        if t is None:
            t = self.topics[topic] = topic_field(topic)
        return t

    # ------------------------------------------------------------ connections

    def _new_conn(self, client_id: str, will: Will | None, device: Device | None = None) -> MqttConnection:
        """A connection for ``device`` alone (its own credentials, if configured) or for a pool."""
        cfg = self.cfg
        username, password = cfg.username, cfg.password
        if cfg.device_credentials is not None and device is not None:
            username, password = device.device_id, cfg.device_credentials[device.device_id]
        conn = MqttConnection(
            cfg.host,
            cfg.port,
            client_id,
            on_ack=self._on_ack,
            version=cfg.mqtt_version,
            keepalive=cfg.keepalive_s,
            clean=cfg.clean or will is not None,  # Sparkplug requires a clean session
            session_expiry_s=cfg.session_expiry_s,
            will=will,
            max_inflight=cfg.max_inflight,
            username=username,
            password=password,
            ssl_context=self.ssl_context,
        )
        self.all_conns.append(conn)
        return conn

    def _will(self, d: Device) -> Will:
        return Will(d.sparkplug_topic("NDEATH"), d.sparkplug_death(), qos=1)

    async def _open_all(self) -> None:
        cfg = self.cfg
        pool: list[MqttConnection] = []
        if cfg.mode == "pooled":
            n_pool = max(1, min(cfg.pool, len(self.devices)))
            pool = [
                self._new_conn(f"{cfg.client_prefix}-pool-{cfg.shard}-{k}", None) for k in range(n_pool)
            ]
        elif cfg.mode != "per-device":
            raise ValueError(f"unknown connection mode {cfg.mode!r}; per-device or pooled")
        for i, d in enumerate(self.devices):
            if d.fmt == "sparkplug":
                self.conns[d.index] = self._new_conn(f"{cfg.client_prefix}-{d.device_id}", self._will(d), d)
            elif pool:
                self.conns[d.index] = pool[i % len(pool)]
            else:
                self.conns[d.index] = self._new_conn(f"{cfg.client_prefix}-{d.device_id}", None, d)
        # Connect in bounded batches: a few hundred simultaneous CONNECTs are fine for
        # mosquitto, but bounding keeps a slow broker from timing them all out.
        sem = asyncio.Semaphore(64)

        async def one(c: MqttConnection) -> None:
            async with sem:
                await c.connect()

        results = await asyncio.gather(*(one(c) for c in self.all_conns), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # one refused device (a wrong password) fails the run: close what did connect
            for c in self.all_conns:
                c.abort()
            await asyncio.sleep(0)  # the transports close their sockets on the next loop pass
            raise failed[0]
        if any(d.fmt == "sparkplug" for d in self.devices):
            await self._start_control()
        for d in self.devices:
            if d.fmt == "sparkplug":
                self._birth(d)

    async def _start_control(self) -> None:
        """Listen for the host's rebirth commands (see :mod:`firmware_sim.control`) before the births."""
        from firmware_sim import control

        nodes = {(d.line, d.device_id): d for d in self.devices if d.fmt == "sparkplug"}

        def on_rebirth(group: str, edge: str) -> None:
            d = nodes.get((group, edge))
            if d is None or d.index in self._reconnecting or not self.conns[d.index].connected:
                return  # not ours, or it births anyway when it is back
            self._birth(d)
            self.stats.rebirths += 1
            self.truth.event("rebirths")

        ready = asyncio.Event()
        cfg = self.cfg
        self._spawn(control.listen(cfg.host, cfg.port, f"{cfg.client_prefix}-control-{cfg.shard}", on_rebirth, ready,
                                   username=cfg.username, password=cfg.password, tls_context=self.ssl_context),
                    "sparkplug-control")
        try:
            await asyncio.wait_for(ready.wait(), 10.0)
        except TimeoutError:
            log.warning("the control connection is not subscribed yet; rebirth commands may be missed")

    def _birth(self, d: Device) -> None:
        conn = self.conns[d.index]
        b = d.sparkplug_birth()
        conn.publish(self._topic(b.topic), b.payload, 1, b)
        conn.flush()
        self.truth.event("births")

    async def _reconnect(self, d_indexes: list[int], conn: MqttConnection, delay_s: float) -> None:
        """Reconnect ``conn`` after ``delay_s``, backing off (capped, with jitter) until the broker answers."""
        await asyncio.sleep(delay_s)
        backoff = 0.1
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                for i in d_indexes:
                    d = self._device(i)
                    if d.fmt == "sparkplug":
                        d.bd_seq = (d.bd_seq + 1) & 0xFF
                        conn.will = self._will(d)
                await conn.connect()
                break
            except MqttError as exc:
                log.debug("reconnect of %s failed: %s", conn.client_id, exc)
                await asyncio.sleep(backoff * self.rng.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 2.0)
        for i in d_indexes:
            d = self._device(i)
            if d.fmt == "sparkplug" and conn.connected:
                self._birth(d)
            self._reconnecting.discard(i)
        self.stats.reconnects += 1

    def _device(self, index: int) -> Device:
        return self._by_index[index]

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _revive_lost(self) -> None:
        """Reconnect what the broker dropped (a broker restart, a cut link), as a device would: its
        unacknowledged messages go again, with DUP, once it is back."""
        by_conn: dict[int, list[int]] = {}
        for i, c in self.conns.items():
            by_conn.setdefault(id(c), []).append(i)
        for c in self.all_conns:
            idx = by_conn.get(id(c), [])
            if c.connected or not idx or any(i in self._reconnecting for i in idx):
                continue
            self._reconnecting.update(idx)
            self._spawn(self._reconnect(idx, c, 0.05), f"reconnect-{c.client_id}")

    def _drop(self, conns: list[MqttConnection], graceful: bool, delay_s: float) -> None:
        """Close ``conns`` (DISCONNECT or abruptly) and reconnect them after ``delay_s``."""
        by_conn: dict[int, list[int]] = {}
        for i, c in self.conns.items():
            by_conn.setdefault(id(c), []).append(i)
        for c in conns:
            if not c.connected:
                continue
            idx = by_conn.get(id(c), [])
            self._reconnecting.update(idx)
            if graceful:
                c.flush()
                if c.transport is not None:
                    c.transport.write(b"\xe0\x00")
                    c.transport.close()
                c.connected = False
            else:
                c.abort()
                self.stats.deaths += 1
                self.truth.event("deaths")
            self._spawn(self._reconnect(idx, c, delay_s), f"reconnect-{c.client_id}")

    # ------------------------------------------------------------ faults

    def _fault_messages(self, d: Device, msg: Message) -> list[Message]:
        """Extra faulty messages to send after ``msg`` (none, usually)."""
        f = self.cfg.faults.faults
        if not f:
            return []
        out: list[Message] = []
        r = self.rng.random
        if f.get("duplicate") and r() < f["duplicate"]:
            # The same bytes again: a second delivery the store must not count twice.
            out.append(Message(msg.device, msg.topic, msg.payload, [], fault="duplicate"))
        rules: list[str] = [rule for rule in FRAME_RULES if f.get(rule) and r() < f[rule]]
        if f.get("malformed") and r() < f["malformed"]:
            rules.append(FRAME_RULES[self._malformed_turn % len(FRAME_RULES)])
            self._malformed_turn += 1
        for rule in rules:
            out.append(self._malformed(d, msg, rule))
        return out

    def _malformed(self, d: Device, msg: Message, rule: str) -> Message:
        if d.fmt == "frame":
            if rule == "bad-quality" and not msg.readings:
                rule = "crc"
            return Message(d.index, msg.topic, corrupt_frame(msg.payload, rule), [], fault=rule)
        # Each invalid payload is derived from the real one so that no two are
        # alike (a store keyed on the payload would fold identical ones).
        if d.fmt == "json":
            return Message(d.index, msg.topic, msg.payload[:-1] + b",", [], fault="json syntax")
        if d.fmt == "ilp":
            head, _, rest = msg.payload.partition(b" ")
            ts = rest.rsplit(b" ", 1)[-1].split(b"\n")[0]
            return Message(d.index, msg.topic, head + b" temp_c= " + ts, [], fault="ilp syntax")
        # A protobuf field key whose varint never ends.
        return Message(d.index, msg.topic, msg.payload + b"\xff", [], fault="protobuf")

    # ------------------------------------------------------------ the run

    async def run(self) -> RunStats:
        """Connect, publish for the duration (or count), drain acknowledgements, disconnect."""
        cfg = self.cfg
        self._by_index = {d.index: d for d in self.devices}
        await self._open_all()
        # CPU is counted from here: connecting 200 devices is a one-off cost.
        cpu0 = time.process_time()
        st = self.stats
        st.start_unix_us = time.time_ns() // 1000
        self.truth.meta["start_unix_us"] = st.start_unix_us
        self._t0 = t0 = time.monotonic()
        last = t0
        credit = 0.0
        rr = 0
        devs = self.devices
        n_dev = len(devs)
        n = cfg.per_message
        qos = cfg.qos
        budget = cfg.count if cfg.count else None
        queued_readings = 0
        f = cfg.faults.faults
        storm = f.get("reconnect-storm")
        die = f.get("die")
        next_storm = t0 + storm if storm else math.inf
        next_death = t0 + die if die else math.inf
        ooo = f.get("out-of-order", 0.0)
        next_progress = t0 + 1.0
        next_ping = t0 + 1.0
        touched: set[MqttConnection] = set()
        max_credit_s = 1.0
        duration = cfg.duration_s if cfg.duration_s > 0 else math.inf
        while True:
            now = time.monotonic()
            el = now - t0
            if el >= duration or (budget is not None and queued_readings >= budget):
                break
            credit += rate_at(cfg.profile, cfg.rate, el, duration) / n * (now - last)
            last = now
            credit = min(credit, max(1.0, cfg.rate / n * max_credit_s))
            # Bounded work per tick keeps the loop responsive (acks, pings, the
            # deadline) when the target is far above what can be reached.
            due = min(int(credit), MAX_MESSAGES_PER_TICK)
            if budget is not None:
                due = min(due, -(-(budget - queued_readings) // n))
            sent = 0
            skipped = 0
            while sent < due and skipped < n_dev:
                d = devs[rr]
                rr += 1
                if rr == n_dev:
                    rr = 0
                conn = self.conns[d.index]
                if d.index in self._reconnecting or not conn.can_publish():
                    skipped += 1
                    continue
                skipped = 0
                msg = d.next_message(n)
                if ooo and d.index not in self._held and self.rng.random() < ooo:
                    # Hold this message back; it goes out right after the device's next one.
                    self._held[d.index] = msg
                    self.truth.event("out_of_order")
                    sent += 1
                    queued_readings += n
                    continue
                topic = self._topic(msg.topic)
                conn.publish(topic, msg.payload, qos, msg)
                held = self._held.pop(d.index, None)
                if held is not None:
                    conn.publish(topic, held.payload, qos, held)
                    st.sent_messages += 1
                for extra in self._fault_messages(d, msg):
                    conn.publish(topic, extra.payload, qos, extra)
                    if extra.fault == "duplicate":
                        st.duplicates_sent += 1
                        self.truth.event("duplicates")
                    else:
                        st.dead_letters_sent += 1
                        self.truth.dead_letter(d.stored_device, extra.fault or "malformed")
                touched.add(conn)
                st.sent_messages += 1
                sent += 1
                queued_readings += n
            credit -= sent
            if skipped >= n_dev:
                # Nothing can take more right now; do not bank the credit forever.
                credit = min(credit, due)
            for c in touched:
                c.flush()
            touched.clear()
            if now >= next_storm:
                next_storm = now + (storm or math.inf)
                self.truth.event("reconnect_storms")
                self._drop(list({id(c): c for c in self.conns.values()}.values()), True, 0.2)
            if now >= next_death:
                next_death = now + (die or math.inf)
                victim = self.conns[self.rng.choice(devs).index]
                self._drop([victim], False, 1.0)
            if now >= next_ping:
                next_ping = now + 1.0
                for c in self.all_conns:
                    c.ping_if_idle(now)
                self._revive_lost()
            if self.progress is not None and now >= next_progress:
                next_progress = now + 1.0
                st.elapsed_s = now - t0
                self.progress(st)
            await asyncio.sleep(cfg.tick_s)
        end = time.monotonic()
        # Messages held back for reordering still go out.
        for idx, held in list(self._held.items()):
            conn = self.conns[idx]
            conn.publish(self._topic(held.topic), held.payload, qos, held)
            conn.flush()
            st.sent_messages += 1
        self._held.clear()
        await self._drain()
        st.elapsed_s = max(end - t0, 1e-9)
        st.end_unix_us = time.time_ns() // 1000
        st.unacked_messages = sum(len(c.inflight) for c in self.all_conns)
        st.refused_messages = sum(c.refused for c in self.all_conns)
        secs = max(self._second_counts, default=-1) + 1
        st.per_second = [self._second_counts.get(i, 0) for i in range(secs)]
        await self._close_all()
        st.cpu_s = time.process_time() - cpu0
        return st

    async def _drain(self) -> None:
        """Wait (bounded) for reconnects to finish and for every QoS 1 message to be acknowledged."""
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while time.monotonic() < deadline:
            if not self._reconnecting and not any(c.inflight for c in self.all_conns):
                break
            for c in self.all_conns:
                c.flush()
            await asyncio.sleep(0.01)

    async def _close_all(self) -> None:
        for t in list(self._bg):
            t.cancel()
        for t in list(self._bg):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for d in self.devices:
            c = self.conns.get(d.index)
            if d.fmt == "sparkplug" and c is not None and c.connected:
                # A node going offline on purpose says so with its NDEATH first.
                c.publish(self._topic(d.sparkplug_topic("NDEATH")), d.sparkplug_death(), 0, None)
                c.flush()
        await asyncio.gather(*(c.disconnect() for c in self.all_conns))

    def close_truth(self) -> dict[str, Any]:
        """Write the truth file (when configured) and return its summary."""
        return self.truth.close()

