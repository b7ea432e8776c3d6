"""The ingest loop: source → decoder → per-partition batch → one MULTI of XADDs → ack.

Guarantees:

- A frame is acknowledged upstream only after the transaction holding its
  readings (or its dead letter) has been executed by Redis. When Redis refuses
  (down, out of memory) the loop keeps the batch, stops acknowledging and
  retries with capped, jittered backoff; the broker keeps everything else.
- A frame seen before (the broker redelivering after a crash of this
  process, or a device repeating a message) is recognised by a fingerprint of
  its topic and payload and is acknowledged without being written twice. The
  fingerprints of every transaction are written in the same MULTI to a capped
  log (``<prefix>:acklog:<source>``), so a restarted process knows what the
  last one wrote but may not have acknowledged.
- Audit counters (received, decoded, dead-lettered, written) per source and
  minute are incremented in the same MULTI, so they are exact across crashes.
- Undecodable payloads go raw, with the reason, to the dead-letter stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from typing import Any

import redis

from sensorhub.config import Settings
from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.errors import DecodeError
from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.lag import LagAlarm, stream_states
from sensorhub.pipeline.streams import (
    F_BLOCK,
    F_KIND,
    F_SOURCE,
    KIND_READINGS,
    KIND_TRADES,
    StreamLayout,
    encode_block,
)
from sensorhub.pipeline.tradecodec import encode_trades
from sensorhub.service import notify
from sensorhub.sources.base import Source

__all__ = ["Ingest"]

log = logging.getLogger(__name__)

ACKLOG_ENTRIES = 4096  # transactions remembered in the capped dedup log


def fingerprint(topic: str, payload: bytes) -> bytes:
    h = hashlib.blake2b(payload, digest_size=12, key=topic.encode()[:64])
    return h.digest()


class Ingest:
    """Runs one source into Redis until ``stop`` is set."""

    def __init__(self, settings: Settings, source: Source, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.source = source
        self.name = source.name
        self.layout = StreamLayout(settings.redis.prefix, settings.redis.partitions)
        self.metrics = metrics or Metrics("ingest", source.name)
        self.redis: Any = redis.Redis.from_url(
            settings.redis.url,
            socket_timeout=settings.redis.socket_timeout_s,
            socket_connect_timeout=settings.redis.socket_timeout_s,
        )
        self.stop_event = threading.Event()
        cfg = settings.ingest
        self.flush_rows = cfg.flush_rows
        self.flush_s = cfg.flush_ms / 1000.0
        self._trades = source.kind == "trade"
        self._new_batch = TradeBatch if self._trades else self._reading_batch_factory()
        self._batches: dict[int, Any] = {}
        self._rows = 0
        self._tokens: list[Any] = []
        self._fps: list[bytes] = []
        self._fps_pending: set[bytes] = set()
        self._dead: list[dict[bytes, Any]] = []
        self._audit: dict[int, dict[str, int]] = {}
        self._first_ns = 0
        self._frame_recv: list[int] = []
        self._window: deque[bytes] = deque()
        self._seen: set[bytes] = set()
        self._window_max = max(cfg.max_inflight_frames, settings.mqtt.receive_maximum) * 4
        self._lag_alarm = LagAlarm(self.metrics, self.redis, self.layout.events, settings.writer.lag_alert_s)
        self._wd = notify.Watchdog()
        self._last_pub = 0.0
        self._last_hops = time.monotonic()
        self._metrics_key = self.layout.metrics_key(self.metrics.process)

    @staticmethod
    def _reading_batch_factory() -> Any:
        from sensorhub.decoders import ReadingBatch

        return ReadingBatch

    # ---- dedup window ----
    def _remember(self, fps: list[bytes]) -> None:
        w, s = self._window, self._seen
        for fp in fps:
            if fp not in s:
                s.add(fp)
                w.append(fp)
        while len(w) > self._window_max:
            s.discard(w.popleft())

    def _load_acklog(self) -> None:
        """Fingerprints of the last transactions, written by this source's earlier run."""
        entries = self.redis.xrevrange(self.layout.acklog(self.name), count=ACKLOG_ENTRIES)
        fps: list[bytes] = []
        for _id, fields in reversed(entries):
            blob = fields.get(b"f", b"")
            fps.extend(blob[i : i + 12] for i in range(0, len(blob), 12))
        self._remember(fps)
        log.info("loaded %d recent frame fingerprints of source %s", len(fps), self.name)

    # ---- the loop ----
    def run(self) -> int:
        src = self.source
        backoff = self.settings.ingest.backoff
        delay = backoff.initial_s
        wd = self._wd
        while not self.stop_event.is_set():
            wd.tick()
            try:
                self._load_acklog()
                break
            except redis.RedisError as exc:
                log.warning("Redis not reachable (%s); retrying in %.1f s", exc, delay)
                self.stop_event.wait(delay * random.random() + delay / 2)
                delay = min(delay * backoff.factor, backoff.max_s)
        src.start()
        ready_sent = False
        while not self.stop_event.is_set():
            timeout = self.flush_s if not self._first_ns else max(0.0, self.flush_s - (time.time_ns() - self._first_ns) / 1e9)
            frames = src.get(4096, timeout)
            if frames:
                self._take(frames)
            if self._tokens or self._dead or self._rows:
                age = (time.time_ns() - self._first_ns) / 1e9 if self._first_ns else 0.0
                if self._rows >= self.flush_rows or age >= self.flush_s or not frames:
                    self._flush_with_retry()
            if not ready_sent and src.ready():
                notify.ready(f"{self.name} connected")
                ready_sent = True
            self._periodic()
        # drain: whatever was taken is written and acknowledged before exit
        notify.stopping()
        for f in src.get(1 << 20, 0.0):
            self._take([f])
        if self._tokens or self._dead or self._rows:
            self._flush_with_retry(give_up_after_s=10.0)
        src.stop()
        return 0

    def _periodic(self) -> None:
        """Watchdog and metrics: from the work loop and from inside write retries alike."""
        self._wd.tick()
        now = time.monotonic()
        if now - self._last_pub >= self.settings.metrics.publish_interval_s:
            self._last_pub = now
            self._check_lag()
            self._publish_metrics(self._metrics_key)
        if now - self._last_hops >= self.settings.writer.hop_latency_interval_s:
            self._last_hops = now
            self._post_hop_latency()

    def _take(self, frames: list[Any]) -> None:
        src = self.source
        seen = self._seen
        m = self.metrics
        for f in frames:
            minute = f.recv_ns // 60_000_000_000
            audit = self._audit.get(minute)
            if audit is None:
                audit = self._audit[minute] = {"received": 0, "decoded": 0, "dead_lettered": 0, "xadded": 0, "duplicates": 0}
            audit["received"] += 1
            fp = fingerprint(f.topic, f.payload)
            if fp in seen or fp in self._fps_pending:
                audit["duplicates"] += 1
                m.inc("duplicates")
                self._tokens.append(f.ack_token)
                if not self._first_ns:
                    self._first_ns = time.time_ns()
                continue
            if not self._first_ns:
                self._first_ns = time.time_ns()
            self._fps.append(fp)
            self._fps_pending.add(fp)
            self._tokens.append(f.ack_token)
            self._frame_recv.append(f.recv_ns)
            route = src.decoder_for(f.topic)
            if route is None:
                self._dead_letter(f, "unknown format: no decoder serves this topic", audit)
                continue
            decoder, device = route
            key = device or f.topic
            p = self.layout.partition(key)
            batch = self._batches.get(p)
            if batch is None:
                batch = self._batches[p] = self._new_batch()
            if len(f.payload) > self.settings.mqtt.max_payload_bytes:
                self._dead_letter(f, f"payload of {len(f.payload)} bytes over mqtt.max_payload_bytes", audit)
                continue
            try:
                n = decoder.decode(device, f.payload, f.recv_ns, batch)
            except DecodeError as exc:
                self._dead_letter(f, f"{type(exc).__name__}: {exc}", audit)
                continue
            audit["decoded"] += n
            self._rows += n
        m.inc("frames", len(frames))

    def _dead_letter(self, f: Any, reason: str, audit: dict[str, int]) -> None:
        audit["dead_lettered"] += 1
        self.metrics.inc("dead_letters")
        self.metrics.set("last_dead_letter", reason[:200])
        self._dead.append(
            {
                b"src": self.name.encode(),
                b"topic": f.topic.encode(),
                b"payload": f.payload,
                b"error": reason.encode(),
                b"recv_ns": str(f.recv_ns).encode(),
            }
        )

    def _flush_with_retry(self, give_up_after_s: float | None = None) -> None:
        backoff = self.settings.ingest.backoff
        delay = backoff.initial_s
        started = time.monotonic()
        txid = uuid.uuid4().bytes
        full = False
        while True:
            try:
                self._flush(txid)
                if delay != backoff.initial_s:
                    log.info("Redis accepts writes again")
                    self.metrics.set("redis_ok", True)
                return
            except redis.RedisError as exc:
                self.metrics.inc("redis_errors")
                self.metrics.set("redis_ok", False)
                log.warning("XADD failed (%s: %s); not acknowledging, retrying in ~%.2f s", type(exc).__name__, exc, delay)
                if self._landed(txid):
                    self._after_flush()
                    return
                # A full Redis frees memory as writers trim (every writer.trim_interval_s),
                # not after a long outage: keep retrying at about that pace.
                full = "OOM" in str(exc) or isinstance(exc, redis.exceptions.OutOfMemoryError)
            self._periodic()
            if give_up_after_s is not None and time.monotonic() - started > give_up_after_s:
                log.error("giving up on %d unwritten frames at shutdown; the broker will redeliver them", len(self._tokens))
                return
            if self.stop_event.wait(delay * (0.5 + random.random() / 2)) and give_up_after_s is None:
                # stopping: leave the frames unacknowledged; the broker redelivers
                return
            cap = min(backoff.max_s, self.settings.writer.trim_interval_s / 2) if full else backoff.max_s
            delay = min(delay * backoff.factor, cap)

    def _landed(self, txid: bytes) -> bool:
        """After an error: did the transaction execute anyway (reply lost)?"""
        try:
            for _id, fields in self.redis.xrevrange(self.layout.acklog(self.name), count=16):
                if fields.get(b"tx") == txid:
                    return True
        except redis.RedisError:
            pass
        return False

    def _flush(self, txid: bytes) -> None:
        decode_ns = time.time_ns()
        name = self.name.encode()
        kind = KIND_TRADES if self._trades else KIND_READINGS
        pipe = self.redis.pipeline(transaction=True)
        n_entries = 0
        for p, batch in self._batches.items():
            if not len(batch):
                continue
            block = encode_trades(batch, decode_ns) if self._trades else encode_block(batch, decode_ns)
            stream = self.layout.trades(p) if self._trades else self.layout.readings(p)
            pipe.xadd(stream, {F_BLOCK: block, F_SOURCE: name, F_KIND: kind})
            n_entries += 1
        for d in self._dead:
            pipe.xadd(self.layout.dlq, d)
        if self._fps:
            pipe.xadd(
                self.layout.acklog(self.name),
                {b"f": b"".join(self._fps), b"tx": txid},
                maxlen=ACKLOG_ENTRIES,
                approximate=True,
            )
        rows = 0
        for minute, counts in self._audit.items():
            key = self.layout.audit_key(self.name, minute)
            counts["xadded"] = counts["decoded"]  # decoded readings go out in this same MULTI
            for field, v in counts.items():
                if v:
                    pipe.hincrby(key, field, v)
            pipe.expire(key, 14 * 86400)
        for batch in self._batches.values():
            rows += len(batch)
        pipe.execute()
        done = time.time_ns()
        m = self.metrics
        m.record_us("decode_to_xadd", (done - decode_ns) / 1000)
        for r in self._frame_recv:
            m.record_us("recv_to_xadd", (done - r) / 1000)
        m.inc("readings" if not self._trades else "trades", rows)
        m.inc("entries", n_entries)
        self._after_flush()

    def _after_flush(self) -> None:
        self.source.ack(self._tokens)
        self.metrics.inc("acked", len(self._tokens))
        self._remember(self._fps)
        self._tokens = []
        self._fps = []
        self._fps_pending = set()
        self._dead = []
        self._audit = {}
        self._frame_recv = []
        for b in self._batches.values():
            b.clear()
        self._rows = 0
        self._first_ns = 0

    def _post_hop_latency(self) -> None:
        """This interval's hop percentiles, for the writer to store in ``hop_latency``."""
        start, secs, stats = self.metrics.take_interval()
        stats = {hop: st for hop, st in stats.items() if st["count"]}
        if not stats:
            return
        doc = {"process": self.metrics.process, "start": start, "seconds": secs, "hops": stats}
        try:
            self.redis.xadd(self.layout.hops, {"d": json.dumps(doc)}, maxlen=10_000, approximate=True)
        except redis.RedisError:
            pass  # latency history is best effort; the data path is not

    def _check_lag(self) -> None:
        """Watch the writers from this side too: a stuck or dead writer cannot raise its own alert."""
        streams = [self.layout.trades(p) if self._trades else self.layout.readings(p) for p in range(self.layout.partitions)]
        try:
            self._lag_alarm.update(stream_states(self.redis, streams))
        except redis.RedisError:
            pass

    def _publish_metrics(self, key: str) -> None:
        h = self.source.health
        m = self.metrics
        m.set("connected", h.connected)
        m.set("reconnects", h.reconnects)
        m.set("last_frame_age_s", (time.time_ns() - h.last_frame_ns) / 1e9 if h.last_frame_ns else None)
        m.set("gaps", h.gaps)
        m.set("kind", self.source.kind)
        try:
            snap = m.publish(self.redis, key, self.settings.metrics.ttl_s)
        except redis.RedisError:
            return
        rates = snap["rates"]
        state: Any = "draining" if self.stop_event.is_set() else (
            "connected" if h.connected else ("reconnecting" if h.reconnects else "connecting")
        )
        unit: Any = "trades" if self._trades else "readings"
        notify.status(
            notify.format_status(
                notify.IngestStatus(
                    source=self.name,
                    state=state,
                    rate=float(rates.get(unit, 0.0)),
                    acked=int(snap["counters"].get(unit, 0)),
                    dead_letters=int(snap["counters"].get("dead_letters", 0)),
                    unit=unit,
                )
            )
        )
