"""Shared machinery of the exchange WebSocket sources.

Two halves, kept apart so that parsing never runs on the network thread:

* :class:`Venue` describes one venue: default endpoint, subscribe messages,
  application-level heartbeat, the optional pre-connect HTTP step, symbol
  spelling, and :meth:`Venue.parse`, which turns one raw frame into
  normalized trades appended to a :class:`~sensorhub.decoders.trade_batch.TradeBatch`.
  The framework around ``parse`` keeps a bounded recent-trade-id set per
  symbol (so a trade re-sent in a snapshot after a reconnect is emitted once),
  counts sequence gaps where a venue numbers its trades consecutively, and
  turns malformed input into a :class:`~sensorhub.errors.DecodeError` with the
  batch left exactly as it was. A frame on a trade channel that yields no
  trade is such an error too (a dead letter), and a feed whose trade frames
  keep failing reports itself unhealthy (``FeedStats.unhealthy``).
* :class:`ExchangeSource` is the :class:`~sensorhub.sources.base.Source`: an
  asyncio loop on its own thread with a ``websockets`` client, connect
  timeout, capped exponential backoff with full jitter that never gives up,
  resubscribe on every connection, stale-feed detection, and a bounded
  :class:`~sensorhub.sources.base.FrameQueue` towards the ingest loop. A venue
  that serves its markets on separate connections (Bybit: spot, linear,
  inverse) gets one connection per market its symbols need, each with its own
  frame topic, so the parser always knows which market a frame belongs to.

A venue module subclasses :class:`Venue`, fills in what is particular to the
venue and decorates the class with :func:`register_venue`; nothing else
changes (see ``docs/exchanges.md``, "How to add a venue").
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import logging
import random
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI, WebSocketException

from sensorhub.config import BackoffSettings, Settings, SourceSettings
from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.errors import (
    ConfigError,
    DecodeError,
    InvalidValue,
    SourceError,
    SyntaxError_,
    Truncated,
)
from sensorhub.sources.base import Decoder, Frame, FrameQueue, Source, register

__all__ = [
    "FRAME_TOPIC",
    "SOURCE_OPTIONS",
    "VENUES",
    "AmountUnit",
    "ExchangeDecoder",
    "ExchangeSource",
    "FeedStats",
    "Venue",
    "ensure_whole",
    "http_json",
    "instrument_kind",
    "iso_to_us",
    "loads",
    "register_venue",
    "split_concatenated",
]

log = logging.getLogger(__name__)

#: Topic of every frame an exchange source hands over (one feed per source).
FRAME_TOPIC = "ws"

AmountUnit = Literal["base", "contracts"]

#: Options every exchange source understands (``sources.<name>.options``), with defaults.
SOURCE_OPTIONS: dict[str, Any] = {
    "connect_timeout_s": 10.0,  # TCP + TLS + WebSocket handshake, and the pre-connect HTTP step
    "stale_after_s": None,  # no message for this long -> reconnect; None: the venue's default
    "heartbeat_s": None,  # application ping interval; None: the venue's default
    "recent_trade_ids": 4096,  # per symbol: ids remembered to drop re-sent trades
    "max_frame_bytes": 16 * 1024 * 1024,  # larger frames close the connection (book snapshots fit)
    "compression": False,  # permessage-deflate costs CPU on a shared box; venues send little
    "backoff_initial_s": None,  # None: the ingest backoff settings
    "backoff_max_s": None,
    "trade_error_window": 100,  # the last this many trade frames are looked at for the feed's health ...
    "unhealthy_trade_errors": 3,  # ... and this many failures among them make the feed unhealthy
}

#: Registered venues by name.
VENUES: dict[str, type[Venue]] = {}


# --------------------------------------------------------------------------- helpers

_day_cache: dict[str, int] = {}


def iso_to_us(text: str) -> int:
    """``2026-08-09T21:05:42.514318Z`` (any 0..9 fraction digits, ``Z`` or ``+00:00``) -> µs since the epoch.

    Venues send a handful of dates per feed, so the date part is cached and
    only the clock part is parsed per trade.
    """
    try:
        day = _day_cache.get(text[:10])
        if day is None:
            if len(_day_cache) > 64:  # bounded: a long-running feed crosses many days
                _day_cache.clear()
            y, mo, d = int(text[0:4]), int(text[5:7]), int(text[8:10])
            if text[4] != "-" or text[7] != "-" or text[10] not in "T ":
                raise ValueError(text)
            day = _day_cache[text[:10]] = calendar.timegm((y, mo, d, 0, 0, 0)) * 1_000_000
        secs = int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19])
        us = 0
        if len(text) > 19 and text[19] == ".":
            end = 20
            n = len(text)
            while end < n and text[end].isdigit():
                end += 1
            frac = text[20:end]
            us = int((frac + "000000")[:6]) if frac else 0
            tail = text[end:]
        else:
            tail = text[19:]
        if tail not in ("Z", "", "+00:00"):
            raise ValueError(text)
    except (ValueError, IndexError):
        raise InvalidValue(f"timestamp {text!r} is not ISO 8601 UTC") from None
    return day + secs * 1_000_000 + us


InstrumentKind = Literal["spot", "perpetual", "future", "other"]


def instrument_kind(symbol: str) -> InstrumentKind:
    """What a normalized symbol names: ``BTC-USDT`` spot, ``BTC-USDT-PERP`` perpetual, ``BTC-USD-220527`` future."""
    parts = symbol.split("-")
    if len(parts) == 2 and all(parts):
        return "spot"
    if len(parts) == 3 and parts[0] and parts[1]:
        if parts[2] == "PERP":
            return "perpetual"
        if len(parts[2]) == 6 and parts[2].isdigit():
            return "future"
    return "other"


def split_concatenated(symbol: str, quotes: Sequence[str]) -> str | None:
    """``BTCUSDT`` -> ``BTC-USDT`` using the longest quote currency that ends it, or None."""
    for q in quotes:
        if symbol.endswith(q) and len(symbol) > len(q):
            return f"{symbol[: -len(q)]}-{q}"
    return None


async def http_json(method: str, url: str, body: Any = None, timeout_s: float = 10.0) -> Any:
    """One HTTP request with a JSON response, for a venue's pre-connect step (e.g. a token).

    Runs the blocking standard-library client on a worker thread so the feed's
    event loop keeps serving; any failure is a :class:`SourceError` and the
    connection attempt backs off like any other.
    """

    def call() -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        # Loopback replays and venues alike are reached directly, never through an environment proxy.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    try:
        return await asyncio.to_thread(call)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{method} {url}: {exc}") from exc


_CLOSERS = {ord("{"): ord("}"), ord("["): ord("]")}


def ensure_whole(payload: bytes) -> None:
    """Framing check for frames not parsed further: a JSON object or array that is closed.

    Frames on channels a feed does not store (books, tickers) are only checked
    this far: they carry nothing to store, and parsing them fully would cost
    most of the feed's CPU. A cut frame still becomes a dead letter.
    """
    if not payload:
        raise Truncated("empty frame")
    close = _CLOSERS.get(payload[0])
    if close is None:
        raise SyntaxError_("not a JSON object or array", 0)
    end = payload[-1]
    if end != close:
        stripped = payload.rstrip()
        if not stripped or stripped[-1] != close:
            raise Truncated("JSON not closed", len(payload))


def loads(payload: bytes) -> Any:
    """Generic JSON decode for rare frames (acks, errors); bad JSON is a ``SyntaxError_``."""
    try:
        return _json_decode(payload)
    except msgspec.DecodeError as exc:
        raise SyntaxError_(str(exc)) from None


_json_decode = msgspec.json.Decoder().decode
_INF = float("inf")


# --------------------------------------------------------------------------- venue


@dataclass
class FeedStats:
    """Counters of one feed's parser; copied into ``Source.health.extra``."""

    trades: int = 0  # distinct trades emitted
    duplicates: int = 0  # trades dropped because their id was seen recently
    gaps: int = 0  # times a sequential trade id jumped forward
    missing: int = 0  # trade ids skipped over by those jumps
    parse_errors: int = 0  # frames that raised DecodeError
    venue_errors: int = 0  # error messages the venue sent (bad subscription...)
    last_trade_ns: int = 0  # receive time of the newest trade
    trade_frames: int = 0  # frames on a trade channel (acks and heartbeats are not)
    trade_frame_errors: int = 0  # of those, frames that yielded no trade: dead letters
    unhealthy: str = ""  # why the feed is unhealthy (trade frames keep failing), or empty


