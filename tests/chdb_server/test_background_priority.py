"""The engine's merge threads run niced below its inserts, in the real chdb-server process."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from sensorhub.chdb_server.threads import BACKGROUND_THREADS, BackgroundPriority, thread_nice


def _threads(pid: int) -> dict[int, str]:
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(t.name)] = (t / "comm").read_text().strip()
        except OSError:
            continue
    return out


def test_merge_threads_of_the_server_are_niced(chdb_server: Any, ch_client: Any, ch_database: str) -> None:
    if not hasattr(chdb_server, "proc") or chdb_server.proc is None:
        pytest.skip("an external ClickHouse: not our process")
    pid = chdb_server.proc.pid
    # a few parts, so the engine has merge work and its pool threads exist
    ch_client.command(f"CREATE TABLE {ch_database}.nice_t (a UInt64) ENGINE = MergeTree ORDER BY a")
    for i in range(5):
        ch_client.command(f"INSERT INTO {ch_database}.nice_t SELECT number FROM numbers({i * 100}, 100)")
    deadline = time.monotonic() + 20
    while True:
        merges = {tid: name for tid, name in _threads(pid).items() if name in BACKGROUND_THREADS}
        nices = {tid: thread_nice(pid, tid) for tid in merges}
        if merges and all(n == 10 for n in nices.values()):
            break
        assert time.monotonic() < deadline, f"background threads {merges} have nice values {nices}"
        time.sleep(0.2)
    # the server's own threads (HTTP handlers, which run the inserts) keep the process's priority
    own = [tid for tid, name in _threads(pid).items() if name.startswith("python") or name == "http"]
    assert own and all(thread_nice(pid, tid) == 0 for tid in own)


def test_zero_leaves_threads_alone_and_bad_values_are_refused() -> None:
    assert BackgroundPriority(0).apply() == 0
    with pytest.raises(ValueError):
        BackgroundPriority(20)
    assert thread_nice(os.getpid(), os.getpid()) == os.getpriority(os.PRIO_PROCESS, 0)
