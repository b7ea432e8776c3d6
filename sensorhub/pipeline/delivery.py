"""The exactly-once protocol between Redis Streams and ClickHouse.

The writer reads entries with one consumer group; this module owns what
happens from a batch of read entries to their acknowledgement, and how a
writer that restarts, or claims the entries of a dead one, finishes what
was left half done. What Redis holds: the streams' entries, the group's
pending list (each read, unacknowledged entry and the consumer that owns
it), the audit counters, and per consumer at most one *intent*
(``<prefix>:intent:<consumer>``: ``token``, ``entries``, ``window``, and
once a batch was split ``split`` and ``refused``). On Redis Cluster a batch
holds the entries of one partition, so that its take and ack scripts touch
one slot, and its intent is the partition's (``<prefix>:intent:{<p>}:<consumer>``):
a consumer may have one intent per partition, each complete in itself.
Every script is given every key it touches in ``KEYS``. What ClickHouse holds:
the rows, and for the last inserts (``non_replicated_deduplication_window``)
the ``insert_deduplication_token`` each block came with; an INSERT that
repeats a token it still knows is dropped whole.

The steps of :meth:`Delivery.flush`, and what is true after each:

1. **Take ownership** (the take script, one atomic Lua call). Before: the
   batch's entries were read by this consumer, but another writer may have
   claimed some meanwhile (this one was stopped). After: the batch holds
   only the entries the pending list still gives this consumer, their idle
   time is reset (nobody claims them for ``writer.claim_idle_ms``), and the
   intent names exactly them, in order, with a token derived from them and
   the device-time window the batch was built with. ClickHouse holds none
   of their rows: nothing is inserted without an intent. Entries another
   writer claimed are dropped from the batch; that writer inserts them.
2. **Insert** readings, trades and dead letters, each INSERT with the
   intent's token and as one block (``min_insert_block_size_rows``), so it
   lands whole or not at all. After: ClickHouse holds the batch's rows
   once; the same INSERT again is dropped by its token. When ClickHouse
   refuses an INSERT for some of its rows (:mod:`sensorhub.pipeline.clickhouse_errors`),
   :meth:`Delivery.insert_rows` splits it in halves with tokens
   ``<token>:<table>:<lo>-<hi>``, recursively; each split and each single
   refused row (with ClickHouse's reason) is written to the intent *before*
   the next INSERT, so a replay walks the same halves, skips the INSERTs
   already known to be refused, and dead-letters the same rows: halves that
   landed are dropped by their tokens, and a rule ClickHouse no longer
   applies cannot make it store the whole batch over halves already stored.
   Retryable errors are waited out with the same call, never dead-lettered.
3. **Acknowledge** (the ack script, one atomic Lua call): XACK every entry,
   and add an entry's audit counts only when its XACK returned 1. After:
   the entries left the pending list and are counted in the audit once,
   whoever acknowledged them first.
4. **Clear the intent.** After: nothing of the batch is left to finish.
   Only acknowledged entries are ever trimmed (``XTRIM MINID`` to the
   oldest entry some group still needs), so an entry is in Redis until its
   rows are in ClickHouse.

A ``kill -9`` at any point ends with every row once:

- before 1 or inside it (atomic): no intent, the entries are pending for
  this consumer, nothing was inserted; the restarted writer re-reads its
  pending entries and starts again at 1.
- between 1 and 3: the intent is there. The restarted writer (same
  consumer name) first replays it (:meth:`Delivery.recover_intent`): the
  same entries read back, the same window, so the same rows in the same
  order, with the same token and the same splits; what had landed is
  dropped by ClickHouse, the rest lands, then 3 and 4.
- between 3 and 4: the replay inserts again under the same token (dropped;
  entries already trimmed are read as empty) and its XACKs return 0, so
  nothing is counted twice.
- a writer that dies for good: its entries go idle. Another writer replays
  the dead one's intent first, as its own (XCLAIM of the intent's entries,
  same token), deletes it, then claims the remaining idle entries
  (``XAUTOCLAIM``), which were never inserted since they had no intent. A
  writer that was only stopped and resumes finds its INSERT deduplicated,
  its XACKs no-ops, and at its next take that the entries are no longer
  its own.

The intent write, the take and the ack scripts are flagged ``allow-oom``:
when Redis is full (``noeviction``) they are what frees memory, since
acknowledgement allows the trim.

When the master has replicas, the take and every later write of the intent
are followed by ``WAIT`` (:class:`sensorhub.pipeline.slots.Transactions`)
before the INSERT: an intent that a failover lost after its rows were
inserted would let the entries be inserted again under another token. An
acknowledgement a failover loses leaves the entries pending with their
intent, which the writer replays first after it reconnects.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import redis

from sensorhub.config import WriterSettings
from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.clickhouse_errors import ClickHouseFailed
from sensorhub.pipeline.columns import Batch, EntryColumns
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.redisconn import is_cluster
from sensorhub.pipeline.rejected import DeviceTimeWindow
from sensorhub.pipeline.slots import Transactions

__all__ = ["Delivery", "insert_settings"]

log = logging.getLogger("sensorhub.pipeline.writer")  # these lines are the writer's, for whoever reads its log

# allow-oom: when Redis is full (noeviction) these must still run, or nothing
# could ever be acknowledged and trimmed and the memory would never free.
# KEYS: the batch's streams and audit hashes. ARGV: the group, then per entry its
# stream (index into KEYS), its id, n, and n times an audit hash (index), field, count.
_ACK_SCRIPT = """#!lua flags=allow-oom
local group = ARGV[1]
local i = 2
local acked = 0
while i <= #ARGV do
  local stream = KEYS[tonumber(ARGV[i])]
  local id = ARGV[i + 1]
  local nspec = tonumber(ARGV[i + 2])
  local n = redis.call('XACK', stream, group, id)
  i = i + 3
  for j = 1, nspec do
    if n == 1 then
      redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], tonumber(ARGV[i + 2]))
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
# An intent still there (a failover lost its deletion) is never written over:
# the script says so (-1) and the writer finishes that one first.
# KEYS[1]: the intent, KEYS[2..]: the batch's streams. ARGV: the group, the
# consumer, the intent's other fields (JSON), then per entry its stream (index
# into KEYS) and its id.
_TAKE_SCRIPT = """#!lua flags=allow-oom
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'', -1, '[]'}
end
local group, me = ARGV[1], ARGV[2]
local owned, parts = {}, {}
for i = 4, #ARGV, 2 do
  local s, id = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
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

# Writes the intent of the batch with token ARGV[2], unless the key holds another
# batch's intent (a failover lost its deletion): then 0, and the writer finishes that first.
_SET_SCRIPT = """#!lua flags=allow-oom
local cur = redis.call('GET', KEYS[1])
if cur and cjson.decode(cur)['token'] ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

