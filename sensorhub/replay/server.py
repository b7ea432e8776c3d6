"""A loopback server that behaves like a venue for one capture.

It accepts the adapter's WebSocket connection, checks what the client
subscribes to against what the recording client subscribed to, sends the
recorded venue frames in order (text and binary) at the recorded pace scaled
by ``speed`` or as fast as possible, answers the client's application
heartbeats the way the venue does (:meth:`Venue.pong_for`), and serves the
capture's recorded REST responses over HTTP.

Connections: each incoming connection is given the next recorded connection
not yet served to its end, preferring one whose URL path matches and, when
several share a path (Kraken's three), the one whose recorded subscriptions
match the client's first message. Where the venue serves its markets on
separate connections (:meth:`Venue.connection_of`: Bybit's
``/v5/public/spot`` and ``/v5/public/linear``), a client is only ever given a
recording of its own market: a spot connection never receives the linear
traffic, and gets nothing when the capture holds no spot connection. ``drop_after=N`` aborts a connection after
it has sent N frames (at most ``drops`` times in all); the recorded
connection then resumes ``overlap`` frames before the drop point on the
client's next connection, so the client sees duplicates as after a real reconnect.

Venue particulars: a frame by which the venue asks the client to reconnect
(:meth:`Venue.is_reconnect_request`, e.g. Bitstamp ``bts:request_reconnect``)
ends the sending on that connection; the recording resumes right after it on
the client's next connection. REST requests are first offered to
:meth:`Venue.replay_http_response` (KuCoin's token, which must name this
server), then answered from the capture.

WebSocket pings (off by default): with ``ping_interval_s`` the server pings
every connection that often and, as venues do, closes one (1011) whose pong
has not come within ``ping_timeout_s``; ``stats.pongs`` counts the answers,
``stats.ping_timeouts`` the connections closed for want of one.

Subscription check (lenient by default): every key the client asks for
(:meth:`Venue.subscription_keys`) that the recording never subscribed to is
logged and listed in ``stats.subscribe_mismatches``; with ``strict=True`` the
connection is closed with code 1008 instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from sensorhub.errors import DecodeError, SourceError
from sensorhub.replay.capture import Capture, CaptureConnection, CaptureRecord
from sensorhub.sources.exchanges.venue import Venue

__all__ = ["ReplayServer", "ReplayStats", "ReplayThread"]

log = logging.getLogger(__name__)

MAX_PACE_GAP_S = 30.0  # a recorded silence longer than this is shortened (before speed scaling)
MAX_HTTP_REQUEST_BYTES = 1 << 20
MAX_LOGGED = 10_000  # bound on the client messages and request targets kept in the stats
RECONNECT_WAIT_S = 5.0
DROP_WAIT_S = 2.0  # after a dropped connection's end of stream, how long the client gets to close  # after a reconnect request, how long the client gets to close


@dataclass
class ReplayStats:
    """What the server did, for tests and the command's summary."""

    connections: int = 0
    frames_sent: int = 0
    drops: int = 0
    pings_answered: int = 0
    client_messages: int = 0
    http_requests: int = 0
    subscribe_mismatches: list[str] = field(default_factory=list)
    client_keys: set[str] = field(default_factory=set)
    reconnect_requests: int = 0  # reconnect requests sent, after which the client closed
    client_log: list[str | bytes] = field(default_factory=list)  # client messages, in order (bounded)
    ws_targets: list[str] = field(default_factory=list)  # path and query of each WebSocket connection
    http_targets: list[str] = field(default_factory=list)  # "METHOD target" of each REST request
    pongs: int = 0  # answers to the server's WebSocket pings (``ping_interval_s``)
    ping_timeouts: int = 0  # connections closed because a ping went unanswered


@dataclass
class _ConnState:
    conn: CaptureConnection
    next_index: int = 0
    finished: bool = False
    recorded_keys: set[str] = field(default_factory=set)