class Venue:
    """What is particular to one venue; subclass, fill in, decorate with :func:`register_venue`.

    An instance holds the parse state of one feed (symbol maps, recent trade
    ids, last sequence numbers), so each source owns its own instance.

    Symbols are configured in the normalized spelling ``BASE-QUOTE``
    (``BTC-USDT``); derivatives carry a suffix: ``-PERP`` for perpetual swaps,
    ``-YYMMDD`` for dated futures (see :func:`instrument_kind`), so a spot pair
    and a derivative never share a stored symbol. A venue serves the kinds in
    :attr:`instrument_kinds`; any other is a configuration error.
    :meth:`to_venue_symbol` maps a symbol to the venue's spelling; frames are
    mapped back through the same table. Where a venue spells a spot pair and a
    derivative alike (Bybit ``BTCUSDT``), it serves them on separate
    connections (:meth:`connection_of_symbol`), and the table is looked up per
    connection: two configured symbols may share a venue spelling only on
    different connections.
    """

    #: Registry name (``sensorhub ingest --source NAME`` with ``driver = NAME``).
    name: ClassVar[str] = ""
    #: Default WebSocket endpoint.
    endpoint: ClassVar[str] = ""
    #: Application-level client heartbeat interval (None: the venue needs none).
    heartbeat_s: ClassVar[float | None] = None
    #: No message for this long means the feed is dead: reconnect.
    stale_after_s: ClassVar[float] = 60.0
    #: True when trade ids are consecutive integers per symbol (gap detection).
    sequential_ids: ClassVar[bool] = False
    #: True when the server sends application pings that need an answer (:meth:`server_ping_reply`).
    answers_server_pings: ClassVar[bool] = False
    #: True when the server may ask the client to reconnect (:meth:`is_reconnect_request`).
    honours_reconnect_requests: ClassVar[bool] = False
    #: Venue-specific options (``sources.<name>.options``) with their defaults.
    options: ClassVar[dict[str, Any]] = {}
    #: The instrument kinds (:func:`instrument_kind`) this driver reads; a symbol of another kind is refused.
    instrument_kinds: ClassVar[frozenset[str]] = frozenset({"spot"})
    #: Host names of the venue's derivatives endpoints, refused as ``endpoint`` by a spot-only
    #: driver: they spell perpetuals like spot pairs, whose names the trades would then be stored under.
    derivative_hosts: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        symbols: Sequence[str],
        options: Mapping[str, Any] | None = None,
        recent_trade_ids: int = SOURCE_OPTIONS["recent_trade_ids"],
        trade_error_window: int = SOURCE_OPTIONS["trade_error_window"],
        unhealthy_trade_errors: int = SOURCE_OPTIONS["unhealthy_trade_errors"],
    ) -> None:
        if not symbols:
            raise ConfigError(f"sources.{self.name}.symbols", "at least one symbol such as BTC-USDT")
        self.opts: dict[str, Any] = {**self.options, **(options or {})}
        self.symbols: tuple[str, ...] = tuple(dict.fromkeys(s.upper() for s in symbols))
        for s in self.symbols:
            kind = instrument_kind(s)
            if kind not in self.instrument_kinds:
                raise ConfigError(
                    f"sources.{self.name}.symbols",
                    f"{self.name} symbols of the kinds it serves ({', '.join(sorted(self.instrument_kinds))}: "
                    "BASE-QUOTE spot, BASE-QUOTE-PERP perpetuals, BASE-QUOTE-YYMMDD futures)",
                    s,
                )
        #: normalized -> venue spelling, and back
        self.venue_symbols: dict[str, str] = {}
        self.normal_symbols: dict[str, str] = {}
        spelled: dict[tuple[str, str], str] = {}
        for s in self.symbols:
            v = self.to_venue_symbol(s)
            other = spelled.setdefault((self.connection_of_symbol(s), v), s)
            if other != s:
                raise ConfigError(
                    f"sources.{self.name}.symbols", "symbols that name distinct instruments", f"{other} and {s} are both {v}"
                )
            self.venue_symbols[s] = v
            self.normal_symbols[v] = s
        self.stats = FeedStats()
        self._recent_cap = max(1, int(recent_trade_ids))
        self._recent: dict[str, dict[str, None]] = {}
        self._last_seq: dict[str, int] = {}
        self._undo: list[tuple[dict[str, None], str]] = []
        self._seqs: list[tuple[str, int]] = []
        #: Heartbeat interval the venue asked for in its pre-connect step (KuCoin's ``pingInterval``);
        #: used instead of ``heartbeat_s`` unless the source's options set one.
        self.heartbeat_hint_s: float | None = None
        #: The connection (:meth:`connections`) of the frame being parsed; set by :meth:`parse`.
        self.connection = ""
        #: Set by ``_parse`` once it knows the frame is on a trade channel (see :meth:`parse`).
        self.trade_frame = False
        self._outcomes: deque[bool] = deque(maxlen=max(1, int(trade_error_window)))  # True: a failed trade frame
        self._window_errors = 0
        self._unhealthy_after = max(1, int(unhealthy_trade_errors))

    # ---- what a venue module fills in

    def to_venue_symbol(self, symbol: str) -> str:
        """Normalized symbol (``BTC-USDT``) -> the venue's spelling."""
        raise NotImplementedError

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """The venue's spelling -> normalized; frames for unconfigured symbols use this fallback."""
        return venue_symbol

    def default_endpoint(self) -> str:
        """The endpoint used without an override (a venue may pick one by its symbols)."""
        return self.endpoint

    def url(self, endpoint: str) -> str:
        """The URL to connect to (venues that subscribe in the URL build it here)."""
        return endpoint

    def subscribe_messages(self) -> list[str | bytes]:
        """Frames to send after every connect (resubscribe on reconnect is automatic)."""
        return []

    # ---- venues with one connection per market (Bybit's spot, linear, inverse)

    def connection_of_symbol(self, symbol: str) -> str:
        """The connection that serves ``symbol``: ``""`` on venues that serve every market on one."""
        return ""

    def connections(self) -> tuple[str, ...]:
        """The connections the configured symbols need, in the order of the symbols."""
        return tuple(dict.fromkeys(self.connection_of_symbol(s) for s in self.symbols))

    def symbols_on(self, connection: str) -> tuple[str, ...]:
        """The configured symbols served on ``connection``."""
        return tuple(s for s in self.symbols if self.connection_of_symbol(s) == connection)

    def connection_endpoint(self, endpoint: str, connection: str) -> str:
        """The endpoint of ``connection`` given the configured (or default) one; the same one by default."""
        return endpoint

    def connection_of(self, path: str) -> str:
        """The connection a WebSocket URL path belongs to (the replay server matches recordings by it)."""
        return ""

    def subscribe_messages_for(self, connection: str) -> list[str | bytes]:
        """Frames to send after every connect of ``connection``; :meth:`subscribe_messages` by default."""
        return self.subscribe_messages()

    def heartbeat_message(self) -> str | bytes | None:
        """The client's application-level ping, sent every ``heartbeat_s``."""
        return None

    def server_ping_reply(self, payload: bytes) -> str | bytes | None:
        """Answer to a server application ping (e.g. HTX ``{"ping":n}`` -> ``{"pong":n}``), else None.

        Called on the network thread for every frame when ``answers_server_pings``
        is set; a frame answered here is not handed to the ingest loop.
        """
        return None

    def is_reconnect_request(self, payload: bytes) -> bool:
        """True for a frame by which the server asks the client to reconnect (Bitstamp ``bts:request_reconnect``).

        Called on the network thread for every frame when
        ``honours_reconnect_requests`` is set: keep it cheap. The source then
        closes the connection and reconnects after the shortest backoff; the frame is
        still handed to the ingest loop.
        """
        return False

    def pong_for(self, client_message: str | bytes) -> str | bytes | None:
        """What the venue's server answers to a client heartbeat (used by the replay server)."""
        return None

    def replay_http_response(
        self, method: str, target: str, ws_url: str, recorded: str | None, n: int, heartbeat_s: float
    ) -> str | None:
        """The replay server's answer to the ``n``-th REST request (from 1) for ``target``, or None.

        None serves the recorded response (``recorded``; None when the
        capture has none). A venue whose pre-connect step hands out the
        WebSocket address (KuCoin's token) answers here so that the address
        points at the replay server (``ws_url``) and asks for heartbeats
        every ``heartbeat_s``.
        """
        return None

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """Channel/symbol keys a subscribe message asks for (the replay server compares them)."""
        return {client_message if isinstance(client_message, str) else client_message.decode("utf-8", "replace")}

    def url_subscription_keys(self, path: str) -> set[str]:
        """Keys a venue that subscribes in the URL asks for there (``path`` includes the query)."""
        return set()

    async def pre_connect(self, endpoint: str, timeout_s: float) -> str:
        """Optional HTTP step before each connect (e.g. a token); returns the URL to connect to.

        Use :func:`http_json`. Raise :class:`SourceError` when it fails; the
        source backs off and tries again.
        """
        return self.url(endpoint)

    def amount_unit(self, symbol: str) -> AmountUnit:
        """What ``amount`` counts for ``symbol``: base currency, or contracts on derivatives."""
        return "base"

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        """Append the frame's trades through :meth:`emit`; return how many were appended.

        Non-trade frames (books, tickers, acks, heartbeats) return 0. A frame
        on a trade channel sets ``self.trade_frame = True`` as soon as it is
        recognised, whatever its key order or spacing; such a frame that yields
        no trade (a field of the wrong type, a missing field, a wrong shape, no
        trade at all) raises: it is a dead letter, never a silent 0. A frame
        whose trades were all emitted before returns 0 (duplicates).
        Malformed frames raise a ``DecodeError`` subclass; ``KeyError``,
        ``IndexError``, ``TypeError``, ``ValueError`` and msgspec errors are
        turned into one by :meth:`parse`.
        """
        raise NotImplementedError

    # ---- the framework around it

    def parse(self, payload: bytes | str, recv_ns: int, batch: TradeBatch, connection: str = "") -> int:
        """Normalized trades of one raw frame appended to ``batch``; all or nothing.

        ``connection`` names the connection the frame came from (one of
        :meth:`connections`); venues with one connection ignore it.
        """
        if isinstance(payload, str):
            payload = payload.encode()
        self.connection = connection
        self.trade_frame = False
        batch.begin()
        try:
            n = self._parse(payload, recv_ns // 1000, batch)
        except DecodeError as exc:
            self._abort(batch)
            if self.trade_frame and "trade frame" not in exc.detail:
                # the reason says it was a trade frame: a dead letter that stands for lost trades
                raise type(exc)(f"{self._what()}: {exc.detail}", exc.offset) from None
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            self._abort(batch)
            raise InvalidValue(f"{self._what()}: {type(exc).__name__}: {exc}") from None
        except msgspec.ValidationError as exc:
            self._abort(batch)
            raise InvalidValue(f"{self._what()}: {exc}") from None
        except msgspec.DecodeError as exc:
            self._abort(batch)
            raise SyntaxError_(f"{self._what()}: {exc}") from None
        if self.trade_frame:
            self._note_trade_frame(False)
        if n:
            self.stats.trades += n
            self.stats.last_trade_ns = recv_ns
            self._undo.clear()
            if self._seqs:
                self._check_sequence()
        return n

    def _what(self) -> str:
        return f"{self.name} trade frame" if self.trade_frame else self.name

    def _note_trade_frame(self, failed: bool) -> None:
        """One trade frame's outcome into the window that decides the feed's health."""
        st = self.stats
        st.trade_frames += 1
        q = self._outcomes
        if len(q) == q.maxlen and q[0]:
            self._window_errors -= 1
        q.append(failed)
        if failed:
            st.trade_frame_errors += 1
            self._window_errors += 1
        if self._window_errors >= self._unhealthy_after:
            st.unhealthy = f"{self._window_errors} of the last {q.maxlen} trade frames yielded no trade"
        elif st.unhealthy:
            st.unhealthy = ""

    def no_trades(self, what: str = "") -> InvalidValue:
        """The error for a trade frame that holds no trade at all (``raise self.no_trades()``)."""
        return InvalidValue("holds no trade" + (f": {what}" if what else ""))

    def emit(
        self,
        batch: TradeBatch,
        symbol: str,
        trade_id: str,
        price: float,
        amount: float,
        side: int,
        ts_us: int,
        recv_us: int,
        seq: int = -1,
    ) -> int:
        """Append one trade unless its id was seen recently; returns 1 if appended, else 0.

        ``seq`` is the trade id as an integer on venues whose ids are
        consecutive per symbol (gap detection), -1 elsewhere. A trade without
        an id, a price or amount that is not a positive finite number, or a
        time before 1970 raises ``InvalidValue``: the frame is a dead letter.
        """
        if not (0.0 < price < _INF and 0.0 < amount < _INF and ts_us > 0 and trade_id):
            raise InvalidValue(
                f"trade {trade_id!r} of {symbol}: price {price!r}, amount {amount!r} and time {ts_us!r} "
                "must be positive (and finite), the id not empty"
            )
        recent = self._recent.get(symbol)
        if recent is None:
            recent = self._recent[symbol] = {}
        elif trade_id in recent:
            self.stats.duplicates += 1
            return 0
        recent[trade_id] = None
        self._undo.append((recent, trade_id))
        if len(recent) > self._recent_cap:
            del recent[next(iter(recent))]  # oldest first: dicts keep insertion order
        batch.append(self.name, symbol, trade_id, price, amount, side, ts_us, recv_us)
        if seq >= 0:
            self._seqs.append((symbol, seq))
        return 1

    def _abort(self, batch: TradeBatch) -> None:
        batch.rollback()
        for recent, tid in self._undo:
            recent.pop(tid, None)
        self._undo.clear()
        self._seqs.clear()
        self.stats.parse_errors += 1
        if self.trade_frame:
            self._note_trade_frame(True)

    def _check_sequence(self) -> None:
        # Venues may list a message's trades newest first (Coinbase): compare sorted ids.
        seqs = self._seqs
        pairs = sorted(seqs) if len(seqs) > 1 else seqs
        last_seq = self._last_seq
        for symbol, seq in pairs:
            last = last_seq.get(symbol)
            if last is None or seq == last + 1:
                last_seq[symbol] = seq
            elif seq > last:
                self.stats.gaps += 1
                self.stats.missing += seq - last - 1
                log.warning("%s %s: trade ids jump from %d to %d (%d missing)", self.name, symbol, last, seq, seq - last - 1)
                last_seq[symbol] = seq
            # seq <= last: a late trade that was not seen before; no gap to report
        seqs.clear()

    def seen(self, symbol: str, trade_id: str) -> bool:
        """True when ``trade_id`` of ``symbol`` was emitted recently (for venues that send a trade twice)."""
        recent = self._recent.get(symbol)
        return recent is not None and trade_id in recent

    def log_venue_error(self, message: Any) -> None:
        """Count and log an error the venue reported (a well-formed message, not a bad frame)."""
        self.stats.venue_errors += 1
        if self.stats.venue_errors <= 100 or self.stats.venue_errors % 1000 == 0:  # bounded log volume
            log.warning("%s reported an error: %.500s", self.name, message)

    def normal_symbol(self, venue_symbol: str) -> str:
        """Normalized spelling of a symbol as the venue sends it."""
        s = self.normal_symbols.get(venue_symbol)
        if s is None:
            s = self.normal_symbols[venue_symbol] = self.from_venue_symbol(venue_symbol)
            if len(self.normal_symbols) > 4 * len(self.symbols) + 1024:  # bounded against junk symbols
                self.normal_symbols = {self.venue_symbols[k]: k for k in self.symbols}
        return s


def register_venue(cls: type[Venue]) -> type[Venue]:
    """Class decorator: make ``cls`` a source driver named ``cls.name``."""
    if not cls.name or not cls.endpoint:
        raise TypeError(f"{cls.__name__} must set name and endpoint")
    VENUES[cls.name] = cls

    def factory(
        name: str, settings: Settings | None = None, source_settings: SourceSettings | None = None, **kwargs: Any
    ) -> ExchangeSource:
        # the ingest process passes the whole configuration and the source's own table
        if settings is not None:
            kwargs.setdefault("max_inflight_frames", settings.ingest.max_inflight_frames)
            kwargs.setdefault("backoff", settings.ingest.backoff)
        return ExchangeSource(name, cls, source_settings, **kwargs)

    register(cls.name)(factory)
    return cls


# --------------------------------------------------------------------------- decoder


class ExchangeDecoder:
    """The ingest loop's decoder for one connection of an exchange feed: the venue's :meth:`Venue.parse`."""

    def __init__(self, venue: Venue, connection: str = "", source: ExchangeSource | None = None) -> None:
        self.venue = venue
        self.connection = connection
        self.source = source

    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int:
        """Append the frame's trades to ``batch`` (a ``TradeBatch``); see :meth:`Venue.parse`."""
        try:
            return self.venue.parse(payload, recv_ns, batch, self.connection)
        except DecodeError:
            if self.source is not None:
                self.source.note_parse_error()
            raise


# --------------------------------------------------------------------------- source


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
                self.venue.connection_endpoint(self.endpoint, n), ExchangeDecoder(self.venue, n, self),
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
        stopping = self._stopping
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
                # The ingest loop is behind: stop reading so TCP pushes back on the venue.
                self.queue_full_waits += 1
                while not put(frame, 0.25):
                    if stopping.is_set():
                        return
            if reconnects_on_request and venue.is_reconnect_request(data):
                self.reconnect_requests += 1
                self._set_detail(c, "the venue asked for a reconnect")
                log.info("%s: %s", self.name, c.detail)
                return  # the session closes the socket; the reconnect waits only the shortest backoff

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
            if idle_s > self.stale_after_s:
                self.stale_reconnects += 1
                self._set_detail(c, f"stale: no message for {idle_s:.1f} s")
                log.warning("%s: %s; reconnecting", self.name, c.detail)
                ws.transport.abort()  # a dead peer would stall a close handshake
                return
