"""Redis work that runs the same on a single Redis and on Redis Cluster.

On a cluster every command, transaction and script may touch keys of one
hash slot only (else ``CROSSSLOT``); sensorhub's keys of one partition share
the hash tag ``{<p>}`` (:mod:`sensorhub.pipeline.keys`). Two things span
partitions and are done here:

- :func:`read_group`: ``XREADGROUP`` over many streams. A single Redis reads
  them in one command (blocking); a cluster reads each slot's streams with
  one command, all slots in one pipelined round trip, and polls every
  :data:`CLUSTER_POLL_MS` while every stream is empty (a blocking read would
  wait on one slot only).
- :class:`Transactions`: ``MULTI``/``EXEC`` of one slot, followed on the same
  connection by ``WAIT`` when the master has replicas. Redis replicates
  asynchronously: a master killed after ``EXEC`` and before a replica has the
  entries loses them when the replica takes over. ``WAIT n`` returns once
  ``n`` replicas hold everything the connection wrote, so what the caller
  acknowledges after it survives the failover. ``WAIT`` counts the writes of
  its own connection, which is why the transaction and the ``WAIT`` go
  together over one connection taken from the pool (on a cluster: of the
  master serving the slot), in one round trip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from sensorhub.pipeline.keys import hash_tag
from sensorhub.pipeline.redisconn import is_cluster

__all__ = ["CLUSTER_POLL_MS", "ReplicaShortfall", "Transactions", "read_group", "refresh_topology"]

log = logging.getLogger(__name__)

#: how often a cluster's streams are polled while every one is empty
CLUSTER_POLL_MS = 10


class ReplicaShortfall(redis.exceptions.RedisError):
    """``WAIT`` returned before enough replicas confirmed the transaction (it did execute on the master)."""


def refresh_topology(client: Any) -> None:
    """After a connection error or a redirection: learn the cluster's slots again (no-op on a single Redis)."""
    if is_cluster(client):
        try:
            client.nodes_manager.initialize()
        except (redis.RedisError, OSError) as exc:  # nodes still failing over; the next attempt tries again
            log.debug("cluster topology refresh failed: %s", exc)


def read_group(
    client: Any,
    group: str,
    consumer: str,
    streams: dict[str, str],
    count: int,
    block_ms: int | None,
    wait: Callable[[float], Any] = time.sleep,
) -> list[Any]:
    """``XREADGROUP`` of ``streams`` (stream -> id), as redis-py returns it: ``[[stream, entries], ...]``.

    On a cluster one command per slot, pipelined; with ``block_ms`` and nothing to
    read, ``wait`` (e.g. a stop event's ``wait``) for up to :data:`CLUSTER_POLL_MS`.
    """
    if not streams:
        return []
    if not is_cluster(client):
        return client.xreadgroup(group, consumer, streams, count=count, block=block_ms) or []
    by_slot: dict[str, list[str]] = {}
    for s in streams:
        by_slot.setdefault(hash_tag(s), []).append(s)
    pipe = client.pipeline(transaction=False)
    for keys in by_slot.values():
        # the node given: redis-py would otherwise ask the server for XREADGROUP's keys each time
        node = client.get_node_from_key(keys[0])
        pipe.execute_command(
            "XREADGROUP", "GROUP", group, consumer, "COUNT", count, "STREAMS", *keys, *(streams[k] for k in keys),
            target_nodes=node,
        )
    out = [item for reply in pipe.execute() if reply for item in reply]
    if not out and block_ms:
        wait(min(block_ms, CLUSTER_POLL_MS) / 1000)
    return out


Command = Sequence[Any]


_REDIRECTS = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, redis.exceptions.MovedError,
    redis.exceptions.AskError, redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
)


