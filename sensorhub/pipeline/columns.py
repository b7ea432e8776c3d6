"""Stream entries to the columns of one INSERT: the writer's batch.

A batch holds, for the stream entries it was built from, in their order:
the readings as ClickHouse Native blocks (one segment per entry, made in C
by :func:`~sensorhub.pipeline.streams.native_block`, no Python object per
reading), the trades and the dead letters as columns, and per entry the
audit counts its acknowledgement adds. Readings whose device time cannot be
right (:mod:`sensorhub.pipeline.rejected`) and entries that do not decode
become dead letters here, in the same batch; rows ClickHouse refuses for
themselves are turned into dead letters by :meth:`EntryColumns.refuse_reading`
and :meth:`EntryColumns.refuse_trade`, their audit counts moved with them.
A batch built again from the same entries with the same window is the same
batch: the exactly-once protocol (:mod:`sensorhub.pipeline.delivery`)
relies on it.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sensorhub.decoders import ReadingBatch
from sensorhub.errors import DecodeError
from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.entrycodec_py import NATIVE_COLUMNS
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.lag import id_tuple
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

__all__ = ["DLQ_COLS", "READING_COLS", "TRADE_COLS", "Batch", "EntryColumns", "Readings", "native_rows"]

log = logging.getLogger("sensorhub.pipeline.writer")  # these lines are the writer's, for whoever reads its log

READING_COLS = [name for name, _ in NATIVE_COLUMNS]
TRADE_COLS = ["venue", "symbol", "trade_id", "price", "amount", "side", "ts", "recv"]
DLQ_COLS = ["source", "topic", "payload", "error", "recv", "entry_id"]


class Readings:
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


def native_rows(blk: Any, rows: Sequence[int], source: str) -> bytes:
    """A Native block of some rows of a decoded entry block (through the entry codec, as the whole ones)."""
    b = ReadingBatch(max(1, len(rows)))
    dev, met = blk.devices, blk.metrics
    for i in rows:
        b.append(dev[blk.dev[i]], met[blk.met[i]], blk.ts_us[i], blk.value[i], blk.quality[i], blk.seq[i], blk.recv_us[i])
    native: bytes = native_block(encode_block(b, blk.decode_ns), source)[0]
    return native


class Batch:
    """The columns of a batch of stream entries, and per entry what its acknowledgement counts."""

    def __init__(self, window: DeviceTimeWindow | None = None) -> None:
        self.window = window  # the device-time window it was built with (the writer's when None)
        self.entries: list[tuple[str, str]] = []
        self.audit: list[list[tuple[str, str, int]]] = []
        self.readings: list[Readings] = []  # one segment per stream entry with readings to insert
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

    def add_empty(self, stream: str, entry_id: str) -> None:
        """An entry with nothing to insert (deleted while pending, or acknowledged and trimmed): only acked."""
        if not self.entries:
            self.first = time.monotonic()
        self.entries.append((stream, entry_id))
        self.audit.append([])

    def readings_native(self, lo: int, hi: int) -> bytes:
        """Native blocks of the batch's readings ``[lo, hi)`` (whole entries as they came)."""
        out: list[bytes] = []
        pos = 0
        for seg in self.readings:
            n = len(seg)
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                if (a, b) == (pos, pos + n):
                    out.append(seg.native)
                else:
                    out.append(native_rows(seg.blk, [seg.row(k) for k in range(a - pos, b - pos)], seg.source))
            pos += n
            if pos >= hi:
                break
        return b"".join(out)

    def dead_row(self, source: str, topic: str, payload: bytes, error: str, recv_us: int, entry_id: str) -> None:
        d = self.dead
        d["source"].append(source)
        d["topic"].append(topic)
        d["payload"].append(payload)
        d["error"].append(error)
        d["recv"].append(recv_us)
        d["entry_id"].append(entry_id)

    def dead_reading(self, stream: str, entry_id: str, source: str, blk: Any, i: int, why: str) -> None:
        """Row ``i`` of an entry block as a dead letter that ``sensorhub dlq replay`` decodes again."""
        device = blk.devices[blk.dev[i]]
        payload = reading_payload(
            device, blk.metrics[blk.met[i]], blk.value[i], blk.ts_us[i], blk.seq[i], blk.quality[i]
        )
        # unique across streams and rows, and the same in every replay of the entry
        self.dead_row(source, READING_TOPIC + device, payload, why, blk.recv_us[i], f"{stream}/{entry_id}/{i}")


