"""The connection loop of the exchange WebSocket sources.

:class:`ExchangeSource` is the :class:`~sensorhub.sources.base.Source`: an
asyncio loop on its own thread with a ``websockets`` client, connect timeout,
capped exponential backoff with full jitter that never gives up, resubscribe
on every connection, heartbeats, stale-feed detection, and a bounded
:class:`~sensorhub.sources.base.FrameQueue` towards the ingest loop. A venue
that serves its markets on separate connections (Bybit: spot, linear,
inverse) gets one connection per market its symbols need, each with its own
frame topic, so the parser always knows which market a frame belongs to.
Parsing never runs on this thread: the ingest loop does it through the
venue's :class:`~sensorhub.sources.exchanges.venue.ExchangeDecoder`.

Every venue registered with
:func:`~sensorhub.sources.exchanges.venue.register_venue` becomes a source
driver of its name here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI, WebSocketException

from sensorhub.config import BackoffSettings, Settings, SourceSettings
from sensorhub.errors import ConfigError, SourceError
from sensorhub.sources.base import Decoder, Frame, FrameQueue, Source, register
from sensorhub.sources.exchanges.venue import (
    PARSE_OPTIONS,
    VENUES,
    ExchangeDecoder,
    Venue,
    on_register_venue,
)

__all__ = ["FRAME_TOPIC", "SOURCE_OPTIONS", "ExchangeSource"]

log = logging.getLogger(__name__)

#: Topic of every frame an exchange source hands over (one feed per source).
FRAME_TOPIC = "ws"

#: Options every exchange source understands (``sources.<name>.options``), with defaults.
SOURCE_OPTIONS: dict[str, Any] = {
    "connect_timeout_s": 10.0,  # TCP + TLS + WebSocket handshake, and the pre-connect HTTP step
    "stale_after_s": None,  # no message for this long -> reconnect; None: the venue's default
    "heartbeat_s": None,  # application ping interval; None: the venue's default
    "max_frame_bytes": 16 * 1024 * 1024,  # larger frames close the connection (book snapshots fit)
    "compression": False,  # permessage-deflate costs CPU on a shared box; venues send little
    "backoff_initial_s": None,  # None: the ingest backoff settings
    "backoff_max_s": None,
    **PARSE_OPTIONS,
}


@dataclass
class _Connection:
    """One of a feed's connections (most venues need one; Bybit one per market)."""

    name: str  # the venue's connection name (Venue.connections), "" for a venue's only one
    topic: str  # topic of the frames it hands over
    endpoint: str
    decoder: ExchangeDecoder
    connected: bool = False
    sessions: int = 0
    frames: int = 0
    last_msg_ns: int = 0
    detail: str = ""
    waiting_for_room: bool = False  # a frame in hand, the queue full: not reading, so silence is not staleness


