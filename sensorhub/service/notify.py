"""sd_notify: tell the service manager we are ready, how we are doing, and that we still live.

The protocol (``man sd_notify``) is one datagram of ``KEY=VALUE`` lines sent
to the ``AF_UNIX`` socket named by ``NOTIFY_SOCKET``; a name starting with
``@`` is in the abstract namespace. It is spoken here directly, without
libsystemd. When ``NOTIFY_SOCKET`` is unset (run by hand, under a test, in a
container without systemd) every call is a cheap no-op that returns ``False``.

Nothing here ever raises into a work loop: a failed send is logged once and
reported by the return value. Each send opens its own socket, as
``sd_notify(3)`` does, so the functions hold no shared state and are safe to
call from a signal handler or any thread.

The service manager (systemd, or :class:`sensorhub.service.supervisor.Supervisor`)
enforces the watchdog: when ``WATCHDOG_USEC`` is set, ``WATCHDOG=1`` must
arrive more often than that or the process is killed. :class:`Watchdog` is the
helper a work loop calls each iteration; a loop that hangs stops calling it,
so the pings stop, which is the point.

The ``STATUS=`` texts of the sensorhub processes are defined here, in
:func:`format_status`, so that the processes, the docs (docs/operations.md)
and anything that parses ``systemctl status`` agree on one format.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ChdbStatus",
    "IngestStatus",
    "Watchdog",
    "WriterStatus",
    "extend_timeout",
    "format_status",
    "notify",
    "notify_socket",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

# Kinds of failure already logged; each is logged once per process so that a
# missing socket does not flood the journal at the ping rate.
_warned: set[str] = set()

# A STATUS text longer than this is cut: the datagram must stay small and the
# operator reads it on one line of `systemctl status`.
MAX_STATUS_CHARS = 200


def notify_socket() -> str | None:
    """The address in ``NOTIFY_SOCKET`` in the form ``socket`` wants, or ``None`` when unset.

    ``@name`` becomes the abstract address ``"\\0name"``; a path is used as is.
    """
    name = os.environ.get("NOTIFY_SOCKET", "")
    if not name:
        return None
    if name.startswith("@"):
        return "\0" + name[1:]
    return name


def _warn_once(kind: str, text: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        log.warning("sd_notify: %s (further such failures are not logged)", text)


def notify(*lines: str) -> bool:
    """Send ``lines`` (``"KEY=VALUE"`` each) as one notification.

    Returns ``True`` when the datagram was sent, ``False`` when there is no
    service manager to tell or the send failed (logged once; never raised).
    """
    address = notify_socket()
    if address is None:
        return False
    if not address.startswith(("/", "\0")):
        # systemd also allows vsock:CID:PORT for VMs; sensorhub does not run there.
        _warn_once("address", f"unsupported NOTIFY_SOCKET {address!r}")
        return False
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"not a KEY=VALUE line: {line!r}")
    data = "\n".join(lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(data, address)
    except OSError as exc:
        _warn_once("send", f"cannot send to {os.environ.get('NOTIFY_SOCKET')!r}: {exc}")
        return False
    return True


def _status_line(text: str) -> str:
    text = " ".join(text.split())  # one line, whatever the caller passed
    if len(text) > MAX_STATUS_CHARS:
        text = text[: MAX_STATUS_CHARS - 1] + "…"
    return f"STATUS={text}"


# Whether this process has sent READY=1; before it, Watchdog.tick() extends
# the start timeout instead of pinging (the manager's watchdog only runs once
# the start is over).
_ready_sent = False


def ready(status_text: str | None = None) -> bool:
    """``READY=1``: the process is connected and doing its work. Send it once, when that is true."""
    global _ready_sent
    lines = ["READY=1"]
    if status_text is not None:
        lines.append(_status_line(status_text))
    sent = notify(*lines)
    if sent:
        _ready_sent = True
    return sent


def status(text: str) -> bool:
    """``STATUS=text``: the one-line state shown by ``systemctl status``. See :func:`format_status`."""
    return notify(_status_line(text))


def watchdog() -> bool:
    """``WATCHDOG=1``: the work loop still runs. Prefer :class:`Watchdog`, which paces it."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """``STOPPING=1``: a drain has begun; the manager then waits up to ``TimeoutStopSec``."""
    lines = ["STOPPING=1"]
    if status_text is not None:
        lines.append(_status_line(status_text))
    return notify(*lines)


def extend_timeout(seconds: float) -> bool:
    """``EXTEND_TIMEOUT_USEC``: give the start (or stop) phase ``seconds`` more from now.

    A process that waits for a peer before it can send ``READY=1`` calls this
    while it is making progress (each connection attempt), so a slow broker
    does not fail the start while a hung start still does.
    """
    if seconds <= 0 or not math.isfinite(seconds):
        raise ValueError(f"extend_timeout needs a positive number of seconds, got {seconds!r}")
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds from ``WATCHDOG_USEC``, or ``None`` when there is none for us.

    ``None`` when ``WATCHDOG_USEC`` is unset, zero or malformed, or when
    ``WATCHDOG_PID`` names another process (the variables were inherited from
    a parent that is the one being watched).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            _warn_once("watchdog_pid", f"malformed WATCHDOG_PID {pid!r}")
            return None
    try:
        value = int(usec)
    except ValueError:
        _warn_once("watchdog_usec", f"malformed WATCHDOG_USEC {usec!r}")
        return None
    if value <= 0:
        return None
    return value / 1_000_000


class Watchdog:
    """Paces ``WATCHDOG=1`` from a work loop: call :meth:`tick` every iteration.

    A ping goes out at most every ``interval / 2`` (so one late iteration does
    not trip the manager), and only from :meth:`tick`: when the loop hangs,
    the pings stop and the manager kills and restarts the process. With no
    watchdog configured :meth:`tick` costs one attribute test.

    Before the process has sent ``READY=1`` (still waiting for its broker or
    Redis), the same ticks send ``EXTEND_TIMEOUT_USEC=<interval>`` instead: a
    loop that is alive keeps the start from timing out however long the peer
    takes, and a start that hangs fails after one interval, as a hung loop
    does later.

    ``interval`` defaults to :func:`watchdog_interval`; ``send``, ``extend``
    and ``clock`` default to :func:`watchdog`, :func:`extend_timeout` by the
    interval, and :func:`time.monotonic`.
    """

    __slots__ = ("_clock", "_extend", "_next", "_send", "enabled", "extensions", "interval", "period", "pings")

    def __init__(
        self,
        interval: float | None = None,
        *,
        send: Callable[[], bool] = watchdog,
        extend: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval is None:
            interval = watchdog_interval()
        if interval is not None and not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"watchdog interval must be a positive number of seconds, got {interval!r}")
        self.interval = interval
        self.enabled = interval is not None
        self.period = interval / 2 if interval is not None else math.inf
        self.pings = 0
        self.extensions = 0
        self._send = send
        if extend is None and interval is not None:
            seconds = interval

            def extend() -> bool:
                return extend_timeout(seconds)

        self._extend = extend
        self._clock = clock
        self._next = -math.inf  # the first tick pings at once

    def tick(self) -> bool:
        """Ping (or, before READY, extend the start) if ``interval / 2`` has passed since the last one.

        Returns whether it sent.
        """
        if not self.enabled:
            return False
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.period
        if not _ready_sent and self._extend is not None:
            if self._extend():
                self.extensions += 1
                return True
            return False
        if self._send():
            self.pings += 1
            return True
        return False


# --- STATUS texts ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestStatus:
    """State of one ingest process (one source).

    ``state`` is ``connecting`` (not yet READY), ``connected``, ``reconnecting``
    (peer lost, retrying with backoff) or ``draining`` (stopping). ``rate`` is
    records decoded per second over the last interval; ``acked`` counts records
    since start that Redis holds and that were acknowledged upstream (the MQTT
    PUBACK; exchange feeds have nothing to ack, so it counts records written);
    ``dead_letters`` counts payloads sent to the dead-letter stream since start.
    """

    source: str
    state: Literal["connecting", "connected", "reconnecting", "draining"]
    rate: float
    acked: int
    dead_letters: int
    unit: Literal["readings", "trades"] = "readings"


@dataclass(frozen=True, slots=True)
class WriterStatus:
    """State of one writer process.

    ``state`` is ``starting``, ``inserting`` (keeping up), ``replaying``
    (catching up on a backlog), ``reconciling`` (checking row counts against
    the audit after a replay), ``waiting`` (ClickHouse unreachable; Redis
    buffers) or ``draining``. ``rate`` is rows inserted per second over the
    last interval, ``lag_s`` the age of the oldest entry not yet inserted
    (0 when caught up).
    """

    state: Literal["starting", "inserting", "replaying", "reconciling", "waiting", "draining"]
    rate: float
    lag_s: float
    clickhouse_up: bool


@dataclass(frozen=True, slots=True)
class ChdbStatus:
    """State of the embedded ClickHouse server: where it listens and its load per second."""

    address: str
    queries_rate: float
    rows_rate: float


def _rate(value: float) -> int:
    return round(value) if math.isfinite(value) and value > 0 else 0


def format_status(s: IngestStatus | WriterStatus | ChdbStatus) -> str:
    """The ``STATUS=`` text for a process state; the formats are documented in docs/operations.md.

    - ingest: ``mqtt connected; 40012 readings/s; acked 123456; dead letters 3``
    - writer: ``inserting 41000 rows/s; lag 0.2 s; clickhouse up``
    - chdb:   ``serving 127.0.0.1:8123; 12 queries/s; 41000 rows/s inserted``

    Rates are whole numbers per second; lag has one decimal.
    """
    if isinstance(s, IngestStatus):
        return (
            f"{s.source} {s.state}; {_rate(s.rate)} {s.unit}/s; "
            f"acked {s.acked}; dead letters {s.dead_letters}"
        )
    if isinstance(s, WriterStatus):
        lag = s.lag_s if math.isfinite(s.lag_s) and s.lag_s > 0 else 0.0
        ch = "up" if s.clickhouse_up else "down"
        return f"{s.state} {_rate(s.rate)} rows/s; lag {lag:.1f} s; clickhouse {ch}"
    return (
        f"serving {s.address}; {_rate(s.queries_rate)} queries/s; "
        f"{_rate(s.rows_rate)} rows/s inserted"
    )