class ReplayServer:
    """Serves one capture on loopback; see the module docstring.

    ``speed``: None replays as fast as possible, otherwise the recorded gaps
    are divided by it. ``venue`` supplies heartbeat answers and subscription
    keys; without it client frames are compared verbatim and not answered.
    """

    def __init__(
        self,
        capture: Capture,
        venue: Venue | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        http_port: int | None = 0,
        speed: float | None = None,
        drop_after: int | None = None,
        drops: int = 1,
        overlap: int = 20,
        strict: bool = False,
        subscribe_wait_s: float = 2.0,
        close_at_end: bool = False,
        heartbeat_interval_s: float = 18.0,
        ping_interval_s: float | None = None,
        ping_timeout_s: float = 20.0,
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive (None: as fast as possible)")
        if (ping_interval_s is not None and ping_interval_s <= 0) or ping_timeout_s <= 0:
            raise ValueError("ping interval and timeout must be positive (interval None: no pings)")
        self.capture = capture
        self.venue = venue
        self.host = host
        self.port = port
        # REST only when there is something to answer: recorded exchanges or a venue's own (KuCoin's token).
        answers_rest = venue is not None and type(venue).replay_http_response is not Venue.replay_http_response
        self.http_port = http_port if (capture.http or answers_rest) else None
        self.speed = speed
        self.drop_after = drop_after
        self.drops_left = drops if drop_after else 0
        self.overlap = max(0, overlap)
        self.strict = strict
        self.subscribe_wait_s = subscribe_wait_s
        self.close_at_end = close_at_end
        self.heartbeat_interval_s = heartbeat_interval_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.stats = ReplayStats()
        self._http_count = 0
        self.all_sent = asyncio.Event()
        self._states = [_ConnState(c) for c in capture.connections]
        for st in self._states:
            st.recorded_keys = self._keys(st.conn.sends(), st.conn.target)
        self._ws: Server | None = None
        self._http: asyncio.Server | None = None
        if not self._states:
            self.all_sent.set()

    # ---- lifecycle

    async def start(self) -> None:
        """Listen (WebSocket, and HTTP when the capture holds REST exchanges)."""
        self._ws = await serve(
            self._handle, self.host, self.port, compression=None, max_size=1 << 20, ping_interval=None
        )
        self.port = self._ws.sockets[0].getsockname()[1]
        if self.http_port is not None:
            self._http = await asyncio.start_server(self._handle_http, self.host, self.http_port)
            self.http_port = self._http.sockets[0].getsockname()[1]
        log.info("replaying %s on %s", self.capture.exchange, self.ws_url)

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()

    @property
    def ws_url(self) -> str:
        """``ws://host:port`` (give it to the source as its endpoint override)."""
        return f"ws://{self.host}:{self.port}"

    @property
    def served_done(self) -> bool:
        """True once a connection was given out and every one given out was sent to its end.

        (``all_sent`` needs every recorded connection; a trade feed takes only
        its own, e.g. one of Kraken's three.)
        """
        served = [s for s in self._states if s.next_index > 0 or s.finished]
        return bool(served) and all(s.finished for s in served)

    def served_connections(self) -> list[CaptureConnection]:
        """The recorded connections given out to clients so far, in file order."""
        return [s.conn for s in self._states if s.next_index > 0 or s.finished]

    def market_of(self, conn: CaptureConnection) -> str:
        """The venue connection (market) a recorded connection belongs to, ``""`` where the venue has one."""
        return self.venue.connection_of(conn.path) if self.venue is not None else ""

    def sent_markets(self, markets: set[str]) -> bool:
        """True once every recorded connection of one of ``markets`` (``Venue.connections``) was sent to its end.

        ``served_done`` alone can be true while a second market's connection
        has not been given out yet (Bybit's spot after its linear).
        """
        return all(s.finished for s in self._states if self.market_of(s.conn) in markets and self.market_of(s.conn))

    @property
    def http_url(self) -> str | None:
        """``http://host:port`` of the REST replay, or None when the capture has none."""
        return None if self.http_port is None else f"http://{self.host}:{self.http_port}"

    # ---- subscriptions

    def _keys(self, messages: list[str | bytes], target: str) -> set[str]:
        keys: set[str] = set()
        if self.venue is None:
            keys.update(m if isinstance(m, str) else m.decode("utf-8", "replace") for m in messages)
            return keys
        for m in messages:
            with contextlib.suppress(DecodeError):  # a recorded non-JSON send (e.g. a text ping)
                keys |= self.venue.subscription_keys(m)
        keys |= self.venue.url_subscription_keys(target)
        return keys

    def _pick(self, path: str, first_message: str | bytes | None) -> _ConnState | None:
        open_states = [s for s in self._states if not s.finished]
        market = self.venue.connection_of(urlsplit(path).path) if self.venue is not None else ""
        if market:
            open_states = [s for s in open_states if self.market_of(s.conn) == market]
        if not open_states:
            return None
        same_path = [s for s in open_states if s.conn.path == urlsplit(path).path] or open_states
        if first_message is not None and len(same_path) > 1:
            wanted = self._keys([first_message], "")
            for s in same_path:
                if wanted & s.recorded_keys:
                    return s
        return same_path[0]

    # ---- WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        self.stats.connections += 1
        path = ws.request.path if ws.request is not None else "/"
        if len(self.stats.ws_targets) < MAX_LOGGED:
            self.stats.ws_targets.append(path)
        first = asyncio.Event()
        first_msg: list[str | bytes] = []
        current: list[_ConnState] = []  # the recorded connection this client is given, once chosen
        url_keys = self.venue.url_subscription_keys(path) if self.venue is not None else set()
        reader = asyncio.create_task(self._read_client(ws, first, first_msg, current), name="replay-client-reader")
        pinger = None
        if self.ping_interval_s is not None:
            pinger = asyncio.create_task(self._ping(ws, self.ping_interval_s), name="replay-pinger")
        try:
            open_states = [s for s in self._states if not s.finished]
            needs_wait = len(open_states) > 1 or any(s.conn.sends() for s in open_states)
            if needs_wait and not url_keys:
                # The venue starts sending once subscribed; the first request also picks the recording.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(first.wait(), self.subscribe_wait_s)
            state = self._pick(path, first_msg[0] if first_msg else None)
            if state is None:
                await ws.wait_closed()  # everything served: a quiet venue
                return
            current.append(state)
            if url_keys and not await self._check(ws, url_keys, state):
                return
            for m in first_msg:
                if not await self._check(ws, self._keys([m], ""), state):
                    return
            await self._send_frames(ws, state)
        except ConnectionClosed:
            pass
        finally:
            for task in (reader, pinger):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _check(self, ws: ServerConnection, keys: set[str], state: _ConnState) -> bool:
        self.stats.client_keys |= keys
        unknown = sorted(keys - state.recorded_keys)
        if not unknown:
            return True
        self.stats.subscribe_mismatches.extend(unknown)
        log.warning(
            "%s: client asks for %s, not in the recording of %s", self.capture.exchange, unknown, state.conn.conn_id
        )
        if self.strict:
            await ws.close(1008, "subscription not in capture")
            return False
        return True

    async def _read_client(
        self,
        ws: ServerConnection,
        first: asyncio.Event,
        first_msg: list[str | bytes],
        current: list[_ConnState],
    ) -> None:
        try:
            async for msg in ws:
                if len(self.stats.client_log) < MAX_LOGGED:
                    self.stats.client_log.append(msg)
                reply = self.venue.pong_for(msg) if self.venue is not None else None
                if reply is not None:
                    self.stats.pings_answered += 1
                    await ws.send(reply)
                    continue
                self.stats.client_messages += 1
                if not first.is_set():
                    first_msg.append(msg)
                    first.set()
                elif current:
                    await self._check(ws, self._keys([msg], ""), current[0])
                else:
                    # arrived before the recording was picked: checked with the first ones
                    first_msg.append(msg)
        except ConnectionClosed:
            return

    async def _ping(self, ws: ServerConnection, interval_s: float) -> None:
        try:
            while True:
                await asyncio.sleep(interval_s)
                pong = await ws.ping()
                try:
                    await asyncio.wait_for(pong, self.ping_timeout_s)
                except TimeoutError:
                    self.stats.ping_timeouts += 1
                    log.info("no pong within %.2f s: closing the connection", self.ping_timeout_s)
                    await ws.close(1011, "ping timeout")
                    return
                self.stats.pongs += 1
        except ConnectionClosed:
            return

    async def _send_frames(self, ws: ServerConnection, state: _ConnState) -> None:
        recs = state.conn.records
        start = state.next_index
        sent = 0
        prev_ts: float | None = None
        venue = self.venue
        watch_reconnects = venue is not None and venue.honours_reconnect_requests
        for i in range(start, len(recs)):
            r = recs[i]
            if r.kind != "recv":
                continue
            if self.speed is not None and prev_ts is not None:
                gap = min(r.ts - prev_ts, MAX_PACE_GAP_S) / self.speed
                if gap > 0:
                    await asyncio.sleep(gap)
            prev_ts = r.ts
            await ws.send(r.data)
            sent += 1
            self.stats.frames_sent += 1
            state.next_index = i + 1
            if watch_reconnects and venue is not None and i + 1 < len(recs):
                raw = r.data if isinstance(r.data, bytes) else r.data.encode()
                if venue.is_reconnect_request(raw):
                    # The venue hands the client over to a new connection; the recording goes on there.
                    self.stats.reconnect_requests += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ws.wait_closed(), RECONNECT_WAIT_S)
                    await ws.close()
                    return
            if self.drop_after and self.drops_left > 0 and sent >= self.drop_after and i + 1 < len(recs):
                self.drops_left -= 1
                self.stats.drops += 1
                state.next_index = self._back(recs, i + 1, self.overlap, start)
                log.info("dropping connection after %d frames; resuming at record %d", sent, state.next_index)
                await self._drop(ws)
                return
        state.finished = True
        if all(s.finished for s in self._states):
            self.all_sent.set()
        if self.close_at_end:
            await ws.close()
        else:
            await ws.wait_closed()

    @staticmethod
    async def _drop(ws: ServerConnection) -> None:
        # TCP end without a WebSocket close frame: the client sees an abnormal closure (1006) after
        # every frame already written. Half-close first: closing a socket whose receive buffer holds
        # unread client data (subscribe requests still arriving) sends a reset, and a reset makes the
        # client's kernel discard the frames it has not read yet.
        transport = ws.transport
        if transport.can_write_eof():
            transport.write_eof()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), DROP_WAIT_S)
        transport.close()

    @staticmethod
    def _back(recs: list[CaptureRecord], index: int, overlap: int, floor: int) -> int:
        # Step back over ``overlap`` recv records so they are sent again after the reconnect.
        i = index
        n = 0
        while i > floor and n < overlap:
            i -= 1
            if recs[i].kind == "recv":
                n += 1
        return i

    # ---- HTTP

    def _http_body(self, method: str, target: str) -> str | None:
        self._http_count += 1
        recorded = self._recorded_body(target)
        if self.venue is not None:
            body = self.venue.replay_http_response(
                method, target, self.ws_url, recorded, self._http_count, self.heartbeat_interval_s
            )
            if body is not None:
                return body
        return recorded

    def _recorded_body(self, target: str) -> str | None:
        want = urlsplit(target)
        by_path = None
        for ex in self.capture.http:
            u = urlsplit(ex.url)
            if u.path == want.path:
                if u.query == want.query:
                    return ex.body
                by_path = by_path if by_path is not None else ex.body
        return by_path

    async def _handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            length = 0
            for h in lines[1:]:
                name, _, value = h.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if length > MAX_HTTP_REQUEST_BYTES:
                raise ValueError("request body too large")
            if length:
                await asyncio.wait_for(reader.readexactly(length), 10)
            self.stats.http_requests += 1
            if len(self.stats.http_targets) < MAX_LOGGED:
                self.stats.http_targets.append(f"{method} {target}")
            body = self._http_body(method, target)
            status = "200 OK" if body is not None else "404 Not Found"
            data = (body if body is not None else '{"error":"not in capture"}').encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            log.info("http replay: bad request: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class ReplayThread:
    """Runs a :class:`ReplayServer` on its own event loop thread (for tests and the feed benchmark).

    ``with ReplayThread(server) as srv: ...`` starts it and stops it on exit.
    """

    def __init__(self, server: ReplayServer, start_timeout_s: float = 10.0) -> None:
        self.server = server
        self.start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> ReplayServer:
        self._thread = threading.Thread(target=self._run, name="replay-server", daemon=True)
        self._thread.start()
        if not self._started.wait(self.start_timeout_s) or self._error is not None:
            raise SourceError(f"replay server did not start: {self._error}")
        return self.server

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # The server's Event must belong to this loop.
        self.server.all_sent = asyncio.Event()
        if all(s.finished for s in self.server._states):
            self.server.all_sent.set()
        try:
            await self.server.start()
        except OSError as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self.server.stop()
