"""The writer: Redis Streams → ClickHouse, exactly once per row.

One consumer group over every partition stream and the dead-letter stream.
Per batch:

1. write an *intent* (``<prefix>:intent:<consumer>``: the entry ids and the
   ``insert_deduplication_token`` derived from them);
2. INSERT readings, trades and dead letters, each with that token;
3. XACK the entries and count them in the audit, in one Lua script that
   counts only entries it actually acknowledged;
4. delete the intent.

Each INSERT is sent as one block (``min_insert_block_size_rows``), so it
lands whole or not at all. Readings whose device time cannot be right
(:mod:`sensorhub.pipeline.rejected`) never reach the INSERT: they are
dead-lettered in the same batch. When ClickHouse refuses an INSERT because
of some of its rows (a value out of range, a violated constraint, too many
partitions for one block), the batch is split in halves, each inserted with
its own token derived from the batch's, recursively; a single row still
refused is dead-lettered with ClickHouse's reason, the rest is stored, then
the batch is acknowledged. Every split and every refused row is written to
the intent before the next INSERT, so a writer killed while splitting walks
the same halves with the same tokens. Any other error (ClickHouse down, 503,
timeouts, a full disk) is waited out and retried, never dead-lettered.

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
from array import array
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import redis

from sensorhub.config import Settings
from sensorhub.decoders import ReadingBatch
from sensorhub.errors import DecodeError, SinkError
from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.entrycodec_py import NATIVE_COLUMNS
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.lag import LagAlarm, id_tuple, stream_states
from sensorhub.pipeline.rejected import (
    READING_TOPIC,
    TRADE_TOPIC,
    DeviceTimeWindow,
    reading_payload,
    trade_payload,
)
from sensorhub.pipeline.streams import (
    F_BLOCK,
    F_KIND,
    F_SOURCE,
    KIND_TRADES,
    encode_block,
    native_block,
)
from sensorhub.pipeline.tradecodec import decode_trades
from sensorhub.service import notify
from sensorhub.sinks import schema
from sensorhub.sinks.clickhouse import connect, reason

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
# ARGV[3] holds the intent's other fields (JSON).
_TAKE_SCRIPT = """#!lua flags=allow-oom
local group, me = ARGV[1], ARGV[2]
local owned, parts = {}, {}
for i = 4, #ARGV, 2 do
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
  local intent = cjson.decode(ARGV[3])
  intent['token'] = token
  intent['entries'] = owned
  redis.call('SET', KEYS[1], cjson.encode(intent))
