"""``sensorhub alerts serve``: alert events to WebSocket clients, and the live page at ``/``.

One asyncio process. A reader follows the events stream (``XREAD BLOCK``;
the stream, not the pub/sub channel, so a gateway that restarts or loses
Redis for a moment resumes where it was) and hands each event to every
client whose filter takes it. Each client has a bounded queue
(``alerts.client_queue``) and a task of its own that sends from it; a client
that does not read fills its queue and is dropped (close code 1013), and the
others never wait for it.

Endpoints:

- ``ws://HOST:PORT/alerts``: the events as JSON text messages. Query string
  ``device`` (comma-separated globs), ``rule`` (globs), ``severity``
  (comma-separated: ``info``, ``warning``, ``critical``) filter; ``history=N``
  first sends the alerts open now and the last N events (``"history": true``).
  A text message ``{"device": ..., "rule": ..., "severity": ...}`` replaces
  the filter at any time; the gateway answers ``{"type": "filter", ...}``.
- ``/``: the page (plain HTML and JavaScript) that shows the alerts live.
- ``/healthz``: ``ok``.

With ``alerts.token`` set every endpoint wants it: ``?token=...`` or
``Authorization: Bearer ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hmac
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from sensorhub.alerts.keys import SEVERITIES, AlertKeys
from sensorhub.alerts.page import PAGE
from sensorhub.config import Settings
from sensorhub.metrics import hops
from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.redisconn import redis_client
from sensorhub.service.lifecycle import Lifecycle

__all__ = ["SEVERITIES", "Filter", "Gateway"]

log = logging.getLogger(__name__)

#: close code for a client dropped because it did not keep up (RFC 6455: try again later)
CLOSE_SLOW = 1013
CLOSE_POLICY = 1008


class FilterError(ValueError):
    pass


def _globs(v: Any, what: str) -> tuple[str, ...]:
    if v is None or v == "":
        return ()
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not all(isinstance(x, str) for x in items):
        raise FilterError(f"{what}: a comma-separated string or a list of strings")
    return tuple(x.strip() for x in items if x.strip())


class Filter:
    """Which events a client wants: device and rule globs, severities (empty: all)."""

    __slots__ = ("_device", "_rule", "device", "rule", "severity")

    def __init__(self, device: tuple[str, ...] = (), rule: tuple[str, ...] = (), severity: tuple[str, ...] = ()):
        bad = [s for s in severity if s not in SEVERITIES]
        if bad:
            raise FilterError(f"severity: one or more of {', '.join(SEVERITIES)} (got {', '.join(bad)})")
        self.device, self.rule, self.severity = device, rule, frozenset(severity)
        self._device = _compile(device)
        self._rule = _compile(rule)

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Filter:
        unknown = set(spec) - {"device", "rule", "severity", "history", "token"}
        if unknown:
            raise FilterError(f"unknown filter key(s) {', '.join(sorted(unknown))}: device, rule, severity")
        return cls(_globs(spec.get("device"), "device"), _globs(spec.get("rule"), "rule"),
                   _globs(spec.get("severity"), "severity"))

    def wants(self, ev: dict[str, Any]) -> bool:
        if self.severity and ev.get("severity") not in self.severity:
            return False
        if self._device is not None and not self._device(str(ev.get("device", ""))):
            return False
        return self._rule is None or bool(self._rule(str(ev.get("rule", ""))))

    def describe(self) -> dict[str, Any]:
        return {"device": list(self.device), "rule": list(self.rule), "severity": sorted(self.severity)}


def _compile(globs: tuple[str, ...]) -> Callable[[str], Any] | None:
    if not globs or "*" in globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)).match


class _Client:
    __slots__ = ("filter", "queue", "task", "ws")

    def __init__(self, ws: ServerConnection, flt: Filter, size: int) -> None:
        self.ws = ws
        self.filter = flt
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=size)
        self.task: asyncio.Task[None] | None = None


def _message(raw: str, history: bool = False) -> str:
    """The event's JSON with ``type`` first and no closing brace: the sender appends ``sent``."""
    head = '{"type": "alert", "history": true, ' if history else '{"type": "alert", '
    return head + raw.strip()[1:-1]