class ExchangeSource(Source):
    """A venue's WebSocket feed as a :class:`Source` of raw frames (``kind = "trade"``).

    ``settings`` gives the symbols, an endpoint override and options (the
    keys of :data:`SOURCE_OPTIONS` plus the venue's own). Frames are handed
    over as ``Frame(topic, payload=<raw bytes>, recv_ns, ack_token=None)``;
    ``decoder_for`` returns the venue parser, so parsing happens in the
    ingest loop and this thread only receives.

    The feed opens one connection per entry of :meth:`Venue.connections`
    (one on most venues), each connecting, resubscribing and backing off on
    its own. With one connection every frame's topic is ``"ws"``; with
    several it is ``"ws/<connection>"`` (``ws/spot``, ``ws/linear``), and
    the decoder of that topic tells the parser which connection a frame
    came from. ``health.connected`` is true while every connection is up.
    """

    kind = "trade"

    def __init__(
        self,
        name: str,
        venue: type[Venue] | str,
        settings: SourceSettings | None = None,
        *,
        max_inflight_frames: int = 20_000,
        backoff: BackoffSettings | None = None,
    ) -> None:
        super().__init__(name)
        venue_cls = VENUES[venue] if isinstance(venue, str) else venue
        settings = settings or SourceSettings(driver=venue_cls.name)
        opts = dict(settings.options)
        unknown = set(opts) - set(SOURCE_OPTIONS) - set(venue_cls.options)
        if unknown:
            raise ConfigError(
                f"sources.{name}.options",
                "keys among " + ", ".join(sorted(set(SOURCE_OPTIONS) | set(venue_cls.options))),
                sorted(unknown),
            )
        src = {k: opts.pop(k, v) for k, v in SOURCE_OPTIONS.items()}
        try:
            self.venue: Venue = venue_cls(
                settings.symbols, opts, int(src["recent_trade_ids"]),
                int(src["trade_error_window"]), int(src["unhealthy_trade_errors"]),
            )
            self.connect_timeout_s = float(src["connect_timeout_s"])
            self.stale_after_s = float(src["stale_after_s"] or venue_cls.stale_after_s)
            self._heartbeat_configured = src["heartbeat_s"] is not None
            hb = src["heartbeat_s"] if src["heartbeat_s"] is not None else venue_cls.heartbeat_s
            self.heartbeat_s: float | None = float(hb) if hb else None
            self.max_frame_bytes = int(src["max_frame_bytes"])
            # a frame the connection took is within the feed's own bound (book snapshots of several MB)
            self.max_payload_bytes = self.max_frame_bytes
            self.max_payload_setting = f"sources.{name}.options.max_frame_bytes"
            backoff = backoff or BackoffSettings.model_validate({})
            self.backoff_initial_s = float(src["backoff_initial_s"] or backoff.initial_s)
            self.backoff_max_s = float(src["backoff_max_s"] or backoff.max_s)
            self.backoff_factor = backoff.factor
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"sources.{name}.options", "numbers for the *_s, *_ids, *_errors, *_window and *_bytes keys", str(exc)) from None
        if self.connect_timeout_s <= 0 or self.stale_after_s <= 0 or self.backoff_initial_s <= 0:
            raise ConfigError(f"sources.{name}.options", "positive timeouts and backoff")
        self.compression: str | None = "deflate" if src["compression"] else None
        self.endpoint = settings.endpoint or self.venue.default_endpoint()
        if not self.endpoint.startswith(("ws://", "wss://")):
            raise ConfigError(f"sources.{name}.endpoint", "a ws:// or wss:// URL", self.endpoint)
        host = (urlsplit(self.endpoint).hostname or "").lower()
        if any(host == h or host.endswith("." + h) for h in venue_cls.derivative_hosts):
            raise ConfigError(
                f"sources.{name}.endpoint",
                f"a {venue_cls.name} spot endpoint (the driver reads spot pairs; {host} serves derivatives, "
                "spelled like spot pairs)",
                self.endpoint,
            )
        self.queue = FrameQueue(max_inflight_frames)
        names = self.venue.connections()
        self._conns = [
            _Connection(
                n, FRAME_TOPIC if len(names) == 1 else f"{FRAME_TOPIC}/{n}",
                self.venue.connection_endpoint(self.endpoint, n), ExchangeDecoder(self.venue, n, self.note_parse_error),
            )
            for n in names
        ]
        self._by_topic = {c.topic: c for c in self._conns}
        #: The decoder of the feed's first connection (the only one on most venues).
        self.decoder = self._conns[0].decoder
        self.connections = 0
        self.stale_reconnects = 0
        self.pings_sent = 0
        self.server_pings_answered = 0
        self.reconnect_requests = 0
        self.queue_full_waits = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopping = threading.Event()

    # ---- Source interface

    def start(self) -> None:
        """Connect in the background (own thread, own event loop); returns at once."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"feed-{self.name}", daemon=True)
        self._thread.start()

    def get(self, max_n: int, timeout_s: float) -> list[Frame]:
        """Frames received so far, up to ``max_n``, waiting up to ``timeout_s`` for the first."""
        return self.queue.get_many(max_n, timeout_s)

    def ack(self, tokens: Sequence[Any]) -> None:
        """Nothing to acknowledge upstream on a market-data feed."""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the connections and end the feed thread (waits up to ``timeout_s``)."""
        self._stopping.set()
        loop, ev = self._loop, self._stop_event
        if loop is not None and ev is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(ev.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.health.connected = False

    def decoder_for(self, topic: str) -> tuple[Decoder, str | None] | None:
        """The venue parser for the frames of ``topic``'s connection (the only one's for any topic)."""
        if len(self._conns) == 1:
            return self.decoder, None
        c = self._by_topic.get(topic)
        return (c.decoder, None) if c is not None else None

    @property
    def topics(self) -> dict[str, str]:
        """Frame topic -> endpoint of each connection."""
        return {c.topic: c.endpoint for c in self._conns}

    def refresh_health(self) -> None:
        """Copy the feed's counters into ``health`` (also done every second by the feed thread)."""
        st = self.venue.stats
        h = self.health
        h.gaps = st.gaps
        now = time.time_ns()
        extra = asdict(st)
        extra.update(
            venue=self.venue.name,
            endpoint=self.endpoint,
            endpoints=[c.endpoint for c in self._conns],
            connections=self.connections,
            stale_reconnects=self.stale_reconnects,
            pings_sent=self.pings_sent,
            server_pings_answered=self.server_pings_answered,
            reconnect_requests=self.reconnect_requests,
            queue_full_waits=self.queue_full_waits,
            queued_frames=len(self.queue),
            last_trade_age_s=(now - st.last_trade_ns) / 1e9 if st.last_trade_ns else None,
            last_frame_age_s=(now - h.last_frame_ns) / 1e9 if h.last_frame_ns else None,
        )
        h.extra = extra

    def note_parse_error(self) -> None:
        """A frame failed to parse (ingest thread): its counts and the feed's health show at once."""
        st = self.venue.stats
        extra = self.health.extra
        extra["parse_errors"] = st.parse_errors
        extra["trade_frame_errors"] = st.trade_frame_errors
        extra["unhealthy"] = st.unhealthy

    # ---- the feed thread

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:
            # A bug, not a network fault: say so loudly; the ingest process sees ready() turn False.
            log.exception("%s: feed thread ended", self.name)
            self.health.detail = "feed thread ended by an internal error"
            raise

    def _backoff_delay(self, attempt: int) -> float:
        # Full jitter: uniform over [0, capped exponential]; retries never stop.
        cap = min(self.backoff_max_s, self.backoff_initial_s * self.backoff_factor ** min(attempt, 60))
        return random.uniform(0.0, cap)

    def _set_detail(self, c: _Connection, text: str) -> None:
        c.detail = text
        if len(self._conns) == 1:
            self.health.detail = text
        else:
            self.health.detail = "; ".join(f"{x.name}: {x.detail}" for x in self._conns if x.detail)

    def _set_connected(self, c: _Connection, up: bool) -> None:
        c.connected = up
        self.health.connected = all(x.connected for x in self._conns)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stopping.is_set():
            return
        async with asyncio.TaskGroup() as tg:
            for c in self._conns:
                tg.create_task(self._connection(c), name=f"{self.name}-{c.name or 'connection'}")

    async def _connection(self, c: _Connection) -> None:
        """One connection, reconnected with backoff until the feed stops."""
        assert self._stop_event is not None
        attempt = 0
        while not self._stop_event.is_set():
            delivered = False
            try:
                delivered = await self._session(c)
            except (OSError, TimeoutError, WebSocketException, SourceError) as exc:
                self._set_detail(c, f"{type(exc).__name__}: {exc}")
                log.warning("%s: connection failed: %s", self.name, c.detail)
            self._set_connected(c, False)
            if self._stop_event.is_set():
                break
            attempt = 0 if delivered else attempt + 1
            delay = self._backoff_delay(attempt)
            self._set_detail(c, c.detail + f"; reconnecting in {delay:.2f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)

    async def _session(self, c: _Connection) -> bool:
        """One connection: connect, subscribe, receive until it ends. True if any frame arrived."""
        assert self._stop_event is not None
        async with asyncio.timeout(self.connect_timeout_s):
            url = await self.venue.pre_connect(c.endpoint, self.connect_timeout_s)
            try:
                ws = await connect(
                    url,
                    open_timeout=None,  # the enclosing timeout bounds the whole attempt
                    proxy=None,
                    compression=self.compression,
                    max_size=self.max_frame_bytes,
                    max_queue=64,
                    ping_interval=20,
                    ping_timeout=20,
                    close_timeout=2,
                )
            except InvalidURI as exc:
                raise SourceError(f"{url}: not a WebSocket URL") from exc
            except InvalidHandshake as exc:
                raise SourceError(f"{url}: handshake refused: {exc}") from exc
        frames_before = c.frames
        self.connections += 1
        c.sessions += 1
        if c.sessions > 1:
            self.health.reconnects += 1
        c.last_msg_ns = time.time_ns()
        self._set_connected(c, True)
        self._set_detail(c, f"connected to {url}")
        log.info("%s: connected to %s (connection %d)", self.name, url, self.connections)
        try:
            for msg in self.venue.subscribe_messages_for(c.name):
                await ws.send(msg)
            async with asyncio.TaskGroup() as tg:
                hb = tg.create_task(self._heartbeat(ws), name=f"{self.name}-heartbeat")
                wd = tg.create_task(self._watchdog(ws, c), name=f"{self.name}-watchdog")
                try:
                    await self._receive(ws, c)
                finally:
                    hb.cancel()
                    wd.cancel()
        except ConnectionClosed as exc:
            self._set_detail(c, f"connection closed: {exc}")
        finally:
            self._set_connected(c, False)
            await ws.close()
            self.refresh_health()
        return c.frames > frames_before

    async def _receive(self, ws: ClientConnection, c: _Connection) -> None:
        recv = ws.recv
        put = self.queue.put
        health = self.health
        venue = self.venue
        topic = c.topic
        answers = venue.answers_server_pings
        reconnects_on_request = venue.honours_reconnect_requests
        while True:
            try:
                data = await recv(decode=False)
            except ConnectionClosed as exc:
                self._set_detail(c, f"connection closed: {exc}")
                log.info("%s: %s", self.name, c.detail)
                return
            now = time.time_ns()
            c.last_msg_ns = now
            if answers:
                reply = venue.server_ping_reply(data)
                if reply is not None:
                    self.server_pings_answered += 1
                    await ws.send(reply)
                    continue
            health.frames += 1
            c.frames += 1
            health.last_frame_ns = now
            frame = Frame(topic, data, now, None)
            if not put(frame, 0.0):
                # The ingest loop is behind: stop reading so TCP pushes back on the venue, and wait
                # on this loop, which meanwhile answers pings and sends heartbeats.
                self.queue_full_waits += 1
                if not await self._wait_for_room(frame, c):
                    return
            if reconnects_on_request and venue.is_reconnect_request(data):
                self.reconnect_requests += 1
                self._set_detail(c, "the venue asked for a reconnect")
                log.info("%s: %s", self.name, c.detail)
                return  # the session closes the socket; the reconnect waits only the shortest backoff

    async def _wait_for_room(self, frame: Frame, c: _Connection) -> bool:
        """Hand ``frame`` over once the ingest loop has taken frames; False if the feed stops first.

        Never blocks the event loop: the queue calls back from the ingest
        thread when it has made room (:meth:`FrameQueue.put_or_wake`), and the
        callback wakes this coroutine through the loop.
        """
        assert self._stop_event is not None
        loop = asyncio.get_running_loop()
        stopped = asyncio.ensure_future(self._stop_event.wait())
        c.waiting_for_room = True
        try:
            while True:
                room: asyncio.Future[None] = loop.create_future()
                if self.queue.put_or_wake(frame, _waker(loop, room)):
                    return True
                await asyncio.wait((room, stopped), return_when=asyncio.FIRST_COMPLETED)
                if stopped.done():
                    return False
        finally:
            stopped.cancel()
            c.waiting_for_room = False
            c.last_msg_ns = time.time_ns()  # the wait was the ingest's, not the venue's silence

    async def _heartbeat(self, ws: ClientConnection) -> None:
        msg = self.venue.heartbeat_message()
        interval = self.heartbeat_s
        hint = self.venue.heartbeat_hint_s
        if hint and not self._heartbeat_configured:
            interval = hint  # what the venue asked for in this connection's pre-connect step
        if msg is None or not interval:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await ws.send(msg)
            except ConnectionClosed:
                return
            self.pings_sent += 1

    async def _watchdog(self, ws: ClientConnection, c: _Connection) -> None:
        assert self._stop_event is not None
        tick = min(1.0, self.stale_after_s / 4)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), tick)
            if self._stop_event.is_set():
                await ws.close()
                return
            self.refresh_health()
            idle_s = (time.time_ns() - c.last_msg_ns) / 1e9
            if idle_s > self.stale_after_s and not c.waiting_for_room:
                self.stale_reconnects += 1
                self._set_detail(c, f"stale: no message for {idle_s:.1f} s")
                log.warning("%s: %s; reconnecting", self.name, c.detail)
                ws.transport.abort()  # a dead peer would stall a close handshake
                return


def _waker(loop: asyncio.AbstractEventLoop, room: asyncio.Future[None]) -> Callable[[], None]:
    """What the frame queue calls, on the ingest thread, once it has room: resolves ``room`` on ``loop``."""

    def resolve() -> None:
        if not room.done():
            room.set_result(None)

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the feed's loop has ended meanwhile
            loop.call_soon_threadsafe(resolve)

    return wake


def _register_source_driver(cls: type[Venue]) -> None:
    """Make the venue ``cls`` a source driver named ``cls.name``."""

    def factory(
        name: str, settings: Settings | None = None, source_settings: SourceSettings | None = None, **kwargs: Any
    ) -> ExchangeSource:
        # the ingest process passes the whole configuration and the source's own table
        if settings is not None:
            kwargs.setdefault("max_inflight_frames", settings.ingest.max_inflight_frames)
            kwargs.setdefault("backoff", settings.ingest.backoff)
        return ExchangeSource(name, cls, source_settings, **kwargs)

    register(cls.name)(factory)


on_register_venue(_register_source_driver)
