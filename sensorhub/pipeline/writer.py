"""The writer: Redis Streams → ClickHouse, exactly once per row.

One consumer group over every partition stream and the dead-letter streams.
On Redis Cluster the streams are read one slot (partition) at a time, in one
pipelined round trip (:func:`sensorhub.pipeline.slots.read_group`), and a
batch holds the entries of one partition, so that every script of the
exactly-once protocol touches one slot; on a single Redis a batch spans
partitions. This module is the loop and its batching policy: read (own pending entries
first, then new ones), batch, flush, and on the side claim idle entries of
dead writers, trim, publish metrics and export hop latencies and the audit.
The rooms it joins:

- :mod:`sensorhub.pipeline.columns`: stream entries to the columns of a
  batch, and rows that become dead letters;
- :mod:`sensorhub.pipeline.delivery`: the exactly-once protocol (intent,
  INSERT under a token, acknowledgement, recovery, claims) and splitting a
  batch ClickHouse refuses for some of its rows; its invariants are written
  there;
- :mod:`sensorhub.pipeline.clickhouse_errors`: the one error boundary every
  call into ClickHouse goes through (retryable, row-caused, or our bug);
- :mod:`sensorhub.pipeline.exports`: ``hop_latency`` and ``ingest_audit``;
- :mod:`sensorhub.pipeline.inserter`: the thread each batch's protocol and the
  exports run on; with ``writer.overlap``, or while the loop is behind (a read
  filled ``read_count``: a backlog), it reads the next batch while an INSERT is
  in flight.

Retryable errors (ClickHouse down, 503, timeouts, a full disk) are waited
out with capped jittered backoff and the same batch, never dead-lettered;
the writer's state is ``waiting`` meanwhile.
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
from typing import Any

import redis

from sensorhub.config import Settings
from sensorhub.errors import SinkError
from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.audit import reconcile_recent
from sensorhub.pipeline.clickhouse_errors import (
    AUTHENTICATION_FAILED,
    SINK_FAILURES,
    ClickHouseFailed,
    sink_boundary,
)
from sensorhub.pipeline.columns import DLQ_COLS, READING_COLS, TRADE_COLS, Batch, EntryColumns
from sensorhub.pipeline.delivery import Delivery, insert_settings
from sensorhub.pipeline.exports import store_audit, store_hop_latency
from sensorhub.pipeline.inserter import InsertThread
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.lag import LagAlarm, stream_states
from sensorhub.pipeline.redisconn import is_cluster, redis_client
from sensorhub.pipeline.rejected import DeviceTimeWindow
from sensorhub.pipeline.slots import Transactions, read_group, refresh_topology
from sensorhub.service import notify
from sensorhub.sinks import schema
from sensorhub.sinks.clickhouse import connect

__all__ = ["Writer"]

log = logging.getLogger(__name__)

RETRY_LOG_S = 30.0  # an outage at the backoff cap logs a line this often, not every retry


def _say_retry(what: str, why: str, delay: float, climbing: bool, said: float) -> float:
    """Log a failed attempt while the backoff climbs, then once per RETRY_LOG_S; returns when last logged."""
    now = time.monotonic()
    if climbing or now - said >= RETRY_LOG_S:
        log.warning("%s failed (%s); retrying in ~%.1f s", what, why, delay)
        return now
    return said


class Writer:
    """Moves entries from Redis into ClickHouse until ``stop_event`` is set."""

    def __init__(self, settings: Settings, consumer: str | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.cfg = settings.writer
        self.consumer = consumer or self.cfg.consumer or f"writer-{socket.gethostname()}-{os.getpid()}"
        self.layout = StreamLayout(settings.redis.prefix, settings.redis.partitions)
        self.group = settings.redis.group
        self.metrics = metrics or Metrics("writer", self.consumer)
        self.redis: Any = redis_client(
            settings.redis,
            socket_timeout=max(settings.redis.socket_timeout_s, self.cfg.batch_ms / 1000 + 5),
            socket_connect_timeout=settings.redis.socket_timeout_s,
        )
        self.stop_event = threading.Event()
        self.db = settings.clickhouse.database
        self.on_cluster = settings.clickhouse.cluster is not None  # INSERTs through Distributed tables
        self.ch: Any = None
        self.cluster = is_cluster(self.redis)
        self.streams = self.layout.all_streams()
        self.window = DeviceTimeWindow.of(self.cfg.device_time_max_past_s, self.cfg.device_time_max_future_s)
        self.columns = EntryColumns(self.layout, self.metrics, self.window)
        wait_ms = int(min(1000, settings.redis.socket_timeout_s * 500))  # WAIT returns before the socket times out
        self.delivery = Delivery(
            self.redis, self.layout, self.group, self.consumer, self.cfg, self.metrics, self.columns,
            retry=self._retry, insert=self._insert, tx=Transactions(self.redis, settings.redis.min_replicas, wait_ms),
        )
        self.state = "starting"
        self.lag_s = 0.0
        # created before anything can block: ticks while waiting for peers keep
        # systemd from killing a writer that waits for ClickHouse at boot
        self._wd = notify.Watchdog()
        self._lag_alarm = LagAlarm(self.metrics, self.redis, self.layout.events, self.cfg.lag_alert_s)
        self.inserts = InsertThread(f"insert-{self.consumer}", self._wd.tick)

    # ---- setup ----
    def _retry(self, what: str, fn: Any, raise_row_caused: bool = False) -> Any:
        """``fn()`` until it succeeds, waiting out Redis and ClickHouse with capped jittered backoff.

        With ``raise_row_caused`` a refusal for some rows' data is raised (the caller splits);
        anything that is neither a peer's failure nor ClickHouse's is a bug and raised.
        """
        b = self.cfg.backoff
        delay = b.initial_s
        said = 0.0  # when a failure was last logged: at the cap, one line every RETRY_LOG_S
        while True:  # tried once even when stopping: a stop in the middle of a flush finishes it
            try:
                return fn()
            except ClickHouseFailed as exc:  # from a call through sink_boundary
                if exc.row_caused and raise_row_caused:
                    raise
                self.metrics.inc("retries")
                self.metrics.set("clickhouse_ok", False)
                if exc.code == AUTHENTICATION_FAILED:
                    # the password was rotated: a new client reads clickhouse.password_file again
                    self._reconnect_clickhouse()
                if self.state not in ("waiting",):
                    self._prev_state = self.state
                self.state = "waiting"
                said = _say_retry(what, str(exc).splitlines()[0][:300], delay, delay < b.max_s, said)
            except (redis.RedisError, SinkError, OSError) as exc:
                self.metrics.inc("retries")
                said = _say_retry(what, str(exc), delay, delay < b.max_s, said)
            if self.stop_event.is_set():
                break
            self._idle_beat()
            self.stop_event.wait(delay * (0.5 + random.random() / 2))
            delay = min(delay * b.factor, b.max_s)
        raise InterruptedError(what)

    def _connect_clickhouse(self) -> None:
        def go() -> None:
            with sink_boundary():
                self.ch = connect(self.settings.clickhouse, database="default")
                schema.apply_schema(self.ch, self.db, self.settings.clickhouse.cluster)

        self._retry("connect to ClickHouse", go)
        self.metrics.set("clickhouse_ok", True)

    def _reconnect_clickhouse(self) -> None:
        try:
            with sink_boundary():
                self.ch = connect(self.settings.clickhouse, database="default")
        except SINK_FAILURES as exc:
            log.warning("reconnect to ClickHouse failed (%s)", str(exc).splitlines()[0][:300])

    def _ensure_groups(self) -> None:
        def go() -> None:
            if not self.cluster and self.layout.legacy_dlq not in self.streams and self.redis.exists(self.layout.legacy_dlq):
                # dead letters an earlier release wrote: drained like the others
                self.streams.append(self.layout.legacy_dlq)
            for s in self.streams:
                try:
                    self.redis.xgroup_create(s, self.group, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

        self._retry("create consumer groups", go)

    # ---- main loop ----
    def _scope(self, stream: str) -> int | None:
        """Which batch an entry of ``stream`` joins: its partition's on a cluster, the one batch otherwise."""
        return self.layout.partition_of(stream) if self.cluster else None

    def _flush_all(self, batches: dict[int | None, Batch]) -> None:
        """Every batch inserted and acknowledged, and nothing left in flight, when this returns."""
        for b in batches.values():
            if b.entries:
                self._flush(b)
        batches.clear()
        self.inserts.drain()

    def _flush(self, batch: Batch, behind: bool = False) -> None:
        """Hand ``batch`` to the insert thread (after the one before it); with ``writer.overlap`` off, wait
        for it, unless the loop is ``behind`` and ``writer.overlap_behind`` is on."""
        self.inserts.submit_batch(lambda: self.delivery.flush(batch))
        if not (self.cfg.overlap or (behind and self.cfg.overlap_behind)):
            self.inserts.wait_batch()

    def run(self) -> int:
        self._ensure_groups()
        self._connect_clickhouse()
        self.delivery.recover_intent(self.consumer)
        self.state = "replaying"
        notify.ready(f"writer {self.consumer} started")
        wd = self._wd
        try:
            return self._loop(wd)
        finally:
            self.inserts.close()

    def _loop(self, wd: notify.Watchdog) -> int:
        # Own pending entries are read from a cursor per stream ("0" = from the
        # start; XREADGROUP with an id returns pending entries after it), so each
        # is read once; once every stream came back empty, new entries (">").
        pending: dict[str, str] | None = dict.fromkeys(self.streams, "0")
        last: dict[str, float] = defaultdict(float)
        batches: dict[int | None, Batch] = {}
        while not self.stop_event.is_set():
            now = time.monotonic()
            wd.tick()
            if now - last["claim"] >= max(1.0, self.cfg.claim_idle_ms / 4000):
                last["claim"] = now
                idle = self._others_idle()
                if idle:
                    # claimed entries are read as pending, and a dead consumer's intent is
                    # finished by this thread: nothing of ours may be in flight meanwhile
                    self._flush_all(batches)
                    if self.delivery.claim_from_dead(idle):
                        pending = dict.fromkeys(self.streams, "0")
            if pending is not None:
                streams, block_ms = pending, None
            else:
                streams = dict.fromkeys(self.streams, ">")
                firsts = [b.first for b in batches.values() if b.entries]
                if firsts and self.inserts.busy():
                    # an INSERT is in flight: take what has come meanwhile, a few ms of it at a time
                    self.inserts.wait_batch(0.005)
                    block_ms = None
                elif firsts:
                    wait = self.cfg.min_batch_ms - (time.monotonic() - min(firsts)) * 1000
                    block_ms = max(1, int(wait)) if wait > 0 else None
                else:
                    block_ms = max(1, int(self.cfg.batch_ms))
            try:
                resp = read_group(
                    self.redis, self.group, self.consumer, streams, self.cfg.read_count, block_ms,
                    wait=self.stop_event.wait,
                )
            except redis.RedisError as exc:
                log.warning("XREADGROUP failed: %s", exc)
                self._retry("reconnect to Redis", self._reconnect)
                # a failover may have lost the last acknowledgements and left their intents:
                # those come first, before a take could write over them
                self.inserts.drain()
                self.delivery.recover_intent(self.consumer)
                self._flush_all(batches)
                pending = dict.fromkeys(self.streams, "0")
                continue
            got = 0
            read_ns = time.time_ns()
            for stream_b, entries in resp or []:
                stream = stream_b.decode()
                scope = self._scope(stream)
                batch = batches.get(scope)
                if batch is None:
                    batch = batches[scope] = Batch()
                for entry_id_b, fields in entries:
                    entry_id = entry_id_b.decode()
                    if pending is not None:
                        pending[stream] = entry_id
                    got += 1
                    if not fields:  # deleted while pending: nothing to insert, just ack
                        batch.add_empty(stream, entry_id)
                        continue
                    self.columns.add(batch, stream, entry_id, fields, read_ns)
            if pending is not None and got == 0:
                pending = None
                if self.state == "replaying":
                    self._flush_all(batches)
                    self._after_replay()
            caught_up = pending is None and got < self.cfg.read_count
            # Insert as soon as the streams are drained (low latency at any load: while
            # one INSERT runs the next batch grows, in Redis or, with writer.overlap or while
            # behind, read and decoded meanwhile), but no more often than min_batch_ms (bounds
            # parts per second), and at the latest after batch_ms or at batch_rows, when the
            # loop waits for the INSERT in flight.
            busy = self.inserts.busy()
            for scope, batch in list(batches.items()):
                age_ms = (time.monotonic() - batch.first) * 1000 if batch.entries else 0.0
                if not batch.entries:
                    continue
                full = batch.rows >= self.cfg.batch_rows or age_ms >= self.cfg.batch_ms
                if full or (caught_up and age_ms >= self.cfg.min_batch_ms and not busy):
                    self._flush(batch, behind=not caught_up)
                    del batches[scope]
                    busy = self.inserts.busy()  # with writer.overlap, the next one waits its turn
            if now - last["trim"] >= self.cfg.trim_interval_s:
                last["trim"] = now
                self._trim_and_lag()
            if now - last["metrics"] >= self.settings.metrics.publish_interval_s:
                last["metrics"] = now
                self._publish_metrics()
            if now - last["hop"] >= self.cfg.hop_latency_interval_s:
                last["hop"] = now
                self.inserts.submit(lambda: store_hop_latency(self.metrics, self.redis, self.ch, self.layout, self.db))
            if now - last["audit"] >= 10.0:
                last["audit"] = now
                self.inserts.submit(lambda: store_audit(self.redis, self.ch, self.layout, self.db))
        notify.stopping("writer draining")
        if self.state == "waiting":
            # ClickHouse is out: what was read stays pending in Redis for the next start
            batches.clear()
        self._flush_all(batches)
        self._publish_metrics()
        return 0

    def _others_idle(self) -> list[tuple[str, str]]:
        """(stream, consumer) of other writers holding entries idle past ``claim_idle_ms``."""
        try:
            return self.delivery.idle_consumers(self.streams)
        except redis.RedisError as exc:
            log.warning("looking for idle entries of other writers failed: %s", exc)
            return []

    def _reconnect(self) -> None:
        refresh_topology(self.redis)  # a cluster may have failed over: its slots again
        self.redis.ping()

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
            with sink_boundary():
                ok, detail = reconcile_recent(self.redis, self.ch, self.layout, self.db)
        except SINK_FAILURES as exc:
            ok, detail = False, str(exc)
        except redis.RedisError as exc:
            ok, detail = False, str(exc)
        self.metrics.set("reconciled", ok)
        self.metrics.set("reconcile_detail", detail)
        self._event("reconcile", ok=ok, detail=detail)
        log.info("reconciliation after replay: %s (%s)", "ok" if ok else "MISMATCH", detail)
        self.state = "inserting"

    # ---- batching ----
    def _insert(self, batch: Batch, token: str) -> None:
        """Step 2 of the protocol: the batch's rows into ClickHouse under ``token``; rows refused for themselves are dead-lettered."""
        t0 = time.time_ns()
        refused = 0
        n_readings = sum(len(r) for r in batch.readings)
        if n_readings:

            def readings(lo: int, hi: int, tok: str) -> None:
                with sink_boundary():
                    self.ch.raw_insert(
                        f"{self.db}.readings", column_names=READING_COLS, insert_block=batch.readings_native(lo, hi),
                        settings=insert_settings(tok, hi - lo, self.on_cluster), fmt="Native",
                    )

            for row, why in self.delivery.insert_rows("readings", n_readings, readings, token):
                self.columns.refuse_reading(batch, row, why)
                refused += 1
        n_trades = len(batch.trades["venue"])
        if n_trades:

            def trades(lo: int, hi: int, tok: str) -> None:
                with sink_boundary():
                    self.ch.insert(
                        f"{self.db}.trades", [c[lo:hi] for c in batch.trades.values()], column_names=TRADE_COLS,
                        column_oriented=True, settings=insert_settings(tok, hi - lo, self.on_cluster),
                    )

            for row, why in self.delivery.insert_rows("trades", n_trades, trades, token):
                self.columns.refuse_trade(batch, row, why)
                refused += 1
                n_trades -= 1
        if batch.dead["source"]:

            def dead_letters() -> None:
                try:
                    with sink_boundary():
                        self.ch.insert(
                            f"{self.db}.dead_letters", list(batch.dead.values()), column_names=DLQ_COLS,
                            column_oriented=True, settings=insert_settings(token, len(batch.dead["source"]), self.on_cluster),
                        )
                except ClickHouseFailed as exc:
                    # nowhere else to keep them: wait (and say so) until the operator fixes it
                    if exc.row_caused:
                        log.error("ClickHouse refuses dead letters for their content: %s", exc.why)
                    raise

            self._retry("INSERT into ClickHouse", dead_letters)
        if self.state == "waiting":
            log.info("ClickHouse is back")
            self.state = getattr(self, "_prev_state", "inserting")
        self.metrics.set("clickhouse_ok", True)
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
            # every reading counted, an even sample of them recorded (recording is the costly part)
            done_us = done // 1000
            recv, dev = array("q"), array("q")
            for recv_arr, dev_arr in zip(batch.recv_us, batch.device_ts, strict=True):
                recv.extend(recv_arr)
                dev.extend(dev_arr)
            m.record_since("recv_to_insert", done_us, recv)
            m.record_since("device_to_insert", done_us, dev)

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
