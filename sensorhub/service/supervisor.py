"""A small process supervisor with systemd's ``Type=notify`` + ``Restart=always`` semantics.

It runs a list of commands (``sensorhub stack`` runs the appliance with it on
a box without systemd; the tests run real processes with it) and keeps each
one up on its own, the way the units in ``systemd/`` do:

- each child gets ``NOTIFY_SOCKET`` (one abstract-namespace datagram socket
  owned by the supervisor) and, with a watchdog, ``WATCHDOG_USEC`` and
  ``WATCHDOG_PID``; only messages from the child's main PID count
  (``NotifyAccess=main``, checked with ``SCM_CREDENTIALS``);
- ``READY=1`` ends the start; a child that is not ready within
  ``start_timeout_s`` is stopped and restarted (``TimeoutStartSec``);
  ``EXTEND_TIMEOUT_USEC`` moves that deadline, ``STATUS=`` is kept;
- a ready child that sends no ``WATCHDOG=1`` for ``watchdog_sec`` gets
  SIGABRT, then SIGKILL (``WatchdogSec``, ``WatchdogSignal=SIGABRT``);
- whatever ends a child, it is started again ``restart_sec`` after its exit
  (``Restart=always``, ``RestartSec``), except for an exit status in
  ``restart_prevent_exit_status`` (78, configuration error) or when more than
  ``start_limit_burst`` starts fall within ``start_limit_interval_s``; the child
  is then ``failed`` and stays down;
- a child's exit is seen at once through a pidfd, so the restart follows the
  exit by ``restart_sec`` plus the time to spawn;
- one child's exit never touches another;
- :meth:`Supervisor.stop` stops the children in reverse list order (the list
  is the start order, as along an ``After=`` chain): SIGTERM to the child's PID,
  up to its ``stop_timeout_s``, then SIGKILL to its process group.

All waiting is bounded; the supervisor runs one thread that owns every child.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "ChildSpec",
    "ChildState",
    "Supervisor",
]

log = logging.getLogger(__name__)

State = Literal["starting", "running", "stopping", "waiting", "failed", "stopped"]

# Notification datagrams longer than this are cut (systemd reads at most a
# page); STATUS lines are short.
_MAX_DATAGRAM = 4096
# The monitor loop wakes at least this often even with nothing to do, so a
# lost wake-up costs at most this much.
_MAX_SLEEP_S = 0.25
# Restart times kept per child for inspection.
_RESTART_HISTORY = 256
# Exec shim: sets WATCHDOG_PID to the PID the command will have (exec keeps it).
_SHIM = 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"'
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One supervised command and its unit-like settings (seconds throughout)."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    notify: bool = True
    restart_sec: float = 0.5
    watchdog_sec: float | None = None
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 10.0
    start_limit_interval_s: float = 120.0
    start_limit_burst: int = 40
    restart_prevent_exit_status: frozenset[int] = frozenset({78})
    output: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.argv:
            raise ValueError("a child needs a name and a command")
        for key in ("restart_sec", "start_timeout_s", "stop_timeout_s", "start_limit_interval_s"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{self.name}: {key} must be a finite number >= 0, got {value!r}")
        if self.watchdog_sec is not None and not (self.watchdog_sec > 0 and math.isfinite(self.watchdog_sec)):
            raise ValueError(f"{self.name}: watchdog_sec must be > 0, got {self.watchdog_sec!r}")
        if self.start_limit_burst < 1:
            raise ValueError(f"{self.name}: start_limit_burst must be >= 1")


@dataclass(frozen=True, slots=True)
class ChildState:
    """A snapshot of one child. Times are ``time.monotonic()`` values; ``None`` when not yet.

    ``starts`` counts spawns, ``restarts`` the automatic ones among them.
    ``last_recovery_s`` is the time from the last unplanned exit to READY of
    the next run. ``exits`` holds the recent exit codes (negative: signal).
    """

    name: str
    state: State
    pid: int | None
    starts: int
    restarts: int
    started_at: float | None
    ready_at: float | None
    exited_at: float | None
    last_exit: int | None
    last_recovery_s: float | None
    status: str
    watchdog_pings: int
    watchdog_kills: int
    start_timeouts: int
    restart_times: tuple[float, ...]
    exits: tuple[int, ...]

    @property
    def ready(self) -> bool:
        """True while the current run has sent READY=1 (or is not a notify child) and not exited."""
        return self.state == "running"


class _Child:
    """Mutable bookkeeping of one child; touched only with the supervisor lock held."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.output_fd: int | None = None
        self.state: State = "waiting"
        self.starts = 0
        self.restarts = 0
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.exited_at: float | None = None
        self.last_exit: int | None = None
        self.last_recovery_s: float | None = None
        self.status = ""
        self.watchdog_pings = 0
        self.watchdog_kills = 0
        self.start_timeouts = 0
        self.last_ping: float = 0.0
        self.start_deadline = math.inf
        self.kill_deadline = math.inf  # SIGKILL after this once we asked it to go
        self.next_start: float = 0.0  # when to spawn, while "waiting"
        self.start_history: deque[float] = deque()
        self.restart_times: deque[float] = deque(maxlen=_RESTART_HISTORY)
        self.exits: deque[int] = deque(maxlen=_RESTART_HISTORY)
        self.down_since: float | None = None  # unplanned exit not yet recovered

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def snapshot(self) -> ChildState:
        return ChildState(
            name=self.spec.name,
            state=self.state,
            pid=self.pid,
            starts=self.starts,
            restarts=self.restarts,
            started_at=self.started_at,
            ready_at=self.ready_at,
            exited_at=self.exited_at,
            last_exit=self.last_exit,
            last_recovery_s=self.last_recovery_s,
            status=self.status,
            watchdog_pings=self.watchdog_pings,
            watchdog_kills=self.watchdog_kills,
            start_timeouts=self.start_timeouts,
            restart_times=tuple(self.restart_times),
            exits=tuple(self.exits),
        )