class _Batch:
    """Transactions for one master, sent back to back over one connection, then one ``WAIT``."""

    def __init__(self, node: Any, master: str, need: int) -> None:
        self.node = node
        self.master = master
        self.need = need
        self.items: list[tuple[int, Sequence[Command]]] = []  # (index in the caller's list, commands)
        self.conn: Any = None

    def send(self, timeout_ms: int) -> None:
        packed: list[Command] = []
        for _i, commands in self.items:
            packed += [("MULTI",), *commands, ("EXEC",)]
        if self.need:
            packed.append(("WAIT", self.need, timeout_ms))
        self.conn = self.node.connection_pool.get_connection()
        try:
            self.conn.send_packed_command(self.conn.pack_commands(packed))
        except BaseException:
            self.release(broken=True)
            raise

    def _reply(self) -> Any:
        try:
            return self.conn.read_response()
        except redis.exceptions.ResponseError as exc:  # an error reply: the connection is fine
            return exc

    def read(self, timeout_ms: int, out: list[Any]) -> None:
        """Each transaction's results, or the exception it failed with, into ``out``."""
        done: list[int] = []
        try:
            for i, commands in self.items:
                replies = [self._reply() for _ in range(len(commands) + 2)]  # every reply is read
                queued, executed = replies[:-1], replies[-1]
                if isinstance(executed, Exception):
                    # EXECABORT: a command was refused while queuing (OOM, MOVED, WRONGTYPE...): nothing ran
                    out[i] = next((r for r in queued if isinstance(r, Exception)), executed)
                    continue
                failed = next((r for r in executed if isinstance(r, Exception)), None)
                out[i] = failed if failed is not None else list(executed)
                done.append(i)
            if self.need:
                acked = self._reply()
                if isinstance(acked, Exception):
                    raise acked
                if int(acked) < self.need:
                    short = ReplicaShortfall(f"{acked} of {self.need} replicas of {self.master or 'Redis'} "
                                             f"confirmed within {timeout_ms} ms")
                    for i in done:
                        if not isinstance(out[i], Exception):
                            out[i] = short
        except BaseException as exc:
            self.release(broken=True)  # a reply may be left unread: never reuse this connection
            for i, _c in self.items:
                if out[i] is None or (self.need and not isinstance(out[i], Exception)):
                    out[i] = exc  # not confirmed: it may or may not have executed
            if not isinstance(exc, Exception):
                raise
            return
        self.release()

    def release(self, broken: bool = False) -> None:
        if self.conn is None:
            return
        if broken:
            self.conn.disconnect()
        self.node.connection_pool.release(self.conn)
        self.conn = None