end
return {token, #owned, #owned > 0 and cjson.encode(owned) or '[]'}
"""

_SET_SCRIPT = """#!lua flags=allow-oom
return redis.call('SET', KEYS[1], ARGV[1])
"""

READING_COLS = [name for name, _ in NATIVE_COLUMNS]
TRADE_COLS = ["venue", "symbol", "trade_id", "price", "amount", "side", "ts", "recv"]
DLQ_COLS = ["source", "topic", "payload", "error", "recv", "entry_id"]

# ClickHouse refuses an INSERT with these for the data of some of its rows
# (names as in ClickHouse's ErrorCodes.cpp; a test holds them against the engine).
ROW_CAUSED_ERRORS: dict[str, int] = {
    "CANNOT_PARSE_TEXT": 6,
    "CANNOT_PARSE_ESCAPE_SEQUENCE": 25,
    "CANNOT_PARSE_QUOTED_STRING": 26,
    "CANNOT_PARSE_INPUT_ASSERTION_FAILED": 27,
    "CANNOT_PARSE_DATE": 38,
    "CANNOT_PARSE_DATETIME": 41,
    "ARGUMENT_OUT_OF_BOUND": 69,
    "CANNOT_CONVERT_TYPE": 70,
    "CANNOT_PARSE_NUMBER": 72,
    "INCORRECT_DATA": 117,
    "TOO_LARGE_STRING_SIZE": 131,
    "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE": 321,
    "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO": 395,
    "DECIMAL_OVERFLOW": 407,
    "VIOLATED_CONSTRAINT": 469,
    "UNKNOWN_ELEMENT_OF_ENUM": 691,
}
_ROW_CAUSED_CODES = frozenset(ROW_CAUSED_ERRORS.values())
_TOO_MANY_PARTS = 252  # also "Too many parts" (merges behind): that one is waited out


def refused_for_rows(exc: BaseException) -> bool:
    """Whether ClickHouse refused an INSERT because of the data of some of its rows.

    Only then can splitting the batch help; every other error (unreachable,
    503, timeouts, ``NOT_ENOUGH_SPACE``, too many parts) is retried as it is.
    """
    code = getattr(exc, "code", None)
    if code == _TOO_MANY_PARTS:
        return "too many partitions for single insert block" in str(exc).lower()
    return code in _ROW_CAUSED_CODES


class _RowsRefused(Exception):
    """An INSERT was refused for some of its rows (not a ClickHouse error: ``_retry`` lets it through)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Readings:
    """The readings of one stream entry that go to ``readings``: all rows of ``blk``, or ``rows``."""

    __slots__ = ("blk", "entry", "native", "rows", "source")

    def __init__(self, entry: int, source: str, blk: Any, rows: list[int] | None, native: bytes) -> None:
        self.entry = entry  # index in the batch's entries
        self.source = source
        self.blk = blk
        self.rows = rows
        self.native = native  # the Native block of exactly these rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.blk)

    def row(self, k: int) -> int:
        """The row of ``blk`` of this segment's ``k``-th reading."""
        return self.rows[k] if self.rows is not None else k


def _native_rows(blk: Any, rows: Sequence[int], source: str) -> bytes:
    """A Native block of some rows of a decoded entry block (through the entry codec, as the whole ones)."""
    b = ReadingBatch(max(1, len(rows)))
    dev, met = blk.devices, blk.metrics
    for i in rows:
        b.append(dev[blk.dev[i]], met[blk.met[i]], blk.ts_us[i], blk.value[i], blk.quality[i], blk.seq[i], blk.recv_us[i])
    native: bytes = native_block(encode_block(b, blk.decode_ns), source)[0]
    return native


class _Batch:
    def __init__(self, window: DeviceTimeWindow | None = None) -> None:
        self.window = window  # the device-time window it was built with (the writer's when None)
        self.entries: list[tuple[str, str]] = []
        self.audit: list[list[tuple[str, str, int]]] = []
        self.readings: list[_Readings] = []  # one segment per stream entry with readings to insert
        self.reading_rows = 0
        self.trades: dict[str, list[Any]] = {c: [] for c in TRADE_COLS}
        self.trade_entry: list[int] = []  # per trade row: index of its entry
        self.trade_start: dict[int, int] = {}  # entry index -> its first trade row
        self.entry_source: dict[int, str] = {}
        self.dead: dict[str, list[Any]] = {c: [] for c in DLQ_COLS}
        self.rows = 0
        self.first = 0.0
        self.xadd_ms: list[tuple[int, int]] = []  # (xadd ms, rows)
        self.recv_us: list[Any] = []
        self.device_ts: list[Any] = []
        self.read_ns = 0

    @property
    def native(self) -> list[bytes]:
        """The readings as Native blocks, one per stream entry."""
        return [r.native for r in self.readings]


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
        self.split_inserts = 0
        self.window = DeviceTimeWindow.of(self.cfg.device_time_max_past_s, self.cfg.device_time_max_future_s)
        self._intent: dict[str, Any] = {}  # the intent of the batch being flushed, as stored in Redis
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
        if batch.window is None:
            batch.window = self.window
        batch.entries.append((stream, entry_id))
        entry = len(batch.entries) - 1
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
        batch.entry_source[entry] = source
        try:
            if fields.get(F_KIND) == KIND_TRADES:
                tb = decode_trades(fields[F_BLOCK])
                t = batch.trades
                batch.trade_start[entry] = len(t["venue"])
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
                batch.trade_entry.extend([entry] * n)
                recv = tb.recv_us
                batch.device_ts.append(tb.ts_us)
            else:
                # straight to ClickHouse's Native format: no Python object per reading
                native, blk = native_block(fields[F_BLOCK], source)
                outside = batch.window.outside(blk.ts_us, blk.recv_us)
                rows: list[int] | None = None
                recv, dev_ts = blk.recv_us, blk.ts_us
                if outside:
                    # a device clock that cannot be right: those readings become dead letters
                    bad = {i for i, _ in outside}
                    rows = [i for i in range(len(blk)) if i not in bad]
                    native = _native_rows(blk, rows, source) if rows else b""
                    recv = array("q", (blk.recv_us[i] for i in rows))
                    dev_ts = array("q", (blk.ts_us[i] for i in rows))
                    for i, why in outside:
                        self._dead_reading(batch, stream, entry_id, source, blk, i, why)
                    audit.extend(self._audit_counts(source, (blk.recv_us[i] for i in bad), "writer_dead_lettered"))
                    self.metrics.inc("device_time_dead_lettered", len(outside))
                    log.warning(
                        "%d readings of %s dead-lettered for their device time (first: %s)",
                        len(outside), blk.devices[blk.dev[outside[0][0]]], outside[0][1],
                    )
                n = len(rows) if rows is not None else len(blk)
                if n:
                    batch.readings.append(_Readings(entry, source, blk, rows, native))
                batch.reading_rows += n
                batch.device_ts.append(dev_ts)
        except (DecodeError, KeyError) as exc:
            # A damaged entry is kept as a dead letter, never dropped.
            self._dead_row(batch, source, stream, fields.get(F_BLOCK, b""), f"stream entry does not decode: {exc}",
                           xadd_ms * 1000, entry_id)
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
                audit.extend(self._audit_counts(source, recv, "inserted"))
        batch.audit.append(audit)

    def _audit_counts(self, source: str, recv_us: Any, field: str) -> list[tuple[str, str, int]]:
        per: dict[int, int] = defaultdict(int)
        for v in recv_us:
            per[v // 60_000_000] += 1
        return [(self.layout.audit_key(source, mm), field, c) for mm, c in per.items()]

    @staticmethod
    def _dead_row(batch: _Batch, source: str, topic: str, payload: bytes, error: str, recv_us: int, entry_id: str) -> None:
        d = batch.dead
        d["source"].append(source)
        d["topic"].append(topic)
        d["payload"].append(payload)
        d["error"].append(error)
        d["recv"].append(recv_us)
        d["entry_id"].append(entry_id)

    def _dead_reading(
        self, batch: _Batch, stream: str, entry_id: str, source: str, blk: Any, i: int, why: str
    ) -> None:
        """Row ``i`` of an entry block as a dead letter that ``sensorhub dlq replay`` decodes again."""
        device = blk.devices[blk.dev[i]]
        payload = reading_payload(
            device, blk.metrics[blk.met[i]], blk.value[i], blk.ts_us[i], blk.seq[i], blk.quality[i]
        )
        # unique across streams and rows, and the same in every replay of the entry
        self._dead_row(batch, source, READING_TOPIC + device, payload, why, blk.recv_us[i], f"{stream}/{entry_id}/{i}")

    # ---- flush: intent, insert, ack ----
    def _flush(self, batch: _Batch, token: str | None = None, intent: dict[str, Any] | None = None) -> None:
        """Intent, INSERT, acknowledge, clear. ``token`` and ``intent`` are given when replaying an intent."""
        intent_key = self.layout.intent(self.consumer)
        window = batch.window = batch.window or self.window
        if token is None:
            token, batch = self._take_ownership(batch, intent_key)
            if not batch.entries:
                return
            self._intent = {"window": window.to_json(), "token": token, "entries": batch.entries}
        else:
            # the replayed intent keeps what it knew: the window, the splits, the refused rows
            self._intent = {**(intent or {}), "window": window.to_json(), "token": token, "entries": batch.entries}
            self._save_intent()
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
        self._intent = {}

    def _save_intent(self) -> None:
        key = self.layout.intent(self.consumer)
        text = json.dumps(self._intent)
        self._retry("write insert intent", lambda: self._set(keys=[key], args=[text]))

    def _take_ownership(self, batch: _Batch, intent_key: str) -> tuple[str, _Batch]:
        assert batch.window is not None
        args: list[Any] = [self.group, self.consumer, json.dumps({"window": batch.window.to_json()})]
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
        return token, self._batch_from_entries(owned, batch.window)

    def _batch_from_entries(self, entries: list[tuple[str, str]], window: DeviceTimeWindow | None = None) -> _Batch:
        """A batch of exactly these entries, in this order, read back from the streams."""
        batch = _Batch(window or self.window)
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

    @staticmethod
    def _settings(token: str, rows: int) -> dict[str, Any]:
        # One block per INSERT (squashed up to exactly its rows): it lands whole or not
        # at all, so a refused INSERT stored nothing and its halves can be inserted.
        return {
            "insert_deduplication_token": token,
            "insert_deduplicate": 1,
            "min_insert_block_size_rows": max(1, rows),
            "min_insert_block_size_bytes": 0,
        }

    def _insert(self, batch: _Batch, token: str) -> None:
        t0 = time.time_ns()
        refused = 0
        n_readings = sum(len(r) for r in batch.readings)
        if n_readings:

            def readings(lo: int, hi: int, tok: str) -> None:
                self.ch.raw_insert(
                    f"{self.db}.readings", column_names=READING_COLS, insert_block=self._readings_native(batch, lo, hi),
                    settings=self._settings(tok, hi - lo), fmt="Native",
                )

            for row, why in self._insert_rows("readings", n_readings, readings, token):
                self._refused_reading(batch, row, why)
                refused += 1
        n_trades = len(batch.trades["venue"])
        if n_trades:

            def trades(lo: int, hi: int, tok: str) -> None:
                self.ch.insert(
                    f"{self.db}.trades", [c[lo:hi] for c in batch.trades.values()], column_names=TRADE_COLS,
                    column_oriented=True, settings=self._settings(tok, hi - lo),
                )

            for row, why in self._insert_rows("trades", n_trades, trades, token):
                self._refused_trade(batch, row, why)
                refused += 1
                n_trades -= 1
        if batch.dead["source"]:

            def dead_letters() -> None:
                try:
                    self.ch.insert(
                        f"{self.db}.dead_letters", list(batch.dead.values()), column_names=DLQ_COLS,
                        column_oriented=True, settings=self._settings(token, len(batch.dead["source"])),
                    )
                except Exception as exc:
                    # nowhere else to keep them: wait (and say so) until the operator fixes it
                    if _is_clickhouse_error(exc) and refused_for_rows(exc):
                        log.error("ClickHouse refuses dead letters for their content: %s", reason(exc))
                    raise

            self._retry("INSERT into ClickHouse", dead_letters)
        if self.state == "waiting":
            log.info("ClickHouse is back")
            self.state = getattr(self, "_prev_state", "inserting")
        self.metrics.set("clickhouse_ok", True)
        self.inserts += 1
        done = time.time_ns()
        m = self.metrics
        m.inc("rows", batch.rows)
        m.inc("readings", batch.reading_rows)
        m.inc("trades", n_trades)
        m.inc("dead_letters", len(batch.dead["source"]))
        if refused:
            m.inc("rows_refused", refused)
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

    def _insert_rows(
        self, table: str, n: int, insert: Callable[[int, int, str], None], token: str
    ) -> list[tuple[int, str]]:
        """Insert rows ``[0, n)`` of ``table`` with ``insert(lo, hi, token)``; return the rows
        ClickHouse refused for themselves, with its reason.

        The whole batch goes with the batch's token. Refused for some of its
        rows, it is split in halves, each with the token ``<token>:<table>:<lo>-<hi>``,
        down to single rows. Splits and refused rows are recorded in the intent
        before the next INSERT, so a replay takes the same path: an INSERT that
        landed before a crash is dropped as a duplicate by its token.
        """
        split: list[str] = self._intent.setdefault("split", [])
        refused: dict[str, str] = self._intent.setdefault("refused", {})
        done_split = set(split)
        out: list[tuple[int, str]] = []
        todo = [(0, n)]
        while todo:
            lo, hi = todo.pop()
            key = f"{table}:{lo}-{hi}"
            if key in refused:
                out.append((lo, refused[key]))
                continue
            if key not in done_split:
                tok = token if (lo, hi) == (0, n) else f"{token}:{key}"
                try:
                    self._retry(f"INSERT into {table}", lambda lo=lo, hi=hi, tok=tok: self._attempt(insert, lo, hi, tok))
                except _RowsRefused as exc:
                    why = exc.why
                else:
                    if tok != token:
                        self._after_split_insert()
                    continue
                if hi - lo == 1:
                    refused[key] = why
                    self._save_intent()
                    out.append((lo, why))
                    continue
                if (lo, hi) == (0, n):
                    log.warning("ClickHouse refused a batch of %d %s for some of its rows (%s); splitting it",
                                n, table, why)
                split.append(key)
                done_split.add(key)
                self._save_intent()
            mid = (lo + hi) // 2
            todo += [(mid, hi), (lo, mid)]  # the lower half first
        return out

    @staticmethod
    def _attempt(insert: Callable[[int, int, str], None], lo: int, hi: int, tok: str) -> None:
        try:
            insert(lo, hi, tok)
        except Exception as exc:
            if _is_clickhouse_error(exc) and refused_for_rows(exc):
                raise _RowsRefused(reason(exc)[:1000]) from exc
            raise

    def _after_split_insert(self) -> None:
        self.split_inserts += 1
        self.metrics.inc("split_inserts")
        n = self.cfg.fault_crash_after_split_inserts
        if n and self.split_inserts >= n and self.redis.set(
            f"{self.layout.prefix}:fault:writer-crashed-split", self.consumer, nx=True
        ):
            log.error("fault injection: exiting while splitting a refused batch (split insert %d)", self.split_inserts)
            os._exit(70)

    def _readings_native(self, batch: _Batch, lo: int, hi: int) -> bytes:
        """Native blocks of the batch's readings ``[lo, hi)`` (whole entries as they came)."""
        out: list[bytes] = []
        pos = 0
        for seg in batch.readings:
            n = len(seg)
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                if (a, b) == (pos, pos + n):
                    out.append(seg.native)
                else:
                    out.append(_native_rows(seg.blk, [seg.row(k) for k in range(a - pos, b - pos)], seg.source))
            pos += n
            if pos >= hi:
                break
        return b"".join(out)

    def _refused_reading(self, batch: _Batch, row: int, why: str) -> None:
        pos = 0
        for seg in batch.readings:
            if row < pos + len(seg):
                break
            pos += len(seg)
        i = seg.row(row - pos)
        stream, entry_id = batch.entries[seg.entry]
        self._dead_reading(batch, stream, entry_id, seg.source, seg.blk, i, f"refused by ClickHouse: {why}")
        key = self.layout.audit_key(seg.source, seg.blk.recv_us[i] // 60_000_000)
        batch.audit[seg.entry] += [(key, "inserted", -1), (key, "writer_dead_lettered", 1)]
        batch.rows -= 1
        batch.reading_rows -= 1
        log.warning("a reading of %s refused by ClickHouse, dead-lettered: %s", seg.blk.devices[seg.blk.dev[i]], why)

    def _refused_trade(self, batch: _Batch, row: int, why: str) -> None:
        t = batch.trades
        entry = batch.trade_entry[row]
        stream, entry_id = batch.entries[entry]
        source = batch.entry_source[entry]
        payload = trade_payload((c, t[c][row]) for c in TRADE_COLS)
        recv = t["recv"][row]
        self._dead_row(batch, source, f"{TRADE_TOPIC}{t['venue'][row]}/{t['symbol'][row]}", payload,
                       f"refused by ClickHouse: {why}", recv, f"{stream}/{entry_id}/{row - batch.trade_start[entry]}")
        key = self.layout.audit_key(source, recv // 60_000_000)
        batch.audit[entry] += [(key, "inserted", -1), (key, "writer_dead_lettered", 1)]
        batch.rows -= 1
        log.warning("a trade of %s refused by ClickHouse, dead-lettered: %s", t["venue"][row], why)

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
        window = DeviceTimeWindow.from_json(intent["window"]) if "window" in intent else self.window
        batch = self._batch_from_entries(entries, window)
        # Same entries, same window, same token: a no-op in ClickHouse if the INSERT had
        # landed; a split batch takes the same halves again.
        self._flush(batch, token=intent["token"], intent=intent)
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
