"""Process lifecycle: stop on SIGTERM/SIGINT, drain within a bound, keep the watchdog fed.

A sensorhub process (ingest, writer, chdb-server) runs like this::

    life = Lifecycle("ingest mqtt")
    life.install_signal_handlers()          # SIGTERM/SIGINT -> life.stop + STOPPING=1
    connect()                               # extend_timeout() while waiting for peers
    life.ready(format_status(...))          # READY=1, once able to work
    while not life.stop.is_set():           # the real work loop
        do_one_batch()
        life.watchdog.tick()                # WATCHDOG=1, paced; stops when the loop hangs
        life.status_every(format_status(...))  # at most once a second
    result = drain(flush_some, timeout_s=20, watchdog=life.watchdog)
    return 0 if result.complete else 1

The stop request is a :class:`threading.Event`, so threads and blocking loops
can wait on it. asyncio code passes its loop to
:meth:`Lifecycle.install_signal_handlers` and adds a stop callback that sets
its own ``asyncio.Event``. A second SIGINT while draining raises
``KeyboardInterrupt`` (someone at a terminal wants out now); a second SIGTERM
is ignored, because systemd follows it with SIGKILL after ``TimeoutStopSec``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType

from sensorhub.service import notify

__all__ = [
    "DEFAULT_DRAIN_S",
    "DrainResult",
    "Lifecycle",
    "drain",
    "drain_async",
]

log = logging.getLogger(__name__)

# The drain bound when the caller names none: well inside the units'
# TimeoutStopSec (30 s), so the process exits on its own before SIGKILL.
DEFAULT_DRAIN_S = 20.0

# Upper bound on drain iterations, so a step that returns at once without
# progress cannot spin a core for the whole bound unnoticed.
MAX_DRAIN_STEPS = 1_000_000


class Lifecycle:
    """Stop request, readiness and watchdog of one service process.

    ``name`` appears in logs. ``watchdog`` is the process's
    :class:`~sensorhub.service.notify.Watchdog` (from ``WATCHDOG_USEC``
    unless given).
    """

    def __init__(
        self,
        name: str,
        *,
        watchdog: notify.Watchdog | None = None,
        status_interval_s: float = 1.0,
    ) -> None:
        self.name = name
        self.stop = threading.Event()
        self.watchdog = watchdog if watchdog is not None else notify.Watchdog()
        self.stop_reason = ""
        self.is_ready = False
        self._status_interval_s = status_interval_s
        self._next_status = -math.inf
        self._callbacks: list[Callable[[], object]] = []
        self._previous: dict[int, object] = {}
        self._signals_seen = 0

    # readiness and status

    def ready(self, status_text: str | None = None) -> None:
        """Send ``READY=1`` (with a first ``STATUS=``) and ping the watchdog; later calls only update the status."""
        if self.is_ready:
            if status_text is not None:
                notify.status(status_text)
            return
        self.is_ready = True
        notify.ready(status_text)
        self.watchdog.tick()
        log.info("%s ready%s", self.name, f": {status_text}" if status_text else "")

    def status_every(self, status_text: str | Callable[[], str]) -> bool:
        """Send ``STATUS=`` if the status interval has passed; a callable is only evaluated then."""
        now = time.monotonic()
        if now < self._next_status:
            return False
        self._next_status = now + self._status_interval_s
        text = status_text() if callable(status_text) else status_text
        return notify.status(text)

    # stopping

    def add_stop_callback(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` once when a stop is requested (e.g. to set an ``asyncio.Event``)."""
        self._callbacks.append(fn)

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the work loop to stop: set :attr:`stop`, send ``STOPPING=1``, run the callbacks. Idempotent."""
        if self.stop.is_set():
            return
        self.stop_reason = reason
        self.stop.set()
        notify.stopping(f"draining ({reason})")
        log.info("%s stopping: %s", self.name, reason)
        for fn in self._callbacks:
            try:
                fn()
            except Exception:  # a broken callback must not keep the others from running
                log.exception("%s: stop callback %r failed", self.name, fn)

    def _on_signal(self, signum: int, frame: FrameType | None = None) -> None:
        self._signals_seen += 1
        name = signal.Signals(signum).name
        if self.stop.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning("%s: %s again while draining; the drain continues", self.name, name)
            return
        self.request_stop(name)

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Route SIGTERM and SIGINT to :meth:`request_stop`.

        Call from the main thread. With ``loop`` the handlers are installed
        with ``loop.add_signal_handler`` (they then run in the loop). Undo with
        :meth:`restore_signal_handlers`.
        """
        for sig in (signal.SIGTERM, signal.SIGINT):
            if loop is not None:
                loop.add_signal_handler(sig, self._on_signal, int(sig), None)
                self._previous[int(sig)] = loop
            else:
                self._previous[int(sig)] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before :meth:`install_signal_handlers`."""
        for signum, previous in self._previous.items():
            if isinstance(previous, asyncio.AbstractEventLoop):
                previous.remove_signal_handler(signum)
            else:
                signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()


@dataclass(frozen=True, slots=True)
class DrainResult:
    """How a drain ended: ``complete`` when the step reported nothing left before the bound."""

    complete: bool
    elapsed_s: float
    steps: int


def _check_bound(timeout_s: float) -> None:
    if not (timeout_s >= 0 and math.isfinite(timeout_s)):
        raise ValueError(f"drain timeout must be a finite number of seconds >= 0, got {timeout_s!r}")


class _DrainBound:
    """The clock and step count of one drain, shared by :func:`drain` and :func:`drain_async`."""

    def __init__(self, timeout_s: float) -> None:
        _check_bound(timeout_s)
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.steps = 0

    def next_step(self) -> float | None:
        """The seconds left for one more step (counting it), or None once the bound or the step cap is reached."""
        if self.steps >= MAX_DRAIN_STEPS:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.steps += 1
        return remaining

    def result(self, done: bool, what: str) -> DrainResult:
        elapsed = time.monotonic() - self.start
        if not done:
            log.warning("%s incomplete after %.1f s (%d steps); the rest stays upstream", what, elapsed, self.steps)
        return DrainResult(done, elapsed, self.steps)


def drain(
    step: Callable[[float], bool],
    *,
    timeout_s: float = DEFAULT_DRAIN_S,
    watchdog: notify.Watchdog | None = None,
    what: str = "drain",
) -> DrainResult:
    """Call ``step(remaining_s)`` until it returns ``True`` (nothing left) or ``timeout_s`` passes.

    A bound of 0 runs no step. ``step`` does one bounded piece of work (flush one block, finish one
    INSERT) and should not block longer than ``remaining_s``. The watchdog is
    ticked between steps, so a long but moving drain is not killed by it.
    The result says whether the drain completed; what is left over must be
    safe to lose here (it is still in Redis or the broker), which is why the
    bound can be strict.
    """
    bound = _DrainBound(timeout_s)
    done = False
    while (remaining := bound.next_step()) is not None:
        done = bool(step(remaining))
        if watchdog is not None:
            watchdog.tick()
        if done:
            break
    return bound.result(done, what)


async def drain_async(
    step: Callable[[float], Awaitable[bool]],
    *,
    timeout_s: float = DEFAULT_DRAIN_S,
    watchdog: notify.Watchdog | None = None,
    what: str = "drain",
) -> DrainResult:
    """:func:`drain` for asyncio: awaits ``step(remaining_s)``, cancelling it when the bound passes."""
    bound = _DrainBound(timeout_s)
    done = False
    while (remaining := bound.next_step()) is not None:
        try:
            done = bool(await asyncio.wait_for(step(remaining), timeout=remaining))
        except TimeoutError:
            done = False
            break
        if watchdog is not None:
            watchdog.tick()
        if done:
            break
    return bound.result(done, what)