class Gateway:
    """The WebSocket fan-out of alert events; :meth:`run` serves until ``life.stop`` is set."""

    def __init__(self, settings: Settings, life: Lifecycle | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.cfg = settings.alerts
        self.life = life or Lifecycle("alerts serve")
        self.layout = StreamLayout(settings.redis.prefix, settings.redis.partitions)
        self.keys = AlertKeys(self.layout)
        self.metrics = metrics or Metrics("gateway", f"{self.cfg.host}:{self.cfg.port}")
        self.clients: set[_Client] = set()
        self.recent: deque[tuple[str, dict[str, Any]]] = deque(maxlen=max(1, self.cfg.history))
        self.open: dict[str, tuple[str, dict[str, Any]]] = {}
        self.last_id = "$"
        self.loaded = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        self.server: Server | None = None
        self.port = self.cfg.port
        token = self.cfg.secret("token")  # alerts.token_file, or alerts.token
        self._token = token.encode() if token else None

    # ---- HTTP side ----
    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        given = parse_qs(urlsplit(request.path).query).get("token", [""])[0]
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self._token)

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if not self._authorized(request):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "a token is needed: ?token=... or Authorization: Bearer\n")
        if path == "/alerts":
            if len(self.clients) >= self.cfg.max_clients:
                self.metrics.inc("clients_refused")
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                          f"{self.cfg.max_clients} clients already (alerts.max_clients)\n")
            return None  # the WebSocket handshake
        if path in ("/", "/index.html"):
            resp = connection.respond(HTTPStatus.OK, PAGE)
            del resp.headers["Content-Type"]
            resp.headers["Content-Type"] = "text/html; charset=utf-8"
            resp.headers["Cache-Control"] = "no-store"
            return resp
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        return connection.respond(HTTPStatus.NOT_FOUND, "not found: / (the page), /alerts (WebSocket), /healthz\n")

    # ---- WebSocket side ----
    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        q = {k: v[-1] for k, v in parse_qs(urlsplit(ws.request.path).query).items()}
        try:
            flt = Filter.of(q)
            history = min(int(q.get("history", "0") or 0), self.cfg.history)
        except (FilterError, ValueError) as exc:
            await ws.close(CLOSE_POLICY, f"bad filter: {exc}"[:120])
            return
        c = _Client(ws, flt, self.cfg.client_queue)
        if history:
            self._history(c, history)
        self.clients.add(c)
        self.metrics.set("clients", len(self.clients))
        c.task = asyncio.create_task(self._sender(c), name=f"ws-send-{id(c):x}")
        try:
            async for msg in ws:
                self._on_message(c, msg)
        except ConnectionClosed:
            pass
        finally:
            self._forget(c)

    def _history(self, c: _Client, n: int) -> None:
        """The alerts open now, then the last ``n`` events, as far as the client's queue allows."""
        room = max(0, self.cfg.client_queue - 8)  # leave room for live events
        opened = [(raw, ev) for raw, ev in self.open.values() if c.filter.wants(ev)][-room:] if room else []
        seen = {(str(ev.get("id")), "open") for _raw, ev in opened}
        recent: list[tuple[str, dict[str, Any]]] = []
        for raw, ev in reversed(list(self.recent)[-n:]):  # newest first, as many as fit
            if len(opened) + len(recent) >= room:
                break
            key = (str(ev.get("id")), str(ev.get("state")))
            if key not in seen and c.filter.wants(ev):
                seen.add(key)
                recent.append((raw, ev))
        for raw, _ev in opened + recent[::-1]:
            c.queue.put_nowait(_message(raw, history=True))

    def _on_message(self, c: _Client, msg: str | bytes) -> None:
        try:
            spec = json.loads(msg)
            if not isinstance(spec, dict):
                raise FilterError("a JSON object: {\"device\": ..., \"rule\": ..., \"severity\": ...}")
            c.filter = Filter.of(spec)
            reply: dict[str, Any] = {"type": "filter", **c.filter.describe()}
        except (ValueError, FilterError) as exc:
            reply = {"type": "error", "error": f"bad filter: {exc}"}
        self._enqueue(c, json.dumps(reply)[:-1])

    async def _sender(self, c: _Client) -> None:
        m = self.metrics
        try:
            while True:
                base = await c.queue.get()
                sent = time.time()
                await c.ws.send(f'{base}, "sent": {sent:.6f}}}')
                m.inc("sent")
        except ConnectionClosed:
            pass

    def _enqueue(self, c: _Client, base: str) -> bool:
        try:
            c.queue.put_nowait(base)
            return True
        except asyncio.QueueFull:
            self._drop(c)
            return False

    def _drop(self, c: _Client) -> None:
        """A client whose queue is full: closed, so that it costs the others nothing."""
        if c not in self.clients:
            return
        self.metrics.inc("clients_dropped")
        log.warning("dropping a slow WebSocket client %s: %d messages queued", c.ws.remote_address, c.queue.qsize())
        self._forget(c)
        task = asyncio.create_task(self._close(c), name="ws-drop")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, c: _Client) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.ws.close(CLOSE_SLOW, f"too slow: {self.cfg.client_queue} messages queued"), 2)
        if c.ws.transport is not None:
            c.ws.transport.abort()

    def _forget(self, c: _Client) -> None:
        if c in self.clients:
            self.clients.discard(c)
            if c.task is not None:
                c.task.cancel()
        self.metrics.set("clients", len(self.clients))

    # ---- events ----
    def _dispatch(self, raw: str) -> None:
        try:
            ev = json.loads(raw)
        except ValueError:
            self.metrics.inc("events_unreadable")
            return
        self.recent.append((raw, ev))
        if ev.get("state") == "open":
            self.open[str(ev.get("id"))] = (raw, ev)
        else:
            self.open.pop(str(ev.get("id")), None)
        self.metrics.inc("events")
        base = _message(raw)
        for c in list(self.clients):
            if c.filter.wants(ev):
                self._enqueue(c, base)
        evaluated = ev.get("evaluated")
        if isinstance(evaluated, int | float):
            self.metrics.record_us(hops.ALERT_TO_GATEWAY, (time.time() - evaluated) * 1e6)

    async def _load(self, r: Any) -> None:
        """The alerts open now and the last events, before following the stream."""
        self.open.clear()
        async for _aid, raw in r.hscan_iter(self.keys.open, count=1000):
            text = raw.decode()
            with contextlib.suppress(ValueError):
                ev = json.loads(text)
                self.open[str(ev.get("id"))] = (text, ev)
        entries = await r.xrevrange(self.keys.events, count=self.cfg.history) if self.cfg.history else []
        self.recent.clear()
        for _eid, fields in reversed(entries):
            raw = fields.get(b"e")
            if raw:
                text = raw.decode()
                with contextlib.suppress(ValueError):
                    self.recent.append((text, json.loads(text)))
        if self.last_id == "$":
            last = await r.xrevrange(self.keys.events, count=1)
            self.last_id = last[0][0].decode() if last else "0-0"

    async def _follow(self) -> None:
        b = self.settings.writer.backoff
        delay = b.initial_s
        stop = self.life.stop
        while not stop.is_set():
            r: Any = redis_client(self.settings.redis, asyncio=True, socket_connect_timeout=self.settings.redis.socket_timeout_s,
                                        socket_timeout=self.settings.redis.socket_timeout_s + 2)
            try:
                await self._load(r)
                self.loaded.set()
                self.metrics.set("redis_ok", True)
                delay = b.initial_s
                # at most half a client queue per read, then the senders' turn: a burst fills
                # the queue of a client that does not read, not of one that does
                count = max(1, self.cfg.client_queue // 2)
                while not stop.is_set():
                    resp = await r.xread({self.keys.events: self.last_id}, count=count, block=1000)
                    for _stream, entries in resp or []:
                        for eid, fields in entries:
                            self.last_id = eid.decode()
                            raw = fields.get(b"e")
                            if raw:
                                self._dispatch(raw.decode())
                    self.life.watchdog.tick()
                    await asyncio.sleep(0)
            except (redis.RedisError, OSError) as exc:
                self.metrics.set("redis_ok", False)
                log.warning("reading alert events failed (%s); again in ~%.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * b.factor, b.max_s)
            finally:
                await r.aclose()

    async def _publish(self) -> None:
        r = redis_client(self.settings.redis, socket_timeout=2.0, socket_connect_timeout=2.0)
        key = self.layout.metrics_key(self.metrics.process)
        ttl = self.settings.metrics.ttl_s
        try:
            while not self.life.stop.is_set():
                self.metrics.set("clients", len(self.clients))
                self.metrics.set("open", len(self.open))
                with contextlib.suppress(redis.RedisError, OSError):
                    await asyncio.to_thread(self.metrics.publish, r, key, ttl)
                self.life.watchdog.tick()
                await asyncio.sleep(self.settings.metrics.publish_interval_s)
        finally:
            r.close()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        self.life.add_stop_callback(lambda: loop.call_soon_threadsafe(stopped.set))
        async with serve(
            self._handler, self.cfg.host, self.cfg.port, process_request=self._http, compression=None,
            max_size=65536, ping_interval=20, ping_timeout=20, close_timeout=2, server_header="sensorhub",
        ) as server:
            self.server = server
            self.port = int(next(iter(server.sockets)).getsockname()[1])
            async with asyncio.TaskGroup() as tg:
                follow = tg.create_task(self._follow(), name="alerts-follow")
                publish = tg.create_task(self._publish(), name="alerts-metrics")
                waiting = [asyncio.create_task(self.loaded.wait()), asyncio.create_task(stopped.wait())]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for t in waiting:
                    t.cancel()
                if self.loaded.is_set():
                    self.life.ready(f"alerts gateway on ws://{self.cfg.host}:{self.port}/alerts, "
                                    f"{len(self.open)} open")
                await stopped.wait()
                follow.cancel()
                publish.cancel()
            for c in list(self.clients):
                self._forget(c)
            server.close()
        return 0