#: ``retry(what, fn, raise_row_caused=False)``: call ``fn`` until it succeeds, waiting out
#: what can be waited out; with ``raise_row_caused`` a row-caused refusal is raised
Retry = Callable[..., Any]


def insert_settings(token: str, rows: int, cluster: bool = False) -> dict[str, Any]:
    """The settings of an INSERT of ``rows`` rows under ``token``.

    On a cluster (``clickhouse.cluster``) the INSERT goes through the Distributed table in the
    foreground: it returns once every shard has its rows under the token, so the writer's ack
    means stored, and a repeat meets the first on the same shards (deterministic sharding keys,
    :attr:`sensorhub.sinks.schema.Table.sharding_key`).
    """
    # One block per INSERT (squashed up to exactly its rows): it lands whole or not
    # at all, so a refused INSERT stored nothing and its halves can be inserted.
    out: dict[str, Any] = {
        "insert_deduplication_token": token,
        "insert_deduplicate": 1,
        "min_insert_block_size_rows": max(1, rows),
        "min_insert_block_size_bytes": 0,
    }
    if cluster:
        out["distributed_foreground_insert"] = 1
    return out


class Delivery:
    """The steps of the protocol for one consumer; ``insert(batch, token)`` is step 2."""

    def __init__(
        self,
        client: Any,
        layout: StreamLayout,
        group: str,
        consumer: str,
        cfg: WriterSettings,
        metrics: Metrics,
        columns: EntryColumns,
        retry: Retry,
        insert: Callable[[Batch, str], None],
        tx: Transactions | None = None,
    ) -> None:
        self.redis = client
        self.layout = layout
        self.group = group
        self.consumer = consumer
        self.cfg = cfg
        self.metrics = metrics
        self.columns = columns
        self.retry = retry
        self.insert = insert
        self.cluster = is_cluster(client)
        self.tx = tx  # WAIT after the intent's writes, where the master has replicas
        self._intent_key = layout.intent(consumer)  # of the batch being flushed
        self._ack = client.register_script(_ACK_SCRIPT)
        self._set = client.register_script(_SET_SCRIPT)
        self._take = client.register_script(_TAKE_SCRIPT)
        self.intent: dict[str, Any] = {}  # the intent of the batch being flushed, as stored in Redis
        self.inserts = 0
        self.split_inserts = 0

    # ---- flush: take, insert, ack, clear ----
    def intent_key(self, batch: Batch) -> str:
        """Where this consumer's intent for ``batch`` is kept: on a cluster, in the batch's partition."""
        if not self.cluster or not batch.entries:
            return self.layout.intent(self.consumer)
        return self.layout.intent(self.consumer, self.layout.partition_of(batch.entries[0][0]))

    def flush(self, batch: Batch, token: str | None = None, intent: dict[str, Any] | None = None) -> None:
        """Intent, INSERT, acknowledge, clear. ``token`` and ``intent`` are given when replaying an intent."""
        intent_key = self._intent_key = self.intent_key(batch)
        window = batch.window = batch.window or self.columns.window
        if token is None:
            token, batch = self._take_ownership(batch, intent_key)
            if not batch.entries:
                return
            self.intent = {"window": window.to_json(), "token": token, "entries": batch.entries}
        else:
            # the replayed intent keeps what it knew: the window, the splits, the refused rows
            self.intent = {**(intent or {}), "window": window.to_json(), "token": token, "entries": batch.entries}
            self.save_intent()
        self.insert(batch, token)
        self.inserts += 1
        if (
            self.cfg.fault_crash_after_insert
            and self.inserts >= self.cfg.fault_crash_after_insert
            and self.redis.set(f"{self.layout.prefix}:fault:writer-crashed", self.consumer, nx=True)
        ):
            # once per keyspace, so the restarted writer shows the recovery
            log.error("fault injection: exiting between INSERT and XACK (insert %d)", self.inserts)
            os._exit(70)
        self.retry("acknowledge entries", lambda: self._ack_batch(batch))
        self.retry("clear insert intent", lambda: self.redis.delete(intent_key))
        self.intent = {}

    def save_intent(self) -> None:
        key, mine = self._intent_key, self.intent
        args = [json.dumps(mine), str(mine["token"])]
        while not int(self.retry("write insert intent", lambda: self._durable(self._set, _SET_SCRIPT, [key], args))):
            log.warning("an earlier insert intent of %s is still there (%s); finishing it first", self.consumer, key)
            self._recover_intent(self.consumer, key)
            self._intent_key, self.intent = key, mine

    def _take_ownership(self, batch: Batch, intent_key: str) -> tuple[str, Batch]:
        assert batch.window is not None
        args: list[Any] = [self.group, self.consumer, json.dumps({"window": batch.window.to_json()})]
        keys = [intent_key]
        index: dict[str, int] = {}
        for stream, entry_id in batch.entries:
            k = index.get(stream)
            if k is None:
                keys.append(stream)
                k = index[stream] = len(keys)  # Lua counts from 1
            args += [k, entry_id]
        while True:
            token_b, n_owned, owned_json = self.retry(
                "write insert intent", lambda: self._durable(self._take, _TAKE_SCRIPT, keys, args)
            )
            if int(n_owned) >= 0:
                break
            log.warning("an earlier insert intent of %s is still there (%s); finishing it first",
                        self.consumer, intent_key)
            self._recover_intent(self.consumer, intent_key)
        self._intent_key = intent_key
        token = token_b.decode() if isinstance(token_b, bytes) else str(token_b)
        if int(n_owned) == len(batch.entries):
            return token, batch
        owned = [(str(s_), str(i_)) for s_, i_ in json.loads(owned_json)]
        lost = len(batch.entries) - len(owned)
        self.metrics.inc("entries_lost_to_claims", lost)
        log.warning("%d entries of this batch were claimed by another writer meanwhile; inserting the other %d",
                    lost, len(owned))
        return token, self.batch_from_entries(owned, batch.window)

    def _durable(self, script: Any, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script; where the master of its slot has replicas, in a transaction followed by WAIT."""
        if self.tx is None or not self.tx.waits(keys[0]):
            return script(keys=keys, args=args)
        (result,) = self.tx.execute(keys[0], [("EVAL", source, len(keys), *keys, *args)])
        return result

    def batch_from_entries(self, entries: list[tuple[str, str]], window: DeviceTimeWindow | None = None) -> Batch:
        """A batch of exactly these entries, in this order, read back from the streams."""
        batch = Batch(window or self.columns.window)
        read_ns = time.time_ns()
        for s, i in entries:
            rows = self.retry("read entry", lambda s=s, i=i: self.redis.xrange(s, i, i))
            if rows and rows[0][1]:
                self.columns.add(batch, s, i, rows[0][1], read_ns)
            else:  # acknowledged and trimmed, or deleted: nothing to insert, the ack is a no-op
                batch.add_empty(s, i)
        return batch

    def insert_rows(
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
        split: list[str] = self.intent.setdefault("split", [])
        refused: dict[str, str] = self.intent.setdefault("refused", {})
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
                    self.retry(f"INSERT into {table}", lambda lo=lo, hi=hi, tok=tok: insert(lo, hi, tok),
                               raise_row_caused=True)
                except ClickHouseFailed as exc:  # refused for some of its rows
                    why = exc.why[:1000]
                else:
                    if tok != token:
                        self._after_split_insert()
                    continue
                if hi - lo == 1:
                    refused[key] = why
                    self.save_intent()
                    out.append((lo, why))
                    continue
                if (lo, hi) == (0, n):
                    log.warning("ClickHouse refused a batch of %d %s for some of its rows (%s); splitting it",
                                n, table, why)
                split.append(key)
                done_split.add(key)
                self.save_intent()
            mid = (lo + hi) // 2
            todo += [(mid, hi), (lo, mid)]  # the lower half first
        return out

    def _after_split_insert(self) -> None:
        self.split_inserts += 1
        self.metrics.inc("split_inserts")
        n = self.cfg.fault_crash_after_split_inserts
        if n and self.split_inserts >= n and self.redis.set(
            f"{self.layout.prefix}:fault:writer-crashed-split", self.consumer, nx=True
        ):
            log.error("fault injection: exiting while splitting a refused batch (split insert %d)", self.split_inserts)
            os._exit(70)

    def _ack_batch(self, batch: Batch) -> int:
        args: list[Any] = [self.group]
        keys: list[str] = []
        index: dict[str, int] = {}

        def ref(key: str) -> int:
            k = index.get(key)
            if k is None:
                keys.append(key)
                k = index[key] = len(keys)  # Lua counts from 1
            return k

        for (stream, entry_id), audit in zip(batch.entries, batch.audit, strict=True):
            args += [ref(stream), entry_id, len(audit)]
            for key, field, n in audit:
                args += [ref(key), field, n]
        return int(self._ack(keys=keys, args=args))

    # ---- recovery ----
    def has_intent(self, consumer: str) -> bool:
        pipe = self.redis.pipeline(transaction=False)
        for key in self.layout.intents(consumer):
            pipe.exists(key)
        return any(pipe.execute())

    def recover_intent(self, consumer: str) -> None:
        """Finish the intents ``consumer`` left behind (this consumer's own, or a dead writer's), if any."""
        for key in self.layout.intents(consumer):
            self._recover_intent(consumer, key)

    def _recover_intent(self, consumer: str, key: str) -> None:
        raw = self.retry("read insert intent", lambda: self.redis.get(key))
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
                self.retry("claim intent entries", lambda s=s, ids=ids: self.redis.xclaim(s, self.group, self.consumer, 0, ids, justid=True))
            self.metrics.inc("claimed", len(entries))
            log.warning("claimed %d entries of %s with its insert intent", len(entries), consumer)
        window = DeviceTimeWindow.from_json(intent["window"]) if "window" in intent else self.columns.window
        batch = self.batch_from_entries(entries, window)
        # Same entries, same window, same token: a no-op in ClickHouse if the INSERT had
        # landed; a split batch takes the same halves again.
        self.flush(batch, token=intent["token"], intent=intent)
        if consumer != self.consumer:
            self.redis.delete(key)
        self.metrics.inc("intents_replayed")

    def idle_consumers(self, streams: list[str]) -> list[tuple[str, str]]:
        """(stream, consumer) of other consumers with entries idle longer than ``claim_idle_ms``; reads only."""
        found: list[tuple[str, str]] = []
        for s in streams:
            info = self.redis.xpending(s, self.group)
            if not info or not info.get("pending"):
                continue
            for c in info.get("consumers") or []:
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if name == self.consumer:
                    continue
                if self.redis.xpending_range(
                    s, self.group, min="-", max="+", count=1, consumername=name, idle=self.cfg.claim_idle_ms
                ):
                    found.append((s, name))
        return found

    def claim_from_dead(self, idle: list[tuple[str, str]]) -> bool:
        """Claim the entries of ``idle`` (what :meth:`idle_consumers` found) from those consumers.

        Runs while no flush of this writer is in flight: it may finish a dead consumer's intent.
        """
        claimed = False
        try:
            for s, name in idle:
                if self.has_intent(name):
                    # (the main loop flushes its own batch before reading claimed entries)
                    self.recover_intent(name)
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
