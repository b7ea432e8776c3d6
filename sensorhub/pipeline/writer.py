"""The writer: Redis Streams → ClickHouse, exactly once per row.

One consumer group over every partition stream and the dead-letter stream.
Per batch:

1. write an *intent* (``<prefix>:intent:<consumer>``: the entry ids and the
   ``insert_deduplication_token`` derived from them);
2. INSERT readings, trades and dead letters, each with that token;
3. XACK the entries and count them in the audit, in one Lua script that
   counts only entries it actually acknowledged;
4. delete the intent.

A writer killed anywhere in between leaves an intent behind. On start it
first replays its own intent with the same entries and the same token, so
the INSERT is a no-op if it had landed; then it re-reads its pending
entries. Entries a dead writer left pending for longer than
``writer.claim_idle_ms`` are claimed, the dead writer's intent first. After
acknowledgement, streams are trimmed to the oldest entry some group still
needs; nothing unacknowledged is ever trimmed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections import defaultdict
from typing import Any

import redis

from sensorhub.config import Settings
from sensorhub.errors import DecodeError, SinkError
from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.entrycodec_py import NATIVE_COLUMNS
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.lag import LagAlarm, id_tuple, stream_states
from sensorhub.pipeline.streams import (
    F_BLOCK,
    F_KIND,
    F_SOURCE,
    KIND_TRADES,
    native_block,
)
from sensorhub.pipeline.tradecodec import decode_trades
from sensorhub.service import notify
from sensorhub.sinks import schema
from sensorhub.sinks.clickhouse import connect

__all__ = ["Writer"]

log = logging.getLogger(__name__)

# allow-oom: when Redis is full (noeviction) these must still run, or nothing
# could ever be acknowledged and trimmed and the memory would never free.
_ACK_SCRIPT = """#!lua flags=allow-oom
local group = ARGV[1]
local i = 2
local acked = 0
while i <= #ARGV do
  local stream = ARGV[i]
  local id = ARGV[i + 1]
  local nspec = tonumber(ARGV[i + 2])
  local n = redis.call('XACK', stream, group, id)
  i = i + 3
  for j = 1, nspec do
    if n == 1 then
      redis.call('HINCRBY', ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]))
    end
    i = i + 3
  end
  acked = acked + n
