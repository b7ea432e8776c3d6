"""The engine's background merge threads run at a lower CPU priority than its inserts.

On a line-side box everything shares two cores: the broker, the ingest, the
writer and the engine. ClickHouse merges parts in its ``MergeMutate``
threads (and moves them in ``Move``); a big merge that takes a whole core at
the same priority as the inserts shows up as an insert stall, so as a jump
in tick-to-database latency. With a positive nice value the scheduler still
gives merges every idle cycle and a share under load (nice 10 weighs about a
tenth of nice 0), so parts keep being merged, but an insert that wakes up
runs first.

ClickHouse has no setting for the priority of its background pools, so the
server lowers it per thread (Linux: ``setpriority(PRIO_PROCESS, tid)``). The
engine starts its pool threads lazily, so :class:`BackgroundPriority` looks
again on every call (the server calls it once a second); a thread is
adjusted once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["BACKGROUND_THREADS", "BackgroundPriority", "thread_nice"]

log = logging.getLogger(__name__)

#: Thread names (``/proc/self/task/*/comm``) of the engine's background work on parts.
BACKGROUND_THREADS = frozenset({"MergeMutate", "Move"})

_TASKS = Path("/proc/self/task")


def thread_nice(pid: int, tid: int) -> int:
    """The nice value of thread ``tid`` of process ``pid`` (field 19 of its stat line)."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])


class BackgroundPriority:
    """Gives the engine's merge and move threads the nice value ``nice`` (0: leave them alone)."""

    def __init__(self, nice: int) -> None:
        if not 0 <= nice <= 19:
            raise ValueError("nice must be 0..19")
        self.nice = nice
        self._done: set[int] = set()

    def apply(self) -> int:
        """Adjust the background threads not seen yet; returns how many were adjusted now."""
        if not self.nice or not _TASKS.is_dir():
            return 0
        n = 0
        for entry in _TASKS.iterdir():
            tid = int(entry.name)
            if tid in self._done:
                continue
            try:
                name = (entry / "comm").read_text().strip()
            except OSError:  # the thread ended meanwhile
                continue
            if name not in BACKGROUND_THREADS:
                continue
            try:
                os.setpriority(os.PRIO_PROCESS, tid, self.nice)
            except OSError as exc:
                log.warning("cannot lower the priority of engine thread %s (%d): %s", name, tid, exc)
            self._done.add(tid)
            n += 1
        return n