class Transactions:
    """``MULTI``/``EXEC`` on the master of one slot, then ``WAIT`` for its replicas.

    How many replicas a transaction waits for: ``min_replicas`` when set (0
    turns ``WAIT`` off); unset, 1 on a master that has replicas
    (``INFO replication``: ``connected_slaves``) and 0 on one that has none.
    A master's replicas are counted when it is first seen: at start, and
    after a connection error or a redirection (a failover made another node
    master; the topology is learnt again first). Counted again every
    ``refresh_s``, a master's figure only goes up (a replica added later is
    waited for from then on): a replica that drops its link does not make
    writes go unconfirmed, the transactions wait for it (and fail with
    :class:`ReplicaShortfall`) until it is back, its master fails over, or
    the process restarts.
    """

    def __init__(self, client: Any, min_replicas: int | None, timeout_ms: int, refresh_s: float = 5.0) -> None:
        self.client = client
        self.cluster = is_cluster(client)
        self.min_replicas = min_replicas
        self.timeout_ms = timeout_ms
        self.refresh_s = refresh_s
        self.replicas: dict[str, int] = {}  # master (host:port, "" on a single Redis) -> connected replicas
        self._checked = 0.0
        self._stale = True

    def mark_stale(self) -> None:
        """After an error: refresh the topology and the replica counts before the next transaction."""
        self._stale = True

    def refresh(self) -> None:
        """Count each master's replicas (and, on a cluster after an error, learn the slots again)."""
        stale = False
        known = self.replicas
        if self.cluster:
            if self._stale:
                refresh_topology(self.client)
            counts = {}
            for node in self.client.get_primaries():
                try:
                    info = self.client.get_redis_connection(node).info("replication")
                except (redis.RedisError, OSError):
                    # a master failing over: its slots' transactions fail until the next refresh;
                    # until its replicas are counted, assume it has some (WAIT rather than lose)
                    stale = True
                    counts[node.name] = known.get(node.name, 1)
                    continue
                counts[node.name] = int(info.get("connected_slaves", 0))
        else:
            counts = {"": int(self.client.info("replication").get("connected_slaves", 0))}
        # a master seen before keeps the replicas it had: only a new one is counted from scratch
        counts = {name: max(n, known.get(name, 0)) for name, n in counts.items()}
        if counts != self.replicas:
            log.info("Redis replicas per master: %s; writes wait for %s", counts or "none",
                     "none" if self.min_replicas == 0 else self.min_replicas or "1 where there are replicas")
        self.replicas = counts
        self._checked = time.monotonic()
        self._stale = stale

    def _due(self) -> None:
        if self._stale or time.monotonic() - self._checked >= self.refresh_s:
            self.refresh()

    def required(self, master: str) -> int:
        if self.min_replicas is not None:
            return self.min_replicas
        return 1 if self.replicas.get(master, 0) > 0 else 0

    def _node(self, key: str) -> tuple[str, Any]:
        if not self.cluster:
            return "", self.client
        node = self.client.get_node_from_key(key)
        return str(node.name), self.client.get_redis_connection(node)

    def waits(self, key: str) -> int:
        """How many replicas a transaction on ``key``'s slot waits for now."""
        self._due()
        return self.required(self._node(key)[0])

    def execute(self, key: str, commands: Sequence[Command]) -> list[Any]:
        """Run ``commands`` in one transaction on the master of ``key``'s slot, then ``WAIT``.

        Raises :class:`ReplicaShortfall` when the transaction executed but too few
        replicas confirmed it in time: call :meth:`confirm` (not this again) until it passes.
        """
        (result,) = self.execute_many([(key, commands)])
        if isinstance(result, BaseException):
            raise result
        return list(result)

    def execute_many(self, work: Sequence[tuple[str, Sequence[Command]]]) -> list[list[Any] | Exception]:
        """Several transactions, each of one slot (``(key, commands)``): those of one master back
        to back over one connection and one ``WAIT`` after them, every master in the same round
        trip. Per transaction its results, or the exception it failed with (a
        :class:`ReplicaShortfall` when it executed but its replicas did not confirm it; a
        connection error when it may or may not have executed)."""
        self._due()
        batches: dict[str, _Batch] = {}
        for i, (key, commands) in enumerate(work):
            master, node = self._node(key)
            b = batches.get(master)
            if b is None:
                b = batches[master] = _Batch(node, master, self.required(master))
            b.items.append((i, commands))
        out: list[Any] = [None] * len(work)
        sent = []
        for b in batches.values():
            try:
                b.send(self.timeout_ms)
            except Exception as exc:
                for i, _c in b.items:
                    out[i] = exc
                continue
            sent.append(b)
        for b in sent:
            b.read(self.timeout_ms, out)
        if any(isinstance(r, _REDIRECTS) for r in out):
            self.mark_stale()  # a failover, or a slot moved: the topology and the replicas again
        return out

    def confirm(self, sync_key: str) -> None:
        """Wait until the replicas hold everything written to ``sync_key``'s master so far.

        ``WAIT`` counts one connection's writes, and a transaction whose reply was
        lost was written by a connection that is gone: a write of ``sync_key``
        (same slot, expiring) then ``WAIT``. Replicas apply a master's writes in
        order, so once they hold this one they hold every earlier one.
        """
        if self.waits(sync_key):
            self.execute(sync_key, [("SET", sync_key, b"1", "PX", 60_000)])