class Supervisor:
    """Start, watch and restart a list of child commands; see the module docstring.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, specs: Iterable[ChildSpec]) -> None:
        self._children: dict[str, _Child] = {}
        for spec in specs:
            if spec.name in self._children:
                raise ValueError(f"two children named {spec.name!r}")
            self._children[spec.name] = _Child(spec)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self.notify_socket = f"@sensorhub-supervisor-{os.getpid()}-{secrets.token_hex(6)}"
        self.ignored_notifications = 0

    # --- public API -------------------------------------------------------

    def start(self) -> None:
        """Open the notify socket, spawn every child and start watching. Returns at once."""
        if self._thread is not None:
            raise RuntimeError("supervisor already started")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind("\0" + self.notify_socket[1:])
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        now = time.monotonic()
        with self._lock:
            for child in self._children.values():
                child.next_start = now
        self._thread = threading.Thread(target=self._run, name="sensorhub-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM every child, SIGKILL what is left after its ``stop_timeout_s``; wait for all.

        Children stop one at a time, last listed first. Returns once every
        child is reaped (bounded by the sum of their ``stop_timeout_s`` plus a
        margin, or ``timeout_s``).
        """
        if self._thread is None:
            return
        with self._lock:
            self._stopping = True
        self._wake()
        bound = timeout_s
        if bound is None:
            bound = sum(c.spec.stop_timeout_s for c in self._children.values()) + 5.0
        self._thread.join(bound)
        if self._thread.is_alive():
            log.error("supervisor did not finish stopping within %.1f s", bound)
            return
        self._thread = None
        self._close()

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def state(self, name: str) -> ChildState:
        """A snapshot of the child ``name``."""
        with self._lock:
            return self._children[name].snapshot()

    def states(self) -> dict[str, ChildState]:
        """Snapshots of every child, by name."""
        with self._lock:
            return {name: c.snapshot() for name, c in self._children.items()}

    def wait_for(self, predicate: Callable[[dict[str, ChildState]], bool], timeout_s: float) -> bool:
        """Wait until ``predicate(states)`` holds or ``timeout_s`` passes; returns whether it held."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if predicate({n: c.snapshot() for n, c in self._children.items()}):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, _MAX_SLEEP_S))

    def wait_ready(self, name: str | None = None, *, timeout_s: float = 30.0, min_starts: int = 1) -> bool:
        """Wait until ``name`` (or every child) is ready in a run numbered ``min_starts`` or later."""
        names = [name] if name is not None else list(self._children)

        def ok(states: dict[str, ChildState]) -> bool:
            return all(states[n].ready and states[n].starts >= min_starts for n in names)

        return self.wait_for(ok, timeout_s)

    # --- the monitor thread ----------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # pipe full: a wake-up is already pending
            os.write(self._wake_w, b"x")

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _run(self) -> None:
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, "notify")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        registered: dict[int, str] = {}  # pidfd -> child name
        try:
            while True:
                with self._changed:
                    if self._stopping:
                        break
                    timeout = self._tick(time.monotonic())
                    self._sync_pidfds(sel, registered)
                    self._changed.notify_all()
                for key, _ in sel.select(timeout):
                    if key.data == "notify":
                        self._read_notifications()
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    # a pidfd became readable: the child exited; _tick reaps it
            self._shutdown(sel, registered)
        except Exception:  # the monitor must not die silently and leave children unwatched
            log.exception("supervisor monitor failed; killing children")
            with self._lock:
                for child in self._children.values():
                    self._signal(child, signal.SIGKILL, group=True)
            raise
        finally:
            sel.close()

    def _sync_pidfds(self, sel: selectors.BaseSelector, registered: dict[int, str]) -> None:
        live = {c.pidfd for c in self._children.values() if c.pidfd is not None}
        for fd in list(registered):
            if fd not in live:
                sel.unregister(fd)
                del registered[fd]
        for child in self._children.values():
            if child.pidfd is not None and child.pidfd not in registered:
                sel.register(child.pidfd, selectors.EVENT_READ, "exit")
                registered[child.pidfd] = child.spec.name

    def _tick(self, now: float) -> float:
        """Advance every child's state machine; returns how long the loop may sleep."""
        sleep = _MAX_SLEEP_S
        for child in self._children.values():
            self._reap(child, now)
            spec = child.spec
            if child.state == "waiting" and now >= child.next_start:
                self._spawn(child, now)
            if child.state == "starting" and now >= child.start_deadline:
                child.start_timeouts += 1
                log.warning("%s: not ready within its start timeout; stopping it", spec.name)
                self._ask_to_go(child, signal.SIGTERM, now)
            if (
                child.state == "running"
                and spec.watchdog_sec is not None
                and now - child.last_ping > spec.watchdog_sec
            ):
                child.watchdog_kills += 1
                log.warning("%s: watchdog timeout (%.1f s without WATCHDOG=1); aborting it", spec.name, spec.watchdog_sec)
                self._ask_to_go(child, signal.SIGABRT, now)
            if child.proc is not None and now >= child.kill_deadline:
                log.warning("%s: still running %.1f s after it was asked to stop; SIGKILL", spec.name, spec.stop_timeout_s)
                self._signal(child, signal.SIGKILL, group=True)
                child.kill_deadline = math.inf
            for t in (child.next_start if child.state == "waiting" else math.inf,
                      child.start_deadline if child.state == "starting" else math.inf,
                      child.kill_deadline,
                      child.last_ping + spec.watchdog_sec if child.state == "running" and spec.watchdog_sec else math.inf):
                sleep = min(sleep, max(t - now, 0.0))
        return sleep

    def _spawn(self, child: _Child, now: float) -> None:
        spec = child.spec
        window = spec.start_limit_interval_s
        while child.start_history and now - child.start_history[0] > window:
            child.start_history.popleft()
        if len(child.start_history) >= spec.start_limit_burst:
            child.state = "failed"
            log.error("%s: started %d times within %.0f s; giving up (start limit)", spec.name, len(child.start_history), window)
            return
        env = dict(os.environ)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        env.update(spec.env)
        argv: list[str] = list(spec.argv)
        if spec.notify:
            env["NOTIFY_SOCKET"] = self.notify_socket
        if spec.watchdog_sec is not None:
            env["WATCHDOG_USEC"] = str(int(spec.watchdog_sec * 1_000_000))
            argv = ["/bin/sh", "-c", _SHIM, "sh", *argv]
        out: int | None = None
        if spec.output is not None:
            Path(spec.output).parent.mkdir(parents=True, exist_ok=True)
            out = os.open(spec.output, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        child.start_history.append(now)
        if child.starts > 0:
            child.restarts += 1
            child.restart_times.append(now)
        child.starts += 1
        child.started_at = now
        child.ready_at = None
        child.status = ""
        child.kill_deadline = math.inf
        try:
            child.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                process_group=0,
            )
        except OSError as exc:
            log.error("%s: cannot start %s: %s", spec.name, spec.argv[0], exc)
            child.proc = None
            child.exits.append(-1)
            child.last_exit = None
            child.state = "waiting"
            child.next_start = now + max(spec.restart_sec, 0.1)
            return
        finally:
            if out is not None:
                os.close(out)
        try:
            child.pidfd = os.pidfd_open(child.proc.pid)
        except OSError:
            child.pidfd = None  # old kernel: the loop's periodic wake-up reaps it instead
        if spec.notify:
            child.state = "starting"
            child.start_deadline = now + spec.start_timeout_s if spec.start_timeout_s > 0 else math.inf
        else:
            self._mark_ready(child, now)
        log.info("%s: started, pid %d (start %d)", spec.name, child.proc.pid, child.starts)

    def _mark_ready(self, child: _Child, now: float) -> None:
        child.state = "running"
        child.ready_at = now
        child.last_ping = now
        child.start_deadline = math.inf
        if child.down_since is not None:
            child.last_recovery_s = now - child.down_since
            child.down_since = None

    def _ask_to_go(self, child: _Child, sig: signal.Signals, now: float) -> None:
        self._signal(child, sig, group=False)
        child.state = "stopping"
        child.kill_deadline = min(child.kill_deadline, now + child.spec.stop_timeout_s)

    def _signal(self, child: _Child, sig: signal.Signals, *, group: bool) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            if group:
                # process_group=0 made the child a group leader: its helpers go too.
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self, child: _Child, now: float) -> None:
        proc = child.proc
        if proc is None:
            return
        try:
            # WNOWAIT: look without reaping, so the PID (and the group ID) stay
            # ours while the helpers left in the child's group are killed
            # (KillMode=mixed); only then reap.
            exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            exited = None
        if exited is None and proc.returncode is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        if child.pidfd is not None:
            os.close(child.pidfd)
            child.pidfd = None
        child.proc = None
        child.exited_at = now
        child.last_exit = code
        child.exits.append(code)
        child.kill_deadline = math.inf
        child.start_deadline = math.inf
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        if self._stopping:
            child.state = "stopped"
            log.info("%s: %s", child.spec.name, how)
            return
        if child.down_since is None:
            child.down_since = now
        if code in child.spec.restart_prevent_exit_status:
            child.state = "failed"
            log.error("%s: %s; not restarting (RestartPreventExitStatus)", child.spec.name, how)
            return
        child.state = "waiting"
        child.next_start = now + child.spec.restart_sec
        log.warning("%s: %s; restarting in %.2f s", child.spec.name, how, child.spec.restart_sec)

    def _read_notifications(self) -> None:
        assert self._sock is not None
        for _ in range(256):  # bounded per wake-up; the rest waits for the next select
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid = _UCRED.unpack_from(payload)[0]
            now = time.monotonic()
            with self._changed:
                child = next((c for c in self._children.values() if c.pid is not None and c.pid == pid), None)
                if child is None:
                    self.ignored_notifications += 1  # NotifyAccess=main: not the main PID
                    continue
                self._apply(child, data.decode("utf-8", "replace"), now)
                self._changed.notify_all()

    def _apply(self, child: _Child, text: str, now: float) -> None:
        for line in text.split("\n"):
            key, sep, value = line.partition("=")
            if not sep:
                continue
            if key == "READY" and value == "1" and child.state == "starting":
                self._mark_ready(child, now)
                log.info("%s: ready after %.3f s", child.spec.name, now - (child.started_at or now))
            elif key == "STATUS":
                child.status = value
            elif key == "WATCHDOG" and value == "1":
                child.watchdog_pings += 1
                child.last_ping = now
            elif key == "WATCHDOG" and value == "trigger":
                child.watchdog_kills += 1
                self._ask_to_go(child, signal.SIGABRT, now)
            elif key == "STOPPING" and value == "1" and child.state in ("starting", "running"):
                child.state = "stopping"
                child.kill_deadline = min(child.kill_deadline, now + child.spec.stop_timeout_s)
            elif key == "EXTEND_TIMEOUT_USEC" and child.state == "starting":
                with contextlib.suppress(ValueError):
                    child.start_deadline = max(child.start_deadline, now + int(value) / 1_000_000)

    def _shutdown(self, sel: selectors.BaseSelector, registered: dict[int, str]) -> None:
        """Stop the children one by one in reverse order, like systemd along an After= chain.

        The list is in start order (broker, Redis, ClickHouse, ingest, writer),
        so the processes that drain stop while the peers they drain into still
        run. Each child gets SIGTERM, then SIGKILL after its ``stop_timeout_s``.
        """
        with self._changed:
            for child in self._children.values():
                if child.proc is None and child.state != "failed":
                    child.state = "stopped"
            self._changed.notify_all()
        for child in reversed(list(self._children.values())):
            with self._changed:
                if child.proc is None:
                    continue
                self._signal(child, signal.SIGTERM, group=False)
                child.state = "stopping"
                child.kill_deadline = time.monotonic() + child.spec.stop_timeout_s
            while True:
                now = time.monotonic()
                with self._changed:
                    for c in self._children.values():
                        self._reap(c, now)  # any child may end meanwhile; none is restarted now
                    if child.proc is not None and now >= child.kill_deadline:
                        log.warning("%s: did not stop within %.1f s; SIGKILL", child.spec.name, child.spec.stop_timeout_s)
                        self._signal(child, signal.SIGKILL, group=True)
                        child.kill_deadline = now + 5.0  # SIGKILL cannot be refused; this only bounds the wait
                    self._sync_pidfds(sel, registered)
                    self._changed.notify_all()
                    if child.proc is None:
                        break
                    wait = min(max(child.kill_deadline - now, 0.0), _MAX_SLEEP_S)
                for key, _ in sel.select(wait):
                    if key.data == "notify":
                        self._read_notifications()
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