class EntryColumns:
    """Adds stream entries to a :class:`Batch`, with the audit keys of ``layout``."""

    def __init__(self, layout: StreamLayout, metrics: Metrics, window: DeviceTimeWindow) -> None:
        self.layout = layout
        self.metrics = metrics
        self.window = window  # for batches that were not given their own

    def add(self, batch: Batch, stream: str, entry_id: str, fields: dict[bytes, bytes], read_ns: int) -> None:
        """Entry ``entry_id`` of ``stream`` (its ``fields`` as XREADGROUP returned them) into ``batch``."""
        if not batch.entries:
            batch.first = time.monotonic()
            batch.read_ns = read_ns
        if batch.window is None:
            batch.window = self.window
        batch.entries.append((stream, entry_id))
        entry = len(batch.entries) - 1
        xadd_ms = id_tuple(entry_id)[0]
        audit: list[tuple[str, str, int]] = []
        # counted in the partition of the stream, so the ack script touches one slot
        part = self.layout.partition_of(stream)
        if self.layout.is_dlq(stream):
            src = fields.get(b"src", b"?").decode(errors="replace")
            recv_ns = int(fields.get(b"recv_ns", b"0") or 0)
            d = batch.dead
            d["source"].append(src)
            d["topic"].append(fields.get(b"topic", b"").decode(errors="replace"))
            d["payload"].append(fields.get(b"payload", b""))
            d["error"].append(fields.get(b"error", b"").decode(errors="replace"))
            d["recv"].append(recv_ns // 1000)
            # unique across the partitions' streams (their ids may repeat), as dlq replay needs;
            # the stream of earlier releases keeps its bare ids, which earlier replays recorded
            d["entry_id"].append(entry_id if stream == self.layout.legacy_dlq else f"{stream}/{entry_id}")
            audit.append((self.layout.audit_key(src, recv_ns // 60_000_000_000, part), "dead_inserted", 1))
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
                    native = native_rows(blk, rows, source) if rows else b""
                    recv = array("q", (blk.recv_us[i] for i in rows))
                    dev_ts = array("q", (blk.ts_us[i] for i in rows))
                    for i, why in outside:
                        batch.dead_reading(stream, entry_id, source, blk, i, why)
                    audit.extend(self.audit_counts(source, (blk.recv_us[i] for i in bad), "writer_dead_lettered", part))
                    self.metrics.inc("device_time_dead_lettered", len(outside))
                    log.warning(
                        "%d readings of %s dead-lettered for their device time (first: %s)",
                        len(outside), blk.devices[blk.dev[outside[0][0]]], outside[0][1],
                    )
                n = len(rows) if rows is not None else len(blk)
                if n:
                    batch.readings.append(Readings(entry, source, blk, rows, native))
                batch.reading_rows += n
                batch.device_ts.append(dev_ts)
        except (DecodeError, KeyError) as exc:
            # A damaged entry is kept as a dead letter, never dropped.
            batch.dead_row(source, stream, fields.get(F_BLOCK, b""), f"stream entry does not decode: {exc}",
                           xadd_ms * 1000, entry_id)
            batch.audit.append([(self.layout.audit_key(source, xadd_ms // 60_000, part), "dead_inserted", 1)])
            return
        batch.rows += n
        batch.recv_us.append(recv)
        batch.xadd_ms.append((xadd_ms, n))
        if n:
            m0, m1 = recv[0] // 60_000_000, recv[-1] // 60_000_000
            if m0 == m1:
                audit.append((self.layout.audit_key(source, m0, part), "inserted", n))
            else:
                audit.extend(self.audit_counts(source, recv, "inserted", part))
        batch.audit.append(audit)

    def audit_counts(
        self, source: str, recv_us: Iterable[int], field: str, part: int | None
    ) -> list[tuple[str, str, int]]:
        """Audit increments of ``field``, one per minute of ``recv_us``, counted in partition ``part``."""
        per: dict[int, int] = defaultdict(int)
        for v in recv_us:
            per[v // 60_000_000] += 1
        return [(self.layout.audit_key(source, mm, part), field, c) for mm, c in per.items()]

    def refuse_reading(self, batch: Batch, row: int, why: str) -> None:
        """Reading ``row`` of the batch's readings, refused by ClickHouse, becomes a dead letter."""
        pos = 0
        for seg in batch.readings:
            if row < pos + len(seg):
                break
            pos += len(seg)
        i = seg.row(row - pos)
        stream, entry_id = batch.entries[seg.entry]
        batch.dead_reading(stream, entry_id, seg.source, seg.blk, i, f"refused by ClickHouse: {why}")
        key = self.layout.audit_key(seg.source, seg.blk.recv_us[i] // 60_000_000, self.layout.partition_of(stream))
        batch.audit[seg.entry] += [(key, "inserted", -1), (key, "writer_dead_lettered", 1)]
        batch.rows -= 1
        batch.reading_rows -= 1
        log.warning("a reading of %s refused by ClickHouse, dead-lettered: %s", seg.blk.devices[seg.blk.dev[i]], why)

    def refuse_trade(self, batch: Batch, row: int, why: str) -> None:
        """Trade ``row`` of the batch, refused by ClickHouse, becomes a dead letter."""
        t = batch.trades
        entry = batch.trade_entry[row]
        stream, entry_id = batch.entries[entry]
        source = batch.entry_source[entry]
        payload = trade_payload((c, t[c][row]) for c in TRADE_COLS)
        recv = t["recv"][row]
        batch.dead_row(source, f"{TRADE_TOPIC}{t['venue'][row]}/{t['symbol'][row]}", payload,
                       f"refused by ClickHouse: {why}", recv, f"{stream}/{entry_id}/{row - batch.trade_start[entry]}")
        key = self.layout.audit_key(source, recv // 60_000_000, self.layout.partition_of(stream))
        batch.audit[entry] += [(key, "inserted", -1), (key, "writer_dead_lettered", 1)]
        batch.rows -= 1
        log.warning("a trade of %s refused by ClickHouse, dead-lettered: %s", t["venue"][row], why)
