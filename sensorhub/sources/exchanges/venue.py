"""The venue parse framework: what a venue module subclasses, and the ingest's decoder around it.

:class:`Venue` describes one venue: default endpoint, subscribe messages,
application-level heartbeat, the optional pre-connect HTTP step, symbol
spelling, and :meth:`Venue.parse`, which turns one raw frame into normalized
trades appended to a :class:`~sensorhub.decoders.trade_batch.TradeBatch`.
The framework around ``parse`` keeps a bounded recent-trade-id set per
symbol (so a trade re-sent in a snapshot after a reconnect is emitted once),
counts sequence gaps where a venue numbers its trades consecutively, and
turns malformed input into a :class:`~sensorhub.errors.DecodeError` with the
batch left exactly as it was. A frame on a trade channel that yields no
trade is such an error too (a dead letter), and a feed whose trade frames
keep failing reports itself unhealthy (``FeedStats.unhealthy``).
:class:`ExchangeDecoder` is the ingest loop's decoder of one connection.

A venue module subclasses :class:`Venue`, fills in what is particular to the
venue and decorates the class with :func:`register_venue`; nothing else
changes (see ``docs/exchanges.md``, "How to add a venue"). The connection
loop (:mod:`sensorhub.sources.exchanges.connection`) makes every registered
venue a source driver of the same name; nothing here knows of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgspec

from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.errors import ConfigError, DecodeError, InvalidValue, SourceError, SyntaxError_
from sensorhub.sources.exchanges.parsing import instrument_kind

__all__ = [
    "PARSE_OPTIONS",
    "VENUES",
    "AmountUnit",
    "ExchangeDecoder",
    "FeedStats",
    "Venue",
    "http_json",
    "on_register_venue",
    "register_venue",
]

log = logging.getLogger(__name__)

AmountUnit = Literal["base", "contracts"]

#: Options of the parse framework (``sources.<name>.options``, with the connection's), with defaults.
PARSE_OPTIONS: dict[str, Any] = {
    "recent_trade_ids": 4096,  # per symbol: ids remembered to drop re-sent trades
    "trade_error_window": 100,  # the last this many trade frames are looked at for the feed's health ...
    "unhealthy_trade_errors": 3,  # ... and this many failures among them make the feed unhealthy
}

#: Registered venues by name.
VENUES: dict[str, type[Venue]] = {}
_on_register: list[Callable[[type[Venue]], None]] = []

_INF = float("inf")


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
    ``-YYMMDD`` for dated futures (see
    :func:`~sensorhub.sources.exchanges.parsing.instrument_kind`), so a spot
    pair and a derivative never share a stored symbol. A venue serves the kinds in
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
    #: The instrument kinds (``parsing.instrument_kind``) this driver reads; a symbol of another kind is refused.
    instrument_kinds: ClassVar[frozenset[str]] = frozenset({"spot"})
    #: Host names of the venue's derivatives endpoints, refused as ``endpoint`` by a spot-only
    #: driver: they spell perpetuals like spot pairs, whose names the trades would then be stored under.
    derivative_hosts: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        symbols: Sequence[str],
        options: Mapping[str, Any] | None = None,
        recent_trade_ids: int = PARSE_OPTIONS["recent_trade_ids"],
        trade_error_window: int = PARSE_OPTIONS["trade_error_window"],
        unhealthy_trade_errors: int = PARSE_OPTIONS["unhealthy_trade_errors"],
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
    """Class decorator: make ``cls`` the venue named ``cls.name`` (and so a source driver of that name)."""
    if not cls.name or not cls.endpoint:
        raise TypeError(f"{cls.__name__} must set name and endpoint")
    VENUES[cls.name] = cls
    for hook in _on_register:
        hook(cls)
    return cls


def on_register_venue(hook: Callable[[type[Venue]], None]) -> None:
    """Call ``hook`` with every registered venue, those registered already and those to come."""
    _on_register.append(hook)
    for cls in list(VENUES.values()):
        hook(cls)


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


class ExchangeDecoder:
    """The ingest loop's decoder for one connection of an exchange feed: the venue's :meth:`Venue.parse`."""

    def __init__(self, venue: Venue, connection: str = "", on_parse_error: Callable[[], None] | None = None) -> None:
        self.venue = venue
        self.connection = connection
        #: Called after a frame failed to parse (the source shows the feed's error counts at once).
        self.on_parse_error = on_parse_error

    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int:
        """Append the frame's trades to ``batch`` (a ``TradeBatch``); see :meth:`Venue.parse`."""
        try:
            return self.venue.parse(payload, recv_ns, batch, self.connection)
        except DecodeError:
            if self.on_parse_error is not None:
                self.on_parse_error()
            raise
