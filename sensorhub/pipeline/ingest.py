"""The ingest loop: source → decoder → per-partition batch → one MULTI of XADDs → ack.

Guarantees:

- A frame is acknowledged upstream only after the transaction holding its
  readings (or its dead letter) has been executed by Redis. When Redis refuses
  (down, out of memory) the loop keeps the batch, stops acknowledging and
  retries with capped, jittered backoff; the broker keeps everything else.
- A redelivery is recognised by what the transport says, never by payload
  content alone (two identical payloads published as two messages are two
  readings; one without a time takes its receive time):

  * MQTT redelivers a QoS 1 message it had sent and not had acknowledged
    with the DUP flag and its original packet id. Such a frame is already
    written when its *delivery fingerprint* (session, packet id, topic,
    payload) is among the last frames written: a redelivered message was
    in flight, and at most ``mqtt.receive_maximum`` are, so the window is
    a small multiple of that (and below the 65,535 packet ids a broker
    goes through before it can reuse one for the same content).
  * A payload whose every reading carries the device's own time collapses
    on the natural key (device, metric, ts, seq) anyway: its *content
    fingerprint* (topic and payload) catches a device's or the broker's
    resend of the same readings as a new message (a publisher
    retransmitting after the broker restarted). Exchange frames carry the
    venue's trade ids and times, so they are always content-checked.
  * A topic's retained message that the broker hands to a new subscription
    (MQTT 5 subscriptions ask for that only when new, so a restart with the
    session present gets none) is a new reading only if it differs from
    the last retained message stored for that topic: the content
    fingerprint of every message published retained is kept per topic in
    ``<prefix>:retained:{<p>}:<source>``.

  The fingerprints of every transaction are written in the same MULTI to a
  capped log (``<prefix>:acklog:{<p>}:<source>``), so a restarted process knows
  what the last one wrote but may not have acknowledged.
- Audit counters (received, decoded, dead-lettered, written) per source and
  minute are incremented in the same MULTI, so they are exact across crashes.
- Undecodable payloads go raw, with the reason, to the dead-letter stream.

Everything a frame causes (its readings, its dead letter, its fingerprints,
its audit counts) is written under the hash tag of its partition, the
partition of the device its topic names (:mod:`sensorhub.pipeline.keys`). On
a single Redis one MULTI holds the whole flush; on Redis Cluster each
partition's share is a MULTI of its own (a transaction may touch one slot),
and the frames are acknowledged once every one of them executed. When the
master has replicas, each transaction is followed by ``WAIT`` and the frames
are acknowledged only once the replicas confirmed (:mod:`sensorhub.pipeline.slots`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
import uuid
from collections import defaultdict, deque
from typing import Any

import redis

from sensorhub.config import Settings
from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.errors import DecodeError
from sensorhub.metrics import hops
from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.lag import LagAlarm, id_tuple, stream_states
from sensorhub.pipeline.redisconn import redis_client
from sensorhub.pipeline.slots import ReplicaShortfall, Transactions
from sensorhub.pipeline.streams import (
    F_BLOCK,
    F_KIND,
    F_SOURCE,
    KIND_READINGS,
    KIND_TRADES,
    encode_block,
)
from sensorhub.pipeline.tradecodec import encode_trades
from sensorhub.service import notify
from sensorhub.sources.base import (
    DELIVERY_DUP,
    DELIVERY_PACKET_ID_SHIFT,
    DELIVERY_REPLAY,
    DELIVERY_RETAIN,
    Source,
)

__all__ = ["Ingest"]

log = logging.getLogger(__name__)

ACKLOG_ENTRIES = 4096  # transactions remembered in the capped dedup log (per partition)
FP_BYTES = 12
# Below the 65,535 packet ids a broker goes through before one comes back: a
# delivery fingerprint in the window is the same message, not a reused id.
DELIVERY_WINDOW_MAX = 60_000
# how long a flush waits for its replicas (WAIT) before it is retried
WAIT_TIMEOUT_MS = 1000


def content_fingerprint(topic: str, payload: bytes) -> bytes:
    """Topic and payload, whole (topics hold no NUL, so the separator is unambiguous)."""
    h = hashlib.blake2b(topic.encode(), digest_size=FP_BYTES)
    h.update(b"\x00")
    h.update(payload)
    return h.digest()


def delivery_fingerprint(session_key: bytes, content_fp: bytes, packet_id: int) -> bytes:
    """One message of one session: its packet id with its content fingerprint."""
    return hashlib.blake2b(content_fp + packet_id.to_bytes(2, "big"), digest_size=FP_BYTES, key=session_key).digest()


class _Window:
    """The last ``size`` fingerprints, in order, with O(1) membership."""

    __slots__ = ("items", "seen", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: deque[bytes] = deque()
        self.seen: set[bytes] = set()

    def __contains__(self, fp: bytes) -> bool:
        return fp in self.seen

    def add(self, fps: list[bytes]) -> None:
        items, seen = self.items, self.seen
        for fp in fps:
            if fp not in seen:
                seen.add(fp)
                items.append(fp)
        while len(items) > self.size:
            seen.discard(items.popleft())


def _split(blob: bytes) -> list[bytes]:
    return [blob[i : i + FP_BYTES] for i in range(0, len(blob), FP_BYTES)]


class Ingest:
    """Runs one source into Redis until ``stop`` is set."""

    def __init__(self, settings: Settings, source: Source, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.source = source
        self.name = source.name
        self.layout = StreamLayout(settings.redis.prefix, settings.redis.partitions)
        self.metrics = metrics or Metrics("ingest", source.name)
        self.redis: Any = redis_client(
            settings.redis,
            socket_timeout=settings.redis.socket_timeout_s,
            socket_connect_timeout=settings.redis.socket_timeout_s,
        )
        self.stop_event = threading.Event()
        cfg = settings.ingest
        self.flush_rows = cfg.flush_rows
        self.flush_s = cfg.flush_ms / 1000.0
        self._trades = source.kind == "trade"
        self._new_batch: Any = TradeBatch if self._trades else self._reading_batch_factory()
        self._batches: dict[int, Any] = {}
        self._rows = 0
        self._tokens: list[Any] = []
        # fingerprints of the frames taken since the last flush (see the module doc), per partition
        self._dfps: dict[int, list[bytes]] = defaultdict(list)
        self._dfps_pending: set[bytes] = set()
        self._cfps: dict[int, list[bytes]] = defaultdict(list)
        self._cfps_pending: set[bytes] = set()
        self._retained_pending: dict[str, tuple[int, bytes]] = {}  # topic -> (partition, fingerprint)
        self._dead: list[tuple[int, dict[bytes, Any]]] = []
        self._audit: dict[tuple[int, int], dict[str, int]] = {}  # (partition, minute) -> counts
        self._first_ns = 0
        self.flushes = 0
        self._last_recv_us = 0
        self._frame_recv: list[int] = []
        inflight = source.inflight_bound or settings.mqtt.receive_maximum
        self._delivered = _Window(min(2 * inflight + cfg.max_inflight_frames, DELIVERY_WINDOW_MAX))
        self._contents = _Window(max(cfg.max_inflight_frames, inflight) * 4)
        self._retained: dict[str, bytes] = {}
        self._session_key = hashlib.blake2b(source.session_id.encode(), digest_size=32).digest()
        self._content_always = self._trades  # exchange frames carry the venue's ids and times
        self._lag_alarm = LagAlarm(self.metrics, self.redis, self.layout.events, settings.writer.lag_alert_s)
        # WAIT must return before the socket times out
        wait_ms = int(min(WAIT_TIMEOUT_MS, settings.redis.socket_timeout_s * 500))
        self.tx = Transactions(self.redis, settings.redis.min_replicas, wait_ms)
        # the partitions whose share of the flush being written was sent, and was confirmed
        self._attempted_parts: set[int] = set()
        self._confirmed_parts: set[int] = set()
        self._wd = notify.Watchdog()
        self._last_pub = 0.0
        self._last_hops = time.monotonic()
        self._metrics_key = self.layout.metrics_key(self.metrics.process)

    @staticmethod
    def _reading_batch_factory() -> Any:
        from sensorhub.decoders import ReadingBatch

        return ReadingBatch

    # ---- what the last run wrote ----
    def _load_acklog(self) -> None:
        """Fingerprints of the last transactions and the retained messages stored, from earlier runs.

        Every partition's log (and the one log of earlier releases), merged in
        the order the entries were written.
        """
        lay = self.layout
        logs = [lay.legacy_acklog(self.name)] + [lay.acklog(self.name, p) for p in range(lay.partitions)]
        entries: list[tuple[tuple[int, int], dict[bytes, bytes]]] = []
        for key in logs:
            entries += [(id_tuple(i), f) for i, f in self.redis.xrevrange(key, count=ACKLOG_ENTRIES)]
        entries.sort(key=lambda e: e[0])
        dfps: list[bytes] = []
        cfps: list[bytes] = []
        for _id, fields in entries:
            dfps.extend(_split(fields.get(b"d", b"")))
            cfps.extend(_split(fields.get(b"c", b"")))
        self._delivered.add(dfps[-self._delivered.size :])
        self._contents.add(cfps[-self._contents.size :])
        retained: dict[str, bytes] = {}
        for key in [lay.legacy_retained(self.name)] + [lay.retained(self.name, p) for p in range(lay.partitions)]:
            retained.update({k.decode(): v for k, v in self.redis.hgetall(key).items()})
        self._retained = retained
        self.tx.refresh()
        log.info(
            "source %s: %d delivery and %d content fingerprints of recent frames, %d retained topics",
            self.name, len(self._delivered.items), len(self._contents.items), len(self._retained),
        )

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
        m = self.metrics
        delivered, dpending = self._delivered, self._dfps_pending
        contents, cpending = self._contents, self._cfps_pending
        for f in frames:
            if f.recv_ns // 1000 <= self._last_recv_us:
                # Receive times are unique to the microsecond within a source: a reading
                # without a time of its own takes its receive time, and two such readings
                # of one device (a burst, a backlog after an outage) are two readings.
                f = f._replace(recv_ns=(self._last_recv_us + 1) * 1000)
            self._last_recv_us = f.recv_ns // 1000
            minute = f.recv_ns // 60_000_000_000
            # the frame's partition: of the device its topic names, else of the topic;
            # everything the frame causes is written there
            route = src.decoder_for(f.topic)
            p = self.layout.partition((route[1] if route is not None else None) or f.topic)
            audit = self._audit.get((p, minute))
            if audit is None:
                audit = self._audit[(p, minute)] = {
                    "received": 0, "decoded": 0, "dead_lettered": 0, "xadded": 0, "duplicates": 0,
                }
            audit["received"] += 1
            if not self._first_ns:
                self._first_ns = time.time_ns()
            self._tokens.append(f.ack_token)
            cfp = content_fingerprint(f.topic, f.payload)
            d = f.delivery
            dfp = None
            if d >> DELIVERY_PACKET_ID_SHIFT:
                dfp = delivery_fingerprint(self._session_key, cfp, d >> DELIVERY_PACKET_ID_SHIFT)
            if (
                (d & DELIVERY_DUP and dfp is not None and (dfp in delivered or dfp in dpending))
                or cfp in contents
                or cfp in cpending
                or (d & DELIVERY_REPLAY and self._last_retained(f.topic) == cfp)
            ):
                audit["duplicates"] += 1
                m.inc("duplicates")
                continue
            if dfp is not None:
                self._dfps[p].append(dfp)
                dpending.add(dfp)
            if d & (DELIVERY_RETAIN | DELIVERY_REPLAY):
                self._retained_pending[f.topic] = (p, cfp)
            self._frame_recv.append(f.recv_ns)
            if route is None:
                self._dead_letter(f, "unknown format: no decoder serves this topic", audit, p)
                continue
            decoder, device = route
            batch = self._batches.get(p)
            if batch is None:
                batch = self._batches[p] = self._new_batch()
            if len(f.payload) > src.max_payload_bytes:
                self._dead_letter(f, f"payload of {len(f.payload)} bytes over {src.max_payload_setting}", audit, p)
                continue
            start = len(batch)
            try:
                n = decoder.decode(device, f.payload, f.recv_ns, batch)
            except DecodeError as exc:
                self._dead_letter(f, f"{type(exc).__name__}: {exc}", audit, p)
                continue
            if n and (self._content_always or not batch.receive_stamped(start)):
                # every reading has the device's time: the same payload again is the same readings
                self._cfps[p].append(cfp)
                cpending.add(cfp)
            audit["decoded"] += n
            self._rows += n
        m.inc("frames", len(frames))

    def _last_retained(self, topic: str) -> bytes | None:
        pending = self._retained_pending.get(topic)
        return pending[1] if pending is not None else self._retained.get(topic)

    def _dead_letter(self, f: Any, reason: str, audit: dict[str, int], p: int) -> None:
        audit["dead_lettered"] += 1
        self.metrics.inc("dead_letters")
        self.metrics.set("last_dead_letter", reason[:200])
        self._dead.append(
            (p, {
                b"src": self.name.encode(),
                b"topic": f.topic.encode(),
                b"payload": f.payload,
                b"error": reason.encode(),
                b"recv_ns": str(f.recv_ns).encode(),
            })
        )

    def _flush_with_retry(self, give_up_after_s: float | None = None) -> None:
        backoff = self.settings.ingest.backoff
        delay = backoff.initial_s
        started = time.monotonic()
        txid = uuid.uuid4().bytes
        self._attempted_parts = set()
        self._confirmed_parts = set()
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
                if isinstance(exc, ReplicaShortfall):
                    self.metrics.inc("replica_waits_short")
                    log.warning("written, but %s; not acknowledging yet, checking again in ~%.2f s", exc, delay)
                else:
                    log.warning("XADD failed (%s: %s); not acknowledging, retrying in ~%.2f s",
                                type(exc).__name__, exc, delay)
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

    def _landed(self, txid: bytes, p: int) -> bool:
        """After an error: did the transaction of partition ``p`` execute anyway (reply lost)?"""
        try:
            for _id, fields in self.redis.xrevrange(self.layout.acklog(self.name, p), count=16):
                if fields.get(b"tx") == txid:
                    return True
        except redis.RedisError:
            self.tx.mark_stale()
            raise
        return False

    def _transactions(self, txid: bytes, decode_ns: int) -> tuple[list[tuple[list[int], list[list[Any]]]], int, int]:
        """The flush as transactions: one per partition on a cluster (one slot each), one in all on a
        single Redis; with the rows and stream entries it writes."""
        lay = self.layout
        name = self.name.encode()
        kind = KIND_TRADES if self._trades else KIND_READINGS
        per: dict[int, list[list[Any]]] = defaultdict(list)
        rows = n_entries = 0
        for p, batch in self._batches.items():
            if not len(batch):
                continue
            block = encode_trades(batch, decode_ns) if self._trades else encode_block(batch, decode_ns)
            stream = lay.trades(p) if self._trades else lay.readings(p)
            per[p].append(["XADD", stream, "*", F_BLOCK, block, F_SOURCE, name, F_KIND, kind])
            rows += len(batch)
            n_entries += 1
        for p, d in self._dead:
            fields = [x for kv in d.items() for x in kv]
            per[p].append(["XADD", lay.dlq(p), "MAXLEN", "~", self.settings.ingest.dlq_maxlen, "*", *fields])
        retained: dict[int, list[Any]] = defaultdict(list)
        for topic, (p, cfp) in self._retained_pending.items():
            retained[p] += [topic, cfp]
        for (p, minute), counts in self._audit.items():
            key = lay.audit_key(self.name, minute, p)
            counts["xadded"] = counts["decoded"]  # decoded readings go out in this same MULTI
            per[p] += [["HINCRBY", key, field, v] for field, v in counts.items() if v]
            per[p].append(["EXPIRE", key, 14 * 86400])
        for p, cmds in per.items():
            # every transaction leaves its id, so that a lost reply can be told from a refusal
            cmds.append(["XADD", lay.acklog(self.name, p), "MAXLEN", "~", ACKLOG_ENTRIES, "*",
                         b"d", b"".join(self._dfps.get(p, ())), b"c", b"".join(self._cfps.get(p, ())), b"tx", txid])
            if retained.get(p):
                cmds.append(["HSET", lay.retained(self.name, p), *retained[p]])
        if self.tx.cluster:
            return [([p], per[p]) for p in sorted(per)], rows, n_entries
        parts = sorted(per)
        return [(parts, [c for p in parts for c in per[p]])], rows, n_entries

    def _flush(self, txid: bytes) -> None:
        decode_ns = time.time_ns()
        groups, rows, n_entries = self._transactions(txid, decode_ns)
        todo = []
        for parts, cmds in groups:
            first = parts[0]
            if first in self._confirmed_parts:
                continue
            # Sent before (its reply lost, or its replicas short)? Then is it on the slot's
            # master now? A failover since may have lost it with the old master.
            if first in self._attempted_parts and self._landed(txid, first):
                self.tx.confirm(self.layout.sync(first))  # until the replicas hold it
                self._confirmed_parts.update(parts)
                continue
            todo.append((parts, cmds))
        for parts, _cmds in todo:
            self._attempted_parts.update(parts)
        # every partition's transaction in one round trip (a cluster: per master, with one WAIT)
        outcomes = self.tx.execute_many([(self.layout.acklog(self.name, parts[0]), cmds) for parts, cmds in todo])
        failed = None
        for (parts, _cmds), outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, Exception):
                failed = failed or outcome  # checked again at the next attempt
            else:
                self._confirmed_parts.update(parts)
        if isinstance(failed, redis.RedisError):
            raise failed
        if failed is not None:  # a socket error redis-py did not wrap
            raise redis.exceptions.ConnectionError(str(failed)) from failed
        self.flushes += 1
        cfg = self.settings.ingest
        if (
            cfg.fault_crash_after_flush
            and self.flushes >= cfg.fault_crash_after_flush
            and self._tokens
            and self.redis.set(f"{self.layout.prefix}:fault:ingest-crashed", self.name, nx=True)
        ):
            # once per keyspace, so the restarted ingest shows what the broker redelivers
            log.error("fault injection: exiting between the write to Redis and the ack (flush %d)", self.flushes)
            os._exit(70)
        done = time.time_ns()
        m = self.metrics
        m.record_us(hops.DECODE_TO_XADD, (done - decode_ns) / 1000)
        m.record_since(hops.RECV_TO_XADD, done, self._frame_recv, per_us=1000)
        m.inc("readings" if not self._trades else "trades", rows)
        m.inc("entries", n_entries)
        self._after_flush()

    def _after_flush(self) -> None:
        self.source.ack(self._tokens)
        self.metrics.inc("acked", len(self._tokens))
        for fps in self._dfps.values():
            self._delivered.add(fps)
        for fps in self._cfps.values():
            self._contents.add(fps)
        self._retained.update({topic: fp for topic, (_p, fp) in self._retained_pending.items()})
        self._tokens = []
        self._dfps = defaultdict(list)
        self._dfps_pending = set()
        self._cfps = defaultdict(list)
        self._cfps_pending = set()
        self._retained_pending = {}
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
        # an exchange feed whose trade frames keep failing to parse says why (the monitor shows it)
        m.set("parse_errors", int(h.extra.get("parse_errors") or 0))
        m.set("unhealthy", h.extra.get("unhealthy") or None)
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
