"""The writer's ClickHouse thread: one batch's INSERT runs while the loop reads and decodes the next.

Everything the writer sends to ClickHouse after start-up goes through this one thread, in the
order it was handed over: a batch's exactly-once protocol (:meth:`Delivery.flush`), and the
periodic exports (``hop_latency``, ``ingest_audit``). So the protocol's steps stay serial, one
intent at a time per consumer, as before. With ``writer.overlap`` the loop goes on reading
entries (and building the next batch's columns) while an INSERT is in flight, instead of leaving
them in Redis until it returns; without it (the default) the loop waits for each batch here,
except while it is behind (``writer.overlap_behind``: its last read filled ``read_count``), when a
backlog drains with the loop and the engine working at once.

At most one batch is handed over and not yet done (:meth:`submit_batch` waits for the previous
one): the writer holds at most two batches in memory, the one being inserted and the one
growing, and once that one is full the loop stops reading. Back-pressure is unchanged: while
ClickHouse is down the thread waits the outage out with the batch, the loop stops at a full
batch, and the entries stay in Redis.

An exception in the thread (``InterruptedError`` when the writer stops while waiting out an
outage, or a bug) is raised again in the loop at its next call here.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

__all__ = ["InsertThread"]


class InsertThread:
    """Runs callables one after another on a thread of its own; at most one of them a batch."""

    def __init__(self, name: str, beat: Callable[[], object]) -> None:
        self._beat = beat  # called while the loop waits here (the watchdog)
        self._tasks: collections.deque[tuple[Callable[[], None], bool]] = collections.deque()
        self._cond = threading.Condition()
        self._batch = False  # a batch handed over and not done
        self._running = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- the loop's side ----
    def busy(self) -> bool:
        """A batch is being inserted (or waits its turn)."""
        return self._batch

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after what was handed over before; does not wait."""
        self._put(fn, batch=False)

    def submit_batch(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a batch's delivery) once the previous batch is done; waits for that."""
        self.wait_batch()
        self._put(fn, batch=True)

    def wait_batch(self, timeout_s: float | None = None) -> bool:
        """Until no batch is in flight (True), or ``timeout_s`` passed (False)."""
        return self._wait(lambda: not self._batch, timeout_s)

    def drain(self) -> None:
        """Until everything handed over is done."""
        self._wait(lambda: not self._tasks and not self._running, None)

    def close(self) -> None:
        """Drain, then end the thread."""
        self.drain()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    def _put(self, fn: Callable[[], None], batch: bool) -> None:
        self._raise()
        with self._cond:
            self._tasks.append((fn, batch))
            if batch:
                self._batch = True
            self._cond.notify_all()

    def _wait(self, done: Callable[[], bool], timeout_s: float | None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not done() and self._error is None:
                step = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if step <= 0:
                    break
                if not self._cond.wait(step):
                    self._beat()  # a long wait (an outage): the watchdog goes on ticking
            ok = done()
        self._raise()
        return ok

    def _raise(self) -> None:
        err = self._error
        if err is not None:
            self._error = None
            raise err

    # ---- the thread ----
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._closed:
                    self._cond.wait()
                if not self._tasks:
                    return
                fn, batch = self._tasks.popleft()
                self._running = True
            try:
                fn()
            except BaseException as exc:  # handed to the loop, which raises it
                with self._cond:
                    self._error = exc
                    self._tasks.clear()  # a batch waiting behind this task is dropped with it
                    self._batch = False
            finally:
                with self._cond:
                    self._running = False
                    if batch:
                        self._batch = False
                    self._cond.notify_all()
