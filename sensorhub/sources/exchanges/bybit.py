"""Bybit v5 public ``publicTrade.<symbol>`` topics (spot, linear and inverse).

* One endpoint per product category: ``/v5/public/spot`` for ``BASE-QUOTE``
  symbols, ``/v5/public/linear`` for USDT/USDC perpetuals
  (``BTC-USDT-PERP``), ``/v5/public/inverse`` for coin-margined perpetuals
  (``BTC-USD-PERP``). A source serves one category: configure a second
  source for another.
* Venue spelling: ``BTCUSDT`` for all of them.
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

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.errors import ConfigError
from sensorhub.sources.exchanges.base import (
    AmountUnit,
    Venue,
    ensure_whole,
    loads,
    register_venue,
    split_concatenated,
)

__all__ = ["VENUE", "Bybit"]

QUOTES = ("USDT", "USDC", "USDE", "EUR", "BTC", "ETH", "DAI", "USD", "BRL")
_BASE = "wss://stream.bybit.com/v5/public/"
_SUBSCRIBE_CHUNK = 10  # Bybit accepts at most 10 topics per spot subscribe request


class _Trade(msgspec.Struct):
    T: int
    s: str
    S: str
    v: float
    p: float
    i: str


class _TradeMsg(msgspec.Struct):
    data: list[_Trade]


_trade_msg = msgspec.json.Decoder(_TradeMsg, strict=False).decode
_SIDES = {"Buy": SIDE_BUY, "Sell": SIDE_SELL}


@register_venue
class Bybit(Venue):
    """Bybit v5 trades."""

    name = "bybit"
    endpoint = _BASE + "linear"
    heartbeat_s = 20.0
    stale_after_s = 60.0
    sequential_ids = False

    def default_endpoint(self) -> str:
        """The category endpoint the configured symbols need (one category per source)."""
        cats = {self._category(s) for s in self.symbols}
        if len(cats) != 1:
            raise ConfigError(
                "sources.bybit.symbols", "symbols of one category (spot, linear or inverse perpetuals)", sorted(cats)
            )
        return _BASE + cats.pop()

    @staticmethod
    def _category(symbol: str) -> str:
        if not symbol.endswith("-PERP"):
            return "spot"
        return "inverse" if symbol.split("-")[1] == "USD" else "linear"

    def to_venue_symbol(self, symbol: str) -> str:
        """``BTC-USDT-PERP`` and ``BTC-USDT`` -> ``BTCUSDT``."""
        return symbol.removesuffix("-PERP").replace("-", "")

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``BTCUSDT`` -> ``BTC-USDT-PERP`` on a perpetual feed, ``BTC-USDT`` on spot."""
        pair = split_concatenated(venue_symbol, QUOTES) or venue_symbol
        return pair + "-PERP" if any(s.endswith("-PERP") for s in self.symbols) else pair

    def amount_unit(self, symbol: str) -> AmountUnit:
        """Contracts on inverse perpetuals, base coin otherwise."""
        return "contracts" if self._category(symbol) == "inverse" else "base"

    def subscribe_messages(self) -> list[str | bytes]:
        """``publicTrade.<symbol>`` topics, at most 10 per request."""
        topics = [f"publicTrade.{self.venue_symbols[s]}" for s in self.symbols]
        return [
            json.dumps({"op": "subscribe", "args": topics[i : i + _SUBSCRIBE_CHUNK]}, separators=(",", ":"))
            for i in range(0, len(topics), _SUBSCRIBE_CHUNK)
        ]

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
            n = 0
            emit = self.emit
            for t in _trade_msg(payload).data:
                n += emit(
                    batch, self.normal_symbol(t.s), t.i, t.p, t.v,
                    _SIDES.get(t.S, SIDE_UNKNOWN), t.T * 1000, recv_us,
                )
            return n
        if payload.startswith(b'{"topic":"'):
            ensure_whole(payload)  # tickers, orderbook, kline, liquidations: nothing to store
            return 0
        msg = loads(payload)  # subscribe results, pongs
        if isinstance(msg, dict) and msg.get("success") is False:
            self.log_venue_error(msg)
        return 0


VENUE = Bybit
