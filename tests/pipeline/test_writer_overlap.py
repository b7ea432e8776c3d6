"""The writer reads the next batch while an INSERT is in flight, holds at most one batch more, and stores each reading once.

The INSERT is held in flight by stopping the chdb-server (SIGSTOP): the writer's HTTP request
waits. Entries added meanwhile are read by the writer (delivered to its consumer, not yet
acknowledged) up to one full batch, and no further: the rest stay in Redis, undelivered.
With ``writer.overlap`` off, nothing is read while the INSERT waits.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kit.streams import create_groups, series_entry

from sensorhub.config import load_settings
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.writer import Writer

T0 = 1_764_072_000_000_000
ROWS = 10  # readings per entry


def _delivered(r: Any, layout: StreamLayout) -> int:
    """Entries read by a consumer of the group and not acknowledged."""
    return sum(r.xpending(s, "writers")["pending"] for s in layout.all_streams())


def _until(cond: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(cond())


def _setup(redis_client: Any, redis_server: Any, chdb: Any, database: str, **writer: Any) -> tuple[StreamLayout, Any]:
    """One partition with its groups, and a writer's settings: batches of 5 entries, read 2 at a time."""
    layout = StreamLayout("sh", 1)
    create_groups(redis_client, layout)
    settings = load_settings(
        redis={"url": redis_server.url, "partitions": 1},
        clickhouse={"url": chdb.url, "database": database},
        writer={"consumer": "w", "batch_rows": 5 * ROWS, "read_count": 2, "min_batch_ms": 0, **writer},
    )
    return layout, settings


@contextlib.contextmanager
def _writer(settings: Any, redis_client: Any, layout: StreamLayout) -> Iterator[Writer]:
    """A writer running on a thread; on leaving, stopped, and checked to have stopped cleanly with nothing in flight."""
    w = Writer(settings)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(w.run()), daemon=True)
    t.start()
    try:
        yield w
    finally:
        w.stop_event.set()
        t.join(30)
    assert not t.is_alive() and result == [0]  # a clean stop, with nothing left in flight
    assert not redis_client.exists(layout.intent("w"))


def _stored(url: str, database: str) -> tuple[int, int]:
    """count() and distinct seq of the readings table."""
    import clickhouse_connect

    ch = clickhouse_connect.get_client(dsn=url)
    try:
        count, distinct = ch.query(f"SELECT count(), uniqExact(seq) FROM {database}.readings").result_rows[0]
    finally:
        ch.close()
    return int(count), int(distinct)


@pytest.mark.parametrize("overlap", [True, False])
def test_entries_are_read_while_an_insert_waits_up_to_one_batch(
    overlap: bool, redis_client: Any, redis_server: Any, spawn: Any, ch_database: str
) -> None:
    chdb = spawn.chdb()
    layout, settings = _setup(redis_client, redis_server, chdb, ch_database, overlap=overlap, batch_ms=20)
    stream = layout.readings(0)
    seq = 0

    def add(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            redis_client.xadd(stream, series_entry("dev", ROWS, T0 + seq * 1000))
            seq += 1

    with _writer(settings, redis_client, layout) as w:
        add(1)
        assert _until(lambda: w.metrics.counters.get("readings", 0) == ROWS)  # schema made, one batch in
        chdb.stop()  # SIGSTOP: the next INSERT waits
        try:
            add(1)
            assert _until(lambda: _delivered(redis_client, layout) == 1)  # read, and its INSERT in flight
            time.sleep(0.3)
            add(20)
            time.sleep(1.5)
            delivered = _delivered(redis_client, layout)
            if overlap:
                # the one in flight, then reads of at most 2 entries until the next batch holds
                # batch_rows: 5 entries, or 6 when the read that filled it took two
                assert 1 + 5 <= delivered <= 1 + 6, delivered
            else:
                assert delivered == 1, delivered
            assert w.metrics.counters.get("readings", 0) == ROWS
        finally:
            chdb.cont()
        assert _until(lambda: w.metrics.counters.get("readings", 0) == 22 * ROWS, 30), w.metrics.counters
        assert _until(lambda: _delivered(redis_client, layout) == 0)
    assert _stored(chdb.url, ch_database) == (22 * ROWS, 22 * ROWS)


@pytest.mark.parametrize("overlap_behind", [True, False])
def test_with_a_backlog_the_next_batch_is_read_while_an_insert_waits(
    overlap_behind: bool, redis_client: Any, redis_server: Any, spawn: Any, ch_database: str
) -> None:
    """With ``writer.overlap`` off, a backlog (reads that fill ``read_count``) still overlaps the next
    batch's read with the INSERT in flight when ``writer.overlap_behind`` is on, and only then."""
    chdb = spawn.chdb()
    layout, settings = _setup(redis_client, redis_server, chdb, ch_database, overlap=False,
                              overlap_behind=overlap_behind, batch_ms=5000)
    stream = layout.readings(0)
    with _writer(settings, redis_client, layout) as w:
        redis_client.xadd(stream, series_entry("dev", ROWS, T0))
        assert _until(lambda: w.metrics.counters.get("readings", 0) == ROWS)  # schema made, one batch in
        chdb.stop()  # SIGSTOP: the next INSERT waits
        try:
            with redis_client.pipeline(transaction=True) as p:  # a backlog of 20 entries at once, read 2 at a time
                for seq in range(1, 21):
                    p.xadd(stream, series_entry("dev", ROWS, T0 + seq * 1000))
                p.execute()
            # the first batch fills at 6 entries (three full reads) and its INSERT waits
            assert _until(lambda: _delivered(redis_client, layout) >= 6)
            time.sleep(1.5)
            delivered = _delivered(redis_client, layout)
            if overlap_behind:
                # behind: the loop went on to fill the next batch (6 more), and stopped there
                assert delivered == 12, delivered
            else:
                assert delivered == 6, delivered
        finally:
            chdb.cont()
        assert _until(lambda: w.metrics.counters.get("readings", 0) == 21 * ROWS, 30), w.metrics.counters
        assert _until(lambda: _delivered(redis_client, layout) == 0)
    assert _stored(chdb.url, ch_database) == (21 * ROWS, 21 * ROWS)
