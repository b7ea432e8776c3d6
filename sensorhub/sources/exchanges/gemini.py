"""Gemini market data v2: trades of the ``l2`` subscription.

* Symbols: ``BTC-USD`` <-> ``BTCUSD``; perpetuals ``BTC-USDC-PERP`` <-> ``BTCUSDCPERP``.
* Subscription: ``{"type":"subscribe","subscriptions":[{"name":"l2","symbols":[...]}]}``.
  The ``l2`` feed carries book and trades together (there is no trades-only
  feed): the first ``l2_updates`` message of each symbol holds the book and
  up to 100 recent trades in its ``trades`` array; later trades arrive as
  separate ``{"type":"trade",...}`` messages. After a reconnect the first
  message repeats recent trades; the recent-id set drops them.
* Trade ids ``tid`` are unique on the venue but not consecutive per symbol:
  no gap detection. Side: ``side`` is the taker side. Amount: ``quantity`` in
  base currency (contracts of one unit on perpetuals). Time: ``timestamp`` (ms).
* Heartbeat: no application ping; book updates keep the feed busy and a dead
  peer is caught by the WebSocket keepalive.
* A ``trade`` message, or an ``l2_updates`` message with a ``trades`` array,
  whose trades do not decode is a dead letter, whatever its key order or spacing.
"""

from __future__ import annotations

import json

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.errors import InvalidValue
from sensorhub.sources.exchanges.parsing import ensure_whole, loads, split_concatenated
from sensorhub.sources.exchanges.venue import Venue, register_venue

__all__ = ["VENUE", "Gemini"]

QUOTES = ("GUSD", "USDT", "USDC", "RLUSD", "USD", "EUR", "GBP", "SGD", "AUD", "BTC", "ETH", "DAI")


class _Trade(msgspec.Struct):
    tid: int
    price: float
    quantity: float
    side: str
    timestamp: int
    symbol: str = ""


class _L2Msg(msgspec.Struct):
    symbol: str
    trades: list[_Trade] = []


# strict=False: prices and quantities are decimal strings.
_l2_msg = msgspec.json.Decoder(_L2Msg, strict=False).decode
_trade_msg = msgspec.json.Decoder(_Trade, strict=False).decode
_SIDES = {"buy": SIDE_BUY, "sell": SIDE_SELL}


@register_venue
class Gemini(Venue):
    """Gemini v2 trades."""

    name = "gemini"
    endpoint = "wss://api.gemini.com/v2/marketdata"
    heartbeat_s = None
    stale_after_s = 60.0
    sequential_ids = False
    instrument_kinds = frozenset({"spot", "perpetual"})

    def to_venue_symbol(self, symbol: str) -> str:
        """``BTC-USD`` -> ``BTCUSD``, ``BTC-USDC-PERP`` -> ``BTCUSDCPERP``."""
        return symbol.replace("-", "")

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``BTCUSD`` -> ``BTC-USD``, ``BTCUSDCPERP`` -> ``BTC-USDC-PERP``."""
        perp = venue_symbol.endswith("PERP")
        pair = venue_symbol[:-4] if perp else venue_symbol
        pair = split_concatenated(pair, QUOTES) or pair
        return pair + "-PERP" if perp else pair

    def subscribe_messages(self) -> list[str | bytes]:
        """One ``l2`` subscription for every symbol (it carries the trades)."""
        syms = [self.venue_symbols[s] for s in self.symbols]
        return [json.dumps({"type": "subscribe", "subscriptions": [{"name": "l2", "symbols": syms}]},
                           separators=(",", ":"))]

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """``l2:BTC-USD`` keys of a subscribe request."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict) or msg.get("type") != "subscribe":
            return set()
        return {
            f"{sub.get('name')}:{self.normal_symbol(str(sym))}"
            for sub in msg.get("subscriptions", ())
            if isinstance(sub, dict)
            for sym in sub.get("symbols", ())
        }

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        if payload.startswith(b'{"type":"l2_updates"') or b'"l2_updates"' in payload[-32:]:
            if b'"trades"' not in payload:
                ensure_whole(payload)  # a book update: nothing to store
                return 0
            self.trade_frame = True
            return self._l2(_l2_msg(payload), recv_us, batch)
        if payload.startswith(b'{"type":"trade"'):
            self.trade_frame = True
            return self._trade(_trade_msg(payload), recv_us, batch)
        msg = loads(payload)  # candles, auction events, heartbeats, errors; other spellings
        if isinstance(msg, dict):
            kind = msg.get("type")
            if kind == "trade":
                self.trade_frame = True
                return self._trade(msgspec.convert(msg, _Trade, strict=False), recv_us, batch)
            if kind == "l2_updates":
                if "trades" not in msg:
                    return 0
                self.trade_frame = True
                return self._l2(msgspec.convert(msg, _L2Msg, strict=False), recv_us, batch)
            if msg.get("result") == "error" or kind == "error":
                self.log_venue_error(msg)
        return 0

    def _l2(self, m: _L2Msg, recv_us: int, batch: TradeBatch) -> int:
        symbol = self.normal_symbol(m.symbol)
        n = 0
        emit = self.emit
        for t in m.trades:
            n += emit(batch, symbol, str(t.tid), t.price, t.quantity, _SIDES.get(t.side, SIDE_UNKNOWN),
                      t.timestamp * 1000, recv_us)
        return n

    def _trade(self, t: _Trade, recv_us: int, batch: TradeBatch) -> int:
        if not t.symbol:
            raise InvalidValue("a trade message without a symbol")
        return self.emit(
            batch, self.normal_symbol(t.symbol), str(t.tid), t.price, t.quantity,
            _SIDES.get(t.side, SIDE_UNKNOWN), t.timestamp * 1000, recv_us,
        )


VENUE = Gemini
