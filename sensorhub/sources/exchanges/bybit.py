"""Bybit v5 public ``publicTrade.<symbol>`` topics (spot, linear and inverse).

* One connection per product category, each to its own endpoint:
  ``/v5/public/spot`` for spot pairs (``BTC-USDT``), ``/v5/public/linear`` for
  USDT and USDC perpetuals (``BTC-USDT-PERP``, ``BTC-USDC-PERP``),
  ``/v5/public/inverse`` for coin-margined perpetuals (``BTC-USD-PERP``). A
  source opens every connection its symbols need; the endpoint (default
  ``wss://stream.bybit.com``, or an override such as a replay server) is the
  base the category path is appended to (a configured endpoint that already
  ends in ``/v5/public/<category>`` is cut back to its base first).
* Venue spelling: ``BTCUSDT`` for the spot pair *and* the USDT perpetual,
  ``BTCPERP`` for the USDC perpetual, ``BTCUSD`` for the inverse perpetual.
  Frames do not say their category, so symbols are resolved per connection:
  ``BTCUSDT`` on the spot connection is ``BTC-USDT``, on the linear one
  ``BTC-USDT-PERP``.
* Each push (marked ``"type":"snapshot"`` although it carries new trades)
  holds a batch of trades. Trade ids ``i`` are UUIDs on derivatives: no gap
  detection. Side ``S`` is the taker side.
* Amount: ``v`` in base coin on spot and linear perpetuals, in contracts
  (USD) on inverse perpetuals.
* Heartbeat: ``{"op":"ping"}`` every 20 s; the server answers with
  ``"op":"ping"`` and ``"ret_msg":"pong"`` (linear) or ``"op":"pong"`` (spot).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.errors import InvalidValue
from sensorhub.sources.exchanges.parsing import ensure_whole, loads, split_concatenated
from sensorhub.sources.exchanges.venue import AmountUnit, Venue, register_venue

__all__ = ["VENUE", "Bybit"]

QUOTES = ("USDT", "USDC", "USDE", "EUR", "BTC", "ETH", "DAI", "USD", "BRL")
DEFAULT_BASE = "wss://stream.bybit.com"
CATEGORIES = ("spot", "linear", "inverse")
_PATH = "/v5/public/"
_SUBSCRIBE_CHUNK = 10  # Bybit accepts at most 10 topics per spot subscribe request
_TOPIC = "publicTrade."


class _Trade(msgspec.Struct):
    T: int
    s: str
    S: str
    v: float
    p: float
    i: str


class _TradeMsg(msgspec.Struct):
    topic: str
    data: list[_Trade]


_trade_msg = msgspec.json.Decoder(_TradeMsg, strict=False).decode
_SIDES = {"Buy": SIDE_BUY, "Sell": SIDE_SELL}


@register_venue
class Bybit(Venue):
    """Bybit v5 trades, one connection per category."""

    name = "bybit"
    endpoint = DEFAULT_BASE
    heartbeat_s = 20.0
    stale_after_s = 60.0
    sequential_ids = False
    instrument_kinds = frozenset({"spot", "perpetual"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: per category: venue spelling -> normalized symbol
        self.category_symbols: dict[str, dict[str, str]] = {c: {} for c in CATEGORIES}
        for s in self.symbols:
            self.category_symbols[self.connection_of_symbol(s)][self.venue_symbols[s]] = s
        cats = self.connections()
        self._sole = cats[0] if len(cats) == 1 else ""

    def connection_of_symbol(self, symbol: str) -> str:
        """``spot`` for ``BTC-USDT``, ``linear`` for ``BTC-USDT-PERP``, ``inverse`` for ``BTC-USD-PERP``."""
        if not symbol.endswith("-PERP"):
            return "spot"
        return "inverse" if symbol.split("-")[1] == "USD" else "linear"

    def connection_endpoint(self, endpoint: str, connection: str) -> str:
        """``<base>/v5/public/<category>``."""
        base = endpoint.rstrip("/")
        for cat in CATEGORIES:
            base = base.removesuffix(_PATH + cat)
        return base.removesuffix(_PATH.rstrip("/")) + _PATH + connection

    def connection_of(self, path: str) -> str:
        """``/v5/public/spot`` -> ``spot`` (and linear, inverse); ``""`` for another path."""
        last = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return last if last in CATEGORIES else ""

    def to_venue_symbol(self, symbol: str) -> str:
        """``BTC-USDT`` and ``BTC-USDT-PERP`` -> ``BTCUSDT``; ``BTC-USDC-PERP`` -> ``BTCPERP``."""
        base, quote = symbol.split("-")[:2]
        if symbol.endswith("-PERP") and quote == "USDC":
            return base + "PERP"
        return base + quote

    def normal_symbol(self, venue_symbol: str) -> str:
        """Normalized spelling of ``venue_symbol`` on the connection of the frame being parsed."""
        cat = self.connection or self._sole
        if cat not in self.category_symbols:
            raise InvalidValue(f"bybit: frame of an unknown connection {cat!r} (symbols of several categories)")
        table = self.category_symbols[cat]
        s = table.get(venue_symbol)
        if s is None:
            s = self.from_venue_symbol(venue_symbol)
            if len(table) < 4 * len(self.symbols) + 1024:  # bounded against junk symbols
                table[venue_symbol] = s
        return s

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """On the connection being parsed: spot ``BTCUSDT`` -> ``BTC-USDT``; linear ``BTCUSDT`` ->
        ``BTC-USDT-PERP``, ``BTCPERP`` -> ``BTC-USDC-PERP``; inverse ``BTCUSD`` -> ``BTC-USD-PERP``.
        A symbol that is not a perpetual's spelling (dated futures) stays as the venue spells it."""
        cat = self.connection or self._sole
        if cat == "spot":
            return split_concatenated(venue_symbol, QUOTES) or venue_symbol
        if "-" in venue_symbol:  # linear futures (BTCUSDT-14AUG26)
            return venue_symbol
        if cat == "linear" and venue_symbol.endswith("PERP") and len(venue_symbol) > 4:
            return venue_symbol[:-4] + "-USDC-PERP"
        pair = split_concatenated(venue_symbol, QUOTES)
        return pair + "-PERP" if pair else venue_symbol

    def amount_unit(self, symbol: str) -> AmountUnit:
        """Contracts on inverse perpetuals, base coin otherwise."""
        return "contracts" if self.connection_of_symbol(symbol) == "inverse" else "base"

    def subscribe_messages_for(self, connection: str) -> list[str | bytes]:
        """``publicTrade.<symbol>`` topics of the connection's symbols, at most 10 per request."""
        topics = [f"{_TOPIC}{self.venue_symbols[s]}" for s in self.symbols_on(connection)]
        return [
            json.dumps({"op": "subscribe", "args": topics[i : i + _SUBSCRIBE_CHUNK]}, separators=(",", ":"))
            for i in range(0, len(topics), _SUBSCRIBE_CHUNK)
        ]

    def subscribe_messages(self) -> list[str | bytes]:
        """The subscribe requests of every connection, one after another."""
        return [m for c in self.connections() for m in self.subscribe_messages_for(c)]

    def heartbeat_message(self) -> str | bytes | None:
        """``{"op":"ping"}``."""
        return '{"op":"ping"}'

    def pong_for(self, client_message: str | bytes) -> str | bytes | None:
        """The linear endpoint's answer to a ping."""
        text = client_message.decode() if isinstance(client_message, bytes) else client_message
        if '"op":"ping"' in text.replace(" ", ""):
            return '{"success":true,"ret_msg":"pong","conn_id":"replay","req_id":"","op":"ping"}'
        return None

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """Topic names of a subscribe request (``publicTrade.BTCUSDT``)."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict) or msg.get("op") != "subscribe":
            return set()
        return {str(a) for a in msg.get("args", ())}

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        if payload.startswith(b'{"topic":"publicTrade.'):
            self.trade_frame = True
            return self._trades(_trade_msg(payload), recv_us, batch)
        if payload.startswith(b'{"topic":"'):
            ensure_whole(payload)  # tickers, orderbook, kline, liquidations: nothing to store
            return 0
        msg = loads(payload)  # subscribe results, pongs; any frame in another spelling than the usual
        if isinstance(msg, dict):
            topic = msg.get("topic")
            if isinstance(topic, str) and topic.startswith(_TOPIC):
                self.trade_frame = True
                return self._trades(msgspec.convert(msg, _TradeMsg, strict=False), recv_us, batch)
            if msg.get("success") is False:
                self.log_venue_error(msg)
        return 0

    def _trades(self, m: _TradeMsg, recv_us: int, batch: TradeBatch) -> int:
        if not m.data:
            raise self.no_trades(m.topic[:80])
        n = 0
        emit = self.emit
        for t in m.data:
            n += emit(
                batch, self.normal_symbol(t.s), t.i, t.p, t.v,
                _SIDES.get(t.S, SIDE_UNKNOWN), t.T * 1000, recv_us,
            )
        return n


VENUE = Bybit
