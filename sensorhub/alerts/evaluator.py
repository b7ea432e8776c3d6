"""``sensorhub alerts evaluate``: the rules over the live reading streams, each event emitted once.

A consumer group of its own (``alerts.group``) on every reading partition, so
the writer's group is neither slowed nor skipped, and the writer's trim (the
lowest id any group still needs, :mod:`sensorhub.pipeline.lag`) keeps every
entry this group has not acknowledged.

Per XREADGROUP: decode each entry's block, evaluate (:mod:`sensorhub.alerts.engine`),
and emit the events with one Lua script that, per event, checks its position
against the last one emitted for its series (hash ``last``) and only then
appends it to the events stream, publishes it on the channel, adds it to (or
removes it from) the open alerts and counts it. Every ``alerts.checkpoint_ms``
one script saves the engine's whole state (``checkpoint``: msgpack,
zstd-compressed) with, per stream, the last entry it holds (``positions``),
and acknowledges the entries (on a single Redis in the same script; on Redis
Cluster, where the reading streams are in other slots than ``{alerts}``, right
after it, per slot). A restarted evaluator (or one that lost Redis) loads
the checkpoint, re-reads its pending entries, acknowledges without
evaluating those the checkpoint already holds (up to its position), and
evaluates the others again: the events they give have positions already
emitted and are skipped. Nothing is missed (the entries were not
acknowledged), nothing is counted twice in the state, and nothing repeats. Once the
pending entries are replayed, an alert open in Redis that the engine does not
hold open (its rule changed or is gone) is closed.

A thread stores the events in ClickHouse's ``alerts`` table: consumer group
``store`` on the events stream, one INSERT per batch with an
``insert_deduplication_token`` derived from the batch's entry ids. Batches
are read one at a time and acknowledged before the next, so a restarted
store re-reads exactly its last batch and repeats its token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
from collections import defaultdict
from typing import Any

import msgspec
import redis
import zstandard

from sensorhub.alerts.engine import Engine
from sensorhub.alerts.keys import AlertKeys
from sensorhub.config import Settings
from sensorhub.errors import ConfigError, DecodeError, SensorhubError, SinkError
from sensorhub.metrics import hops
from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.lag import id_tuple
from sensorhub.pipeline.redisconn import is_cluster, redis_client
from sensorhub.pipeline.slots import read_group
from sensorhub.pipeline.streams import F_BLOCK, F_KIND, KIND_READINGS, decode_block
from sensorhub.service import notify
from sensorhub.service.lifecycle import Lifecycle

__all__ = ["STORE_GROUP", "Evaluator", "Store", "series_field"]

log = logging.getLogger(__name__)

#: consumer group of the ClickHouse store on the events stream
STORE_GROUP = "store"

# KEYS: last, events, open, counts. ARGV: channel, events maxlen, then 6 per event:
# series field, position ('' = after whatever was last), alert id, state, severity, JSON.
_EMIT_SCRIPT = """#!lua flags=allow-oom
local out = {}
for i = 3, #ARGV, 6 do
  local field, pos, id, state, sev, ev = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local last = redis.call('HGET', KEYS[1], field)
  if pos == '' then pos = (last or '') .. '+' end
  if (not last) or pos > last then
    redis.call('HSET', KEYS[1], field, pos)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ev)
    redis.call('PUBLISH', ARGV[1], ev)
    if state == 'open' then
      if redis.call('HSET', KEYS[3], id, ev) == 1 then
        redis.call('HINCRBY', KEYS[4], 'open:' .. sev, 1)
      end
      redis.call('HINCRBY', KEYS[4], 'opened:' .. sev, 1)
    else
      if redis.call('HDEL', KEYS[3], id) == 1 then
        redis.call('HINCRBY', KEYS[4], 'open:' .. sev, -1)
      end
      redis.call('HINCRBY', KEYS[4], 'closed:' .. sev, 1)
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: checkpoint, last, positions, then the streams acknowledged here (a single Redis;
# on a cluster they are in other slots and acknowledged after). ARGV: state, group,
# n evicted, the evicted series fields, then per stream: its name, its index in KEYS
# (0: not acknowledged here), n, ids. The state and its positions land together.
_CHECKPOINT_SCRIPT = """#!lua flags=allow-oom
redis.call('SET', KEYS[1], ARGV[1])
local group, n = ARGV[2], tonumber(ARGV[3])
local i = 4
for j = 1, n do
  redis.call('HDEL', KEYS[2], ARGV[i])
  i = i + 1
end
while i <= #ARGV do
  local name, key, k = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  redis.call('HSET', KEYS[3], name, ARGV[i + 2 + k])
  if key > 0 then
    for lo = 1, k, 1000 do  -- unpack() is bounded by Lua's stack: a thousand at a time
      local ids = {}
      for j = lo, math.min(k, lo + 999) do ids[#ids + 1] = ARGV[i + 2 + j] end
      redis.call('XACK', KEYS[key], group, unpack(ids))
    end
  end
  i = i + 3 + k
end
return 1
"""
# allow-oom, both: when Redis is full (noeviction) the evaluator must still acknowledge,
# or the writer could never trim below the entries this group holds and memory never frees.


def series_field(rule: str, device: str, metric: str) -> str:
    return f"{rule}\0{device}\0{metric}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Evaluator:
    """Evaluates the configured rules on the reading streams until ``life.stop`` is set."""

    def __init__(self, settings: Settings, life: Lifecycle | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.cfg = settings.alerts
        if not self.cfg.rules:
            raise ConfigError("alerts.rules", "at least one [[alerts.rules]] table")
        self.layout = StreamLayout(settings.redis.prefix, settings.redis.partitions)
        self.keys = AlertKeys(self.layout)
        self.streams = [self.layout.readings(p) for p in range(self.layout.partitions)]
        self.group = self.cfg.group
        self.consumer = self.cfg.consumer
        self.life = life or Lifecycle("alerts evaluate")
        self.metrics = metrics or Metrics("alerts", self.consumer)
        self.redis: Any = redis_client(
            settings.redis,
            socket_timeout=max(settings.redis.socket_timeout_s, self.cfg.tick_ms / 1000 + 5),
            socket_connect_timeout=settings.redis.socket_timeout_s,
        )
        self.cluster = is_cluster(self.redis)
        self._emit = self.redis.register_script(_EMIT_SCRIPT)
        self._save = self.redis.register_script(_CHECKPOINT_SCRIPT)
        w = settings.writer
        self._device_time = (int(w.device_time_max_past_s * 1e6), int(w.device_time_max_future_s * 1e6))
        self.engine = self._new_engine()
        self._unacked: dict[str, list[bytes]] = defaultdict(list)
        self._zstd = zstandard.ZstdCompressor(level=1)
        self.state = "starting"
        self.store: Store | None = None

    def _new_engine(self) -> Engine:
        return Engine(self.cfg.rules, self.cfg.max_series, self.cfg.rate_samples, self._device_time)

    # ---- the process ----
    def run(self, with_store: bool = True) -> int:
        if with_store:
            self.store = Store(self.settings, self.life.stop, self.metrics)
            self.store.start()
        stop = self.life.stop
        b = self.settings.writer.backoff
        delay = b.initial_s
        while not stop.is_set():
            try:
                self._ensure_groups()
                self._start()
                delay = b.initial_s
                self.life.ready(f"alerts: {len(self.cfg.rules)} rules, {len(self.engine.open_alerts())} open")
                self._live()
            except redis.RedisError as exc:
                self.state = "waiting"
                self.metrics.inc("redis_errors")
                log.warning("Redis failed (%s); starting again from the checkpoint in ~%.1f s", exc, delay)
                self.life.watchdog.tick()
                stop.wait(delay * (0.5 + random.random() / 2))
                delay = min(delay * b.factor, b.max_s)
        notify.stopping("alerts evaluator: saving its state")
        try:
            self._checkpoint()
        except redis.RedisError as exc:
            log.warning("final checkpoint failed (%s); the next start re-reads since the last one", exc)
        if self.store is not None:
            self.store.join(10)
        self._publish_metrics()
        return 0

    def _ensure_groups(self) -> None:
        for s in self.streams:
            try:
                # "$": alerts are about live readings; from then on the group misses nothing
                self.redis.xgroup_create(s, self.group, id="$", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _start(self) -> None:
        """Load the checkpoint, replay the pending entries, close what is open only in Redis."""
        self.state = "replaying"
        self.engine = self._new_engine()
        self._unacked.clear()
        raw = self.redis.get(self.keys.checkpoint)
        held: dict[str, tuple[int, int]] = {}  # per stream, the last entry the checkpoint holds
        if raw:
            try:
                n = self.engine.restore(msgspec.msgpack.decode(zstandard.ZstdDecompressor().decompress(raw)))
                held = {_s(k): id_tuple(v) for k, v in self.redis.hgetall(self.keys.positions).items()}
            except (msgspec.DecodeError, zstandard.ZstdError, ValueError, TypeError) as exc:
                log.error("the alert checkpoint does not load (%s); starting without state", exc)
                n = 0
            log.info("alert state restored: %d series", n)
        cursors = dict.fromkeys(self.streams, "0")
        replayed = 0
        while cursors and not self.life.stop.is_set():
            resp = read_group(self.redis, self.group, self.consumer, cursors, self.cfg.read_count, None)
            got = {_s(st): entries for st, entries in resp or []}
            for stream in list(cursors):
                entries = got.get(stream) or []
                if not entries:
                    del cursors[stream]
                    continue
                cursors[stream] = _s(entries[-1][0])
                replayed += len(entries)
            self._send(self._evaluate(resp, held))
            self.life.watchdog.tick()
        if replayed:
            log.info("replayed %d pending entries", replayed)
        self.metrics.inc("entries_replayed", replayed)
        self._reconcile_open()
        self._checkpoint()

    def _reconcile_open(self) -> None:
        held = self.engine.open_alerts()
        closes = []
        now = time.time()
        for aid, raw in self.redis.hscan_iter(self.keys.open, count=1000):
            aid_s = _s(aid)
            if aid_s in held:
                continue
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"id": aid_s, "rule": "?", "device": "?", "metric": "?", "severity": "warning"}
            ev.update(state="closed", value=None, ts=now, recv=now, closed=now, pos="",
                      reason="its rule changed or is no longer configured")
            closes.append(ev)
        if closes:
            log.info("closing %d alerts whose rule changed or is gone", len(closes))
            self._send(closes)

    def _live(self) -> None:
        self.state = "evaluating"
        stop = self.life.stop
        streams = dict.fromkeys(self.streams, ">")
        tick_s, ckpt_s = self.cfg.tick_ms / 1000, self.cfg.checkpoint_ms / 1000
        pub_s = self.settings.metrics.publish_interval_s
        next_tick = next_ckpt = next_pub = 0.0
        interval_s = self.cfg.read_interval_ms / 1000
        last_read = 0.0
        while not stop.is_set():
            # entries arrive a few per millisecond under load: reading each as it comes costs
            # more than the evaluation; at most one read per interval, unless behind
            wait = last_read + interval_s - time.monotonic()
            if wait > 0:
                stop.wait(wait)
            last_read = time.monotonic()
            resp = read_group(self.redis, self.group, self.consumer, streams, self.cfg.read_count,
                              self.cfg.tick_ms, wait=stop.wait)
            caught_up = all(len(entries) < self.cfg.read_count for _s_b, entries in resp or [])
            self._send(self._evaluate(resp))
            now = time.monotonic()
            if caught_up and now >= next_tick:
                next_tick = now + tick_s
                self._send(self.engine.tick(time.time_ns() // 1000))
            if now >= next_ckpt:
                next_ckpt = now + ckpt_s
                self._checkpoint()
            if now >= next_pub:
                next_pub = now + pub_s
                self._publish_metrics()
                if self.store is not None and not self.store.is_alive() and not stop.is_set():
                    # a bug, not a peer away (those it waits out): stop, so that the supervisor restarts us
                    raise SensorhubError(f"the alert store stopped: {self.store.failure}")
            self.life.watchdog.tick()

    def _evaluate(self, resp: list[Any], held: dict[str, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
        """Decode the entries of one XREADGROUP reply (every stream) and evaluate them in one batch;
        entries up to ``held`` (per stream) are in the restored state already: only acknowledged."""
        batch: list[tuple[str, Any]] = []
        n = 0
        for stream_b, entries in resp or []:
            stream = _s(stream_b)
            unacked = self._unacked[stream]
            upto = (held or {}).get(stream)
            n += len(entries)
            for entry_id, fields in entries:
                unacked.append(entry_id)
                if upto is not None and id_tuple(entry_id) <= upto:
                    continue
                if not fields or fields.get(F_KIND, KIND_READINGS) != KIND_READINGS:
                    continue
                try:
                    batch.append((_s(entry_id), decode_block(fields[F_BLOCK])))
                except (DecodeError, KeyError) as exc:
                    # the writer dead-letters it; nothing here to evaluate
                    self.metrics.inc("entries_undecodable")
                    log.debug("entry %s of %s does not decode: %s", _s(entry_id), stream, exc)
        engine = self.engine
        before = engine.readings
        events = engine.process_entries(batch) if batch else []
        self.metrics.inc("entries", n)
        self.metrics.inc("readings", engine.readings - before)
        return events

    def _send(self, events: list[dict[str, Any]]) -> None:
        """Emit events (each once: the script skips positions already emitted for the series)."""
        if not events:
            return
        now = time.time()
        args: list[Any] = [self.keys.channel, self.cfg.events_maxlen]
        for ev in events:
            ev["evaluated"] = now
            for k in ("value", "threshold", "limit", "open_value"):
                v = ev.get(k)
                if isinstance(v, float) and not math.isfinite(v):
                    ev[k] = None  # JSON has no infinity; a frame may carry one
            args += [series_field(ev["rule"], ev["device"], ev["metric"]), ev["pos"], ev["id"], ev["state"],
                     ev["severity"], json.dumps(ev, allow_nan=False)]
        done = self._emit(keys=[self.keys.last, self.keys.events, self.keys.open, self.keys.counts], args=args)
        m = self.metrics
        now_us = time.time_ns() / 1000
        for ev, new in zip(events, done, strict=True):
            if int(new):
                m.inc(f"{ev['state']}_{ev['severity']}")
                if ev["state"] == "open" and ev["kind"] != "silent_s":
                    m.record_us(hops.RECV_TO_ALERT, now_us - ev["recv"] * 1e6)
            else:
                m.inc("events_repeated")  # re-evaluated after a restart: already emitted

    def _checkpoint(self) -> None:
        """Save the engine's state with the position of every stream it has seen, and acknowledge
        the entries: in the same script on a single Redis, right after it per slot on a cluster."""
        eng = self.engine
        blob = self._zstd.compress(msgspec.msgpack.encode(eng.snapshot()))  # rate samples: ~3x smaller
        args: list[Any] = [blob, self.group, len(eng.evicted), *(series_field(*k) for k in eng.evicted)]
        keys = [self.keys.checkpoint, self.keys.last, self.keys.positions]
        acked = 0
        for stream, ids in self._unacked.items():
            if ids:
                index = 0
                if not self.cluster:
                    keys.append(stream)
                    index = len(keys)
                args += [stream, index, len(ids), *ids]
                acked += len(ids)
        self._save(keys=keys, args=args)
        if self.cluster:
            # the state holds these entries now (its positions say so): a crash before the
            # acknowledgements only means a restart acknowledges them without evaluating
            pipe = self.redis.pipeline(transaction=False)
            for stream, ids in self._unacked.items():
                for lo in range(0, len(ids), 1000):
                    pipe.xack(stream, self.group, *ids[lo : lo + 1000])
            pipe.execute()
        self._unacked.clear()
        self.metrics.inc("series_evicted", len(eng.evicted))
        eng.evicted.clear()
        self.metrics.set("checkpoint_bytes", len(blob))
        self.metrics.inc("acked", acked)

    def _publish_metrics(self) -> None:
        m, eng = self.metrics, self.engine
        m.set("state", self.state)
        m.set("rules", len(self.cfg.rules))
        m.set("series", len(eng.series) + len(eng.silences))
        m.set("readings_evaluated", eng.readings)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for s in self.streams:
                pipe.xinfo_groups(s)
            lag = pending = 0
            for groups in pipe.execute(raise_on_error=False):
                if isinstance(groups, Exception):
                    continue
                for g in groups:
                    if _s(g.get("name")) == self.group:
                        lag += int(g.get("lag") or 0)
                        pending += int(g.get("pending") or 0)
            m.set("backlog_entries", lag)
            m.set("pending_entries", pending)
            m.publish(self.redis, self.layout.metrics_key(m.process), self.settings.metrics.ttl_s)
        except redis.RedisError:
            pass  # metrics are best effort; the loop finds out about Redis itself


class Store(threading.Thread):
    """Moves alert events from the events stream into the ``alerts`` table, each once."""

    def __init__(self, settings: Settings, stop: threading.Event, metrics: Metrics) -> None:
        super().__init__(name="alerts-store", daemon=True)
        self.settings = settings
        self.stop = stop
        self.metrics = metrics
        self.keys = AlertKeys(StreamLayout(settings.redis.prefix, settings.redis.partitions))
        self.redis: Any = redis_client(settings.redis, socket_timeout=settings.redis.socket_timeout_s + 2,
                                               socket_connect_timeout=settings.redis.socket_timeout_s)
        self.db = settings.clickhouse.database
        self.ch: Any = None
        self.stored = 0
        self.failure = ""

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("the alert store stopped")
            raise

    def _run(self) -> None:
        b = self.settings.writer.backoff
        delay = b.initial_s
        pending = True
        while not self.stop.is_set():
            try:
                if self.ch is None:
                    self._connect()
                n = self._one_batch("0" if pending else ">")
                if pending and n == 0:
                    pending = False
                delay = b.initial_s
                self.metrics.set("store_ok", True)
                if 0 < n < self.settings.alerts.store_batch:
                    # one INSERT per interval at most: each costs ClickHouse a part
                    self.stop.wait(self.settings.alerts.store_interval_ms / 1000)
            except Exception as exc:  # Redis or ClickHouse away: wait, then the same batch again
                if not isinstance(exc, redis.RedisError | SinkError | OSError) and not _clickhouse_error(exc):
                    raise
                self.metrics.set("store_ok", False)
                self.metrics.inc("store_retries")
                log.warning("storing alerts failed (%s); retrying in ~%.1f s", str(exc).splitlines()[0][:300], delay)
                self.ch = None
                pending = True  # re-read the batch in flight with the same token
                self.stop.wait(delay * (0.5 + random.random() / 2))
                delay = min(delay * b.factor, b.max_s)

    def _connect(self) -> None:
        from sensorhub.sinks import schema
        from sensorhub.sinks.clickhouse import connect

        try:
            self.redis.xgroup_create(self.keys.events, STORE_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        ch = connect(self.settings.clickhouse, database="default")
        schema.apply_schema(ch, self.db, self.settings.clickhouse.cluster)
        self.ch = ch

    def _one_batch(self, start: str) -> int:
        cfg = self.settings.alerts
        resp = self.redis.xreadgroup(STORE_GROUP, "store", {self.keys.events: start}, count=cfg.store_batch,
                                     block=None if start == "0" else 1000)
        entries = resp[0][1] if resp else []
        if not entries:
            return 0
        rows, ids = [], []
        for entry_id, fields in entries:
            ids.append(entry_id)
            raw = fields.get(b"e") if fields else None
            if raw:
                try:
                    rows.append(_row(json.loads(raw)))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("alert event %s is not storable (%s); skipped", _s(entry_id), exc)
        if rows:
            token = hashlib.sha1(b"\1".join(ids)).hexdigest()
            self.ch.insert(
                f"{self.db}.alerts", rows, column_names=list(_COLUMNS),
                settings={"insert_deduplication_token": f"alerts-{token}", "insert_deduplicate": 1},
            )
        self.redis.xack(self.keys.events, STORE_GROUP, *ids)
        self.stored += len(rows)
        self.metrics.inc("stored", len(rows))
        return len(entries)


_COLUMNS = ("id", "rule", "kind", "device", "metric", "severity", "state", "opened", "closed", "value",
            "close_value", "threshold")
_EPOCH = 0.0


def _dt(seconds: float | None) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds if seconds is not None else _EPOCH, UTC)


def _num(v: Any) -> float:
    return float(v) if v is not None else math.nan


def _row(ev: dict[str, Any]) -> list[Any]:
    """The ``alerts`` row of one event: the open row, or the closed row that replaces it."""
    closed = ev["state"] == "closed"
    return [
        ev["id"], ev["rule"], ev.get("kind", ""), ev["device"], ev["metric"], ev["severity"], ev["state"],
        _dt(ev.get("opened")), _dt(ev.get("closed") if closed else None),
        _num(ev.get("open_value") if closed else ev.get("value")),
        _num(ev.get("value")) if closed and ev.get("value") is not None else None,
        _num(ev.get("limit", ev.get("threshold"))),
    ]


def _clickhouse_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".", 1)[0] == "clickhouse_connect"