end
return acked
"""

# Before an INSERT: keep only the entries this consumer still owns (a writer
# that was stopped may find some claimed by another meanwhile), reset their
# idle time so nobody claims them while we insert, and write the intent, all
# at once. From then on a claimer goes through the intent and its token.
_TAKE_SCRIPT = """#!lua flags=allow-oom
local group, me = ARGV[1], ARGV[2]
local owned, parts = {}, {}
for i = 3, #ARGV, 2 do
  local s, id = ARGV[i], ARGV[i + 1]
  local p = redis.call('XPENDING', s, group, id, id, 1)
  if p[1] and p[1][2] == me then
    redis.call('XCLAIM', s, group, me, 0, id, 'JUSTID')
    owned[#owned + 1] = {s, id}
    parts[#parts + 1] = s .. '\0' .. id .. '\1'
  end
end
local token = redis.sha1hex(table.concat(parts))
if #owned > 0 then
  redis.call('SET', KEYS[1], cjson.encode({token = token, entries = owned}))
end
return {token, #owned, #owned > 0 and cjson.encode(owned) or '[]'}
"""

_SET_SCRIPT = """#!lua flags=allow-oom
return redis.call('SET', KEYS[1], ARGV[1])
"""

READING_COLS = [name for name, _ in NATIVE_COLUMNS]
TRADE_COLS = ["venue", "symbol", "trade_id", "price", "amount", "side", "ts", "recv"]
DLQ_COLS = ["source", "topic", "payload", "error", "recv", "entry_id"]


class _Batch:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []
        self.audit: list[list[tuple[str, str, int]]] = []
        self.native: list[bytes] = []  # readings, one Native block per stream entry
        self.reading_rows = 0
        self.trades: dict[str, list[Any]] = {c: [] for c in TRADE_COLS}
        self.dead: dict[str, list[Any]] = {c: [] for c in DLQ_COLS}
        self.rows = 0
        self.first = 0.0
        self.xadd_ms: list[tuple[int, int]] = []  # (xadd ms, rows)
        self.recv_us: list[Any] = []
        self.device_ts: list[Any] = []
        self.read_ns = 0



class Writer:
    """Moves entries from Redis into ClickHouse until ``stop_event`` is set."""

    def __init__(self, settings: Settings, consumer: str | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.cfg = settings.writer
        self.consumer = consumer or self.cfg.consumer or f"writer-{socket.gethostname()}-{os.getpid()}"
        self.layout = StreamLayout(settings.redis.prefix, settings.redis.partitions)
        self.group = settings.redis.group
        self.metrics = metrics or Metrics("writer", self.consumer)
        self.redis: Any = redis.Redis.from_url(
            settings.redis.url,
            socket_timeout=max(settings.redis.socket_timeout_s, self.cfg.batch_ms / 1000 + 5),
            socket_connect_timeout=settings.redis.socket_timeout_s,
        )
        self._ack = self.redis.register_script(_ACK_SCRIPT)
        self._set = self.redis.register_script(_SET_SCRIPT)
        self._take = self.redis.register_script(_TAKE_SCRIPT)
        self.stop_event = threading.Event()
        self.db = settings.clickhouse.database
        self.ch: Any = None
        self.streams = self.layout.all_streams()
        self.inserts = 0
        self.state = "starting"
        self.lag_s = 0.0
        # created before anything can block: ticks while waiting for peers keep
        # systemd from killing a writer that waits for ClickHouse at boot
        self._wd = notify.Watchdog()
        self._lag_alarm = LagAlarm(self.metrics, self.redis, self.layout.events, self.cfg.lag_alert_s)

    # ---- setup ----
    def _retry(self, what: str, fn: Any) -> Any:
        b = self.cfg.backoff
        delay = b.initial_s
        while not self.stop_event.is_set():
            try:
                return fn()
            except (redis.RedisError, SinkError, OSError) as exc:
                self.metrics.inc("retries")
                log.warning("%s failed (%s); retrying in ~%.1f s", what, exc, delay)
            except Exception as exc:  # clickhouse-connect raises its own tree
                if not _is_clickhouse_error(exc):
                    raise
                self.metrics.inc("retries")
                self.metrics.set("clickhouse_ok", False)
                if self.state not in ("waiting",):
                    self._prev_state = self.state
                self.state = "waiting"
                log.warning("%s failed (%s); retrying in ~%.1f s", what, str(exc).splitlines()[0][:300], delay)
            self._idle_beat()
            self.stop_event.wait(delay * (0.5 + random.random() / 2))
            delay = min(delay * b.factor, b.max_s)
        raise InterruptedError(what)

    def _connect_clickhouse(self) -> None:
        def go() -> None:
            self.ch = connect(self.settings.clickhouse, database="default")
            schema.apply_schema(self.ch, self.db, self.settings.clickhouse.cluster)

        self._retry("connect to ClickHouse", go)
        self.metrics.set("clickhouse_ok", True)

    def _ensure_groups(self) -> None:
        def go() -> None:
            for s in self.streams:
                try:
                    self.redis.xgroup_create(s, self.group, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

        self._retry("create consumer groups", go)

    # ---- main loop ----
    def run(self) -> int:
        self._ensure_groups()
        self._connect_clickhouse()
        self._recover_intent(self.consumer)
        self.state = "replaying"
        notify.ready(f"writer {self.consumer} started")
        wd = self._wd
        # Own pending entries are read from a cursor per stream ("0" = from the
        # start; XREADGROUP with an id returns pending entries after it), so each
        # is read once; once every stream came back empty, new entries (">").
        pending: dict[str, str] | None = dict.fromkeys(self.streams, "0")
        last: dict[str, float] = defaultdict(float)
        batch = _Batch()
        while not self.stop_event.is_set():
            now = time.monotonic()
            wd.tick()
            if now - last["claim"] >= max(1.0, self.cfg.claim_idle_ms / 4000):
                last["claim"] = now
                if self._claim_from_dead():
                    if batch.entries:  # claimed entries are read as pending: flush first
                        self._flush(batch)
                        batch = _Batch()
                    pending = dict.fromkeys(self.streams, "0")
            if pending is not None:
                streams, block_ms = pending, None
            else:
                streams = dict.fromkeys(self.streams, ">")
                if batch.entries:
                    wait = self.cfg.min_batch_ms - (time.monotonic() - batch.first) * 1000
                    block_ms = max(1, int(wait)) if wait > 0 else None
                else:
                    block_ms = max(1, int(self.cfg.batch_ms))
            try:
                resp = self.redis.xreadgroup(
                    self.group, self.consumer, streams, count=self.cfg.read_count, block=block_ms
                )
            except redis.RedisError as exc:
                log.warning("XREADGROUP failed: %s", exc)
                self._retry("reconnect to Redis", self.redis.ping)
                if batch.entries:
                    self._flush(batch)
                    batch = _Batch()
                pending = dict.fromkeys(self.streams, "0")
                continue
            got = 0
            read_ns = time.time_ns()
            for stream_b, entries in resp or []:
                stream = stream_b.decode()
                for entry_id_b, fields in entries:
                    entry_id = entry_id_b.decode()
                    if pending is not None:
                        pending[stream] = entry_id
                    got += 1
                    if not fields:  # deleted while pending: nothing to insert, just ack
                        if not batch.entries:
                            batch.first = time.monotonic()
                        batch.entries.append((stream, entry_id))
                        batch.audit.append([])
                        continue
                    self._add(batch, stream, entry_id, fields, read_ns)
            if pending is not None and got == 0:
                pending = None
                if self.state == "replaying":
                    if batch.entries:
                        self._flush(batch)
                        batch = _Batch()
                    self._after_replay()
            age_ms = (time.monotonic() - batch.first) * 1000 if batch.entries else 0.0
            caught_up = pending is None and got < self.cfg.read_count
            # Insert as soon as the streams are drained (low latency at any load: while
            # one INSERT runs the next batch grows by itself), but no more often than
            # min_batch_ms (bounds parts per second), and at the latest after batch_ms.
            if batch.entries and (
                batch.rows >= self.cfg.batch_rows
                or age_ms >= self.cfg.batch_ms
                or (caught_up and age_ms >= self.cfg.min_batch_ms)
            ):
                self._flush(batch)
                batch = _Batch()
            if now - last["trim"] >= self.cfg.trim_interval_s:
                last["trim"] = now
                self._trim_and_lag()
            if now - last["metrics"] >= self.settings.metrics.publish_interval_s:
                last["metrics"] = now
                self._publish_metrics()
            if now - last["hop"] >= self.cfg.hop_latency_interval_s:
                last["hop"] = now
                self._store_hop_latency()
            if now - last["audit"] >= 10.0:
                last["audit"] = now
                self._store_audit()
        notify.stopping("writer draining")
        if batch.entries:
            self._flush(batch)
        self._publish_metrics()
        return 0

    def _idle_beat(self) -> None:
        self._wd.tick()
        try:
            self._publish_metrics()
        except Exception:  # metrics are best effort while waiting
            pass

    def _after_replay(self) -> None:
        """Backlog replayed: compare stored counts with the audit before reporting healthy."""
        self.state = "reconciling"
        try:
            from sensorhub.pipeline.audit import reconcile_recent

            ok, detail = reconcile_recent(self.redis, self.ch, self.layout, self.db)
        except Exception as exc:
            if not _is_clickhouse_error(exc) and not isinstance(exc, redis.RedisError):
                raise
            ok, detail = False, str(exc)
        self.metrics.set("reconciled", ok)
        self.metrics.set("reconcile_detail", detail)
        self._event("reconcile", ok=ok, detail=detail)
        log.info("reconciliation after replay: %s (%s)", "ok" if ok else "MISMATCH", detail)
        self.state = "inserting"

    # ---- batching ----
    def _add(self, batch: _Batch, stream: str, entry_id: str, fields: dict[bytes, bytes], read_ns: int) -> None:
        if not batch.entries:
            batch.first = time.monotonic()
            batch.read_ns = read_ns
        batch.entries.append((stream, entry_id))
        xadd_ms = id_tuple(entry_id)[0]
        audit: list[tuple[str, str, int]] = []
        if stream == self.layout.dlq:
            src = fields.get(b"src", b"?").decode(errors="replace")
            recv_ns = int(fields.get(b"recv_ns", b"0") or 0)
            d = batch.dead
            d["source"].append(src)
            d["topic"].append(fields.get(b"topic", b"").decode(errors="replace"))
            d["payload"].append(fields.get(b"payload", b""))
            d["error"].append(fields.get(b"error", b"").decode(errors="replace"))
            d["recv"].append(recv_ns // 1000)
            d["entry_id"].append(entry_id)
            audit.append((self.layout.audit_key(src, recv_ns // 60_000_000_000), "dead_inserted", 1))
            batch.audit.append(audit)
            return
        source = fields.get(F_SOURCE, b"?").decode(errors="replace")
        try:
            if fields.get(F_KIND) == KIND_TRADES:
                tb = decode_trades(fields[F_BLOCK])
                t = batch.trades
                vs, ss = tb.venues, tb.symbols
                t["venue"].extend(vs[i] for i in tb.venue_idx)
                t["symbol"].extend(ss[i] for i in tb.symbol_idx)
                t["trade_id"].extend(tb.trade_id)
                t["price"].extend(tb.price)
                t["amount"].extend(tb.amount)
                t["side"].extend(tb.side)
                t["ts"].extend(tb.ts_us)
                t["recv"].extend(tb.recv_us)
                n = len(tb)
                recv = tb.recv_us
                batch.device_ts.append(tb.ts_us)
            else:
                # straight to ClickHouse's Native format: no Python object per reading
                native, blk = native_block(fields[F_BLOCK], source)
                batch.native.append(native)
                n = len(blk)
                batch.reading_rows += n
                recv = blk.recv_us
                batch.device_ts.append(blk.ts_us)
        except (DecodeError, KeyError) as exc:
            # A damaged entry is kept as a dead letter, never dropped.
            d = batch.dead
            d["source"].append(source)
            d["topic"].append(stream)
            d["payload"].append(fields.get(F_BLOCK, b""))
            d["error"].append(f"stream entry does not decode: {exc}")
            d["recv"].append(xadd_ms * 1000)
            d["entry_id"].append(entry_id)
            batch.audit.append([(self.layout.audit_key(source, xadd_ms // 60_000), "dead_inserted", 1)])
            return
        batch.rows += n
        batch.recv_us.append(recv)
        batch.xadd_ms.append((xadd_ms, n))
        if n:
            m0, m1 = recv[0] // 60_000_000, recv[-1] // 60_000_000
            if m0 == m1:
                audit.append((self.layout.audit_key(source, m0), "inserted", n))
            else:
                per: dict[int, int] = defaultdict(int)
                for v in recv:
                    per[v // 60_000_000] += 1
                audit.extend((self.layout.audit_key(source, mm), "inserted", c) for mm, c in per.items())
        batch.audit.append(audit)

    # ---- flush: intent, insert, ack ----
    def _flush(self, batch: _Batch, token: str | None = None) -> None:
        """Intent, INSERT, acknowledge, clear. ``token`` is given when replaying an intent."""
        intent_key = self.layout.intent(self.consumer)
        if token is None:
            token, batch = self._take_ownership(batch, intent_key)
            if not batch.entries:
                return
        else:
            intent = json.dumps({"token": token, "entries": batch.entries})
            self._retry("write insert intent", lambda: self._set(keys=[intent_key], args=[intent]))
        self._insert(batch, token)
        if (
            self.cfg.fault_crash_after_insert
            and self.inserts >= self.cfg.fault_crash_after_insert
            and self.redis.set(f"{self.layout.prefix}:fault:writer-crashed", self.consumer, nx=True)
        ):
            # once per keyspace, so the restarted writer shows the recovery
            log.error("fault injection: exiting between INSERT and XACK (insert %d)", self.inserts)
            os._exit(70)
        self._retry("acknowledge entries", lambda: self._ack_batch(batch))
        self._retry("clear insert intent", lambda: self.redis.delete(intent_key))

    def _take_ownership(self, batch: _Batch, intent_key: str) -> tuple[str, _Batch]:
        args: list[Any] = [self.group, self.consumer]
        for stream, entry_id in batch.entries:
            args += [stream, entry_id]
        token_b, n_owned, owned_json = self._retry(
            "write insert intent", lambda: self._take(keys=[intent_key], args=args)
        )
        token = token_b.decode() if isinstance(token_b, bytes) else str(token_b)
        if int(n_owned) == len(batch.entries):
            return token, batch
        owned = [(str(s_), str(i_)) for s_, i_ in json.loads(owned_json)]
        lost = len(batch.entries) - len(owned)
        self.metrics.inc("entries_lost_to_claims", lost)
        log.warning("%d entries of this batch were claimed by another writer meanwhile; inserting the other %d",
                    lost, len(owned))
        return token, self._batch_from_entries(owned)

    def _batch_from_entries(self, entries: list[tuple[str, str]]) -> _Batch:
        """A batch of exactly these entries, in this order, read back from the streams."""
        batch = _Batch()
        read_ns = time.time_ns()
        for s, i in entries:
            rows = self._retry("read entry", lambda s=s, i=i: self.redis.xrange(s, i, i))
            if rows and rows[0][1]:
                self._add(batch, s, i, rows[0][1], read_ns)
            else:  # acknowledged and trimmed, or deleted: nothing to insert, the ack is a no-op
                if not batch.entries:
                    batch.first = time.monotonic()
                batch.entries.append((s, i))
                batch.audit.append([])
        return batch

    def _insert(self, batch: _Batch, token: str) -> None:
        settings = {"insert_deduplication_token": token, "insert_deduplicate": 1}
        t0 = time.time_ns()

        def go() -> None:
            if batch.native:
                self.ch.raw_insert(
                    f"{self.db}.readings", column_names=READING_COLS, insert_block=b"".join(batch.native),
                    settings=settings, fmt="Native",
                )
            if batch.trades["venue"]:
                self.ch.insert(
                    f"{self.db}.trades", list(batch.trades.values()), column_names=TRADE_COLS,
                    column_oriented=True, settings=settings,
                )
            if batch.dead["source"]:
                self.ch.insert(
                    f"{self.db}.dead_letters", list(batch.dead.values()), column_names=DLQ_COLS,
                    column_oriented=True, settings=settings,
                )

        self._retry("INSERT into ClickHouse", go)
        if self.state == "waiting":
            log.info("ClickHouse is back")
            self.state = getattr(self, "_prev_state", "inserting")
        self.metrics.set("clickhouse_ok", True)
        self.inserts += 1
        done = time.time_ns()
        m = self.metrics
        m.inc("rows", batch.rows)
        m.inc("readings", batch.reading_rows)
        m.inc("trades", len(batch.trades["venue"]))
        m.inc("dead_letters", len(batch.dead["source"]))
        m.inc("inserts")
        m.set("last_batch_rows", batch.rows)
        m.record_us("insert", (done - t0) / 1000)
        if batch.rows:
            m.record_us("read_to_insert", (done - batch.read_ns) / 1000, batch.rows)
            for ms, n in batch.xadd_ms:
                if n:
                    m.record_us("xadd_to_read", max(0, batch.read_ns // 1000 - ms * 1000), n)
            # sample at most ~100 readings per entry: each stands for `stride` readings
            done_us = done // 1000
            for recv_arr, dev_arr in zip(batch.recv_us, batch.device_ts, strict=True):
                stride = max(1, len(recv_arr) // 100)
                for j in range(0, len(recv_arr), stride):
                    m.record_us("recv_to_insert", done_us - recv_arr[j], stride)
                    m.record_us("device_to_insert", done_us - dev_arr[j], stride)

    def _ack_batch(self, batch: _Batch) -> int:
        args: list[Any] = [self.group]
        for (stream, entry_id), audit in zip(batch.entries, batch.audit, strict=True):
            args += [stream, entry_id, len(audit)]
            for key, field, n in audit:
                args += [key, field, n]
        return int(self._ack(keys=[], args=args))

    # ---- recovery ----
    def _recover_intent(self, consumer: str) -> None:
        key = self.layout.intent(consumer)
        raw = self._retry("read insert intent", lambda: self.redis.get(key))
        if not raw:
            return
        intent = json.loads(raw)
        entries = [(s, i) for s, i in intent["entries"]]
        log.info("replaying the insert intent of %s: %d entries, token %s", consumer, len(entries), intent["token"])
        if consumer != self.consumer:
            by_stream: dict[str, list[str]] = defaultdict(list)
            for s, i in entries:
                by_stream[s].append(i)
            for s, ids in by_stream.items():
                self._retry("claim intent entries", lambda s=s, ids=ids: self.redis.xclaim(s, self.group, self.consumer, 0, ids, justid=True))
            self.metrics.inc("claimed", len(entries))
            log.warning("claimed %d entries of %s with its insert intent", len(entries), consumer)
        batch = self._batch_from_entries(entries)
        # Same entries, same token: a no-op in ClickHouse if the INSERT had landed.
        self._flush(batch, token=intent["token"])
        if consumer != self.consumer:
            self.redis.delete(key)
        self.metrics.inc("intents_replayed")

    def _claim_from_dead(self) -> bool:
        """Claim entries idle longer than ``claim_idle_ms`` from other consumers."""
        claimed = False
        try:
            for s in self.streams:
                info = self.redis.xpending(s, self.group)
                if not info or not info.get("pending"):
                    continue
                for c in info.get("consumers") or []:
                    name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                    if name == self.consumer:
                        continue
                    idle = self.redis.xpending_range(
                        s, self.group, min="-", max="+", count=1, consumername=name, idle=self.cfg.claim_idle_ms
                    )
                    if not idle:
                        continue
                    if self.redis.exists(self.layout.intent(name)):
                        # (the main loop flushes its own batch before reading claimed entries)
                        self._recover_intent(name)
                    start = "0-0"
                    while True:
                        # (redis-py drops the cursor of a JUSTID reply, so take whole entries)
                        nxt, entries, *_ = self.redis.xautoclaim(
                            s, self.group, self.consumer, self.cfg.claim_idle_ms, start_id=start, count=1000
                        )
                        ids = [e[0] for e in entries if e]
                        if ids:
                            claimed = True
                            self.metrics.inc("claimed", len(ids))
                            log.warning("claimed %d idle entries of %s on %s", len(ids), name, s)
                        nxt = nxt.decode() if isinstance(nxt, bytes) else nxt
                        if nxt == "0-0" or not ids:
                            break
                        start = nxt
        except redis.RedisError as exc:
            log.warning("claiming idle entries failed: %s", exc)
        return claimed

    # ---- trim and lag ----
    def _trim_and_lag(self) -> None:
        try:
            states = stream_states(self.redis, self.streams)
            for st in states:
                if st.safe_trim is not None and st.safe_trim > (0, 0):
                    self.redis.xtrim(st.stream, minid=f"{st.safe_trim[0]}-{st.safe_trim[1]}", approximate=False)
        except redis.RedisError as exc:
            log.warning("trim/lag check failed: %s", exc)
            return
        self.lag_s = self._lag_alarm.update(states)

    def _event(self, kind: str, **fields: Any) -> None:
        try:
            self.redis.xadd(
                self.layout.events,
                {"kind": kind, "process": self.metrics.process, "data": json.dumps(fields)},
                maxlen=1000,
                approximate=True,
            )
        except redis.RedisError:
            pass

    # ---- periodic exports ----
    def _publish_metrics(self) -> None:
        m = self.metrics
        m.set("state", self.state)
        m.set("consumer", self.consumer)
        try:
            snap = m.publish(self.redis, self.layout.metrics_key(m.process), self.settings.metrics.ttl_s)
        except redis.RedisError:
            return
        notify.status(
            notify.format_status(
                notify.WriterStatus(
                    state=self.state,  # type: ignore[arg-type]
                    rate=float(snap["rates"].get("rows", 0.0)),
                    lag_s=self.lag_s,
                    clickhouse_up=bool(m.gauges.get("clickhouse_ok")),
                )
            )
        )

    def _store_hop_latency(self) -> None:
        """Per-interval hop percentiles of every process into ``hop_latency``.

        Ingest processes post theirs to the ``<prefix>:hops`` stream every
        interval; this writer adds its own, inserts them, then deletes what it
        inserted (a row per process, hop and interval: replays are harmless).
        """
        from datetime import UTC, datetime

        start, secs, stats = self.metrics.take_interval()
        rows: list[list[Any]] = [
            [self.metrics.process, hop, datetime.fromtimestamp(start, UTC), secs,
             st["count"], st["p50_ms"], st["p95_ms"], st["p99_ms"], st["max_ms"]]
            for hop, st in stats.items() if st["count"]
        ]
        posted: list[bytes] = []
        try:
            for entry_id, f in self.redis.xrange(self.layout.hops, count=10_000):
                posted.append(entry_id)
                doc = json.loads(f[b"d"])
                for hop, st in doc["hops"].items():
                    rows.append([doc["process"], hop, datetime.fromtimestamp(doc["start"], UTC), doc["seconds"],
                                 st["count"], st["p50_ms"], st["p95_ms"], st["p99_ms"], st["max_ms"]])
        except (redis.RedisError, ValueError, KeyError) as exc:
            log.warning("reading posted hop latencies failed: %s", exc)
        if not rows:
            return
        try:
            self.ch.insert(
                f"{self.db}.hop_latency", rows,
                column_names=["process", "hop", "interval_start", "interval_s", "count", "p50_ms", "p95_ms", "p99_ms", "max_ms"],
            )
        except Exception as exc:
            if not _is_clickhouse_error(exc):
                raise
            log.warning("hop_latency insert failed: %s", str(exc)[:200])
            return
        if posted:
            try:
                self.redis.xdel(self.layout.hops, *posted)
            except redis.RedisError as exc:
                log.warning("clearing posted hop latencies failed: %s", exc)

    def _store_audit(self) -> None:
        from sensorhub.pipeline.audit import export_audit

        try:
            export_audit(self.redis, self.ch, self.layout, self.db)
        except redis.RedisError as exc:
            log.warning("audit export failed: %s", exc)
        except Exception as exc:
            if not _is_clickhouse_error(exc):
                raise
            log.warning("audit export failed: %s", str(exc)[:200])


def _is_clickhouse_error(exc: BaseException) -> bool:
    from clickhouse_connect.driver.exceptions import ClickHouseError

    return isinstance(exc, (ClickHouseError, SinkError, OSError))
