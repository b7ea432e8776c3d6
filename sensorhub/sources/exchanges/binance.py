"""Binance spot: the ``trade`` or ``aggTrade`` streams over one combined-stream connection.

* Spot only. Binance's derivatives streams (``fstream``/``dstream``) spell a
  perpetual like the spot pair (``BTCUSDT``), so reading them here would store
  perpetual trades under the spot symbol: such an endpoint, and derivative
  symbols (``-PERP``, ``-YYMMDD``), are configuration errors.
* Subscription is in the URL: ``/stream?streams=btcusdt@trade/...``; messages
  arrive wrapped as ``{"stream": ..., "data": {...}}`` (raw ``{"e": ...}``
  events from a ``/ws/`` URL are accepted too).
* Option ``stream``: ``"trade"`` (default, every fill, id ``t``) or
  ``"aggTrade"`` (fills of one taker order at one price, id ``a``). Aggregate
  ids are stored as ``a<id>`` so that they can never collide with trade ids
  of the same symbol. Both are consecutive per symbol: gaps are counted.
* Side: ``m`` (buyer is maker) true means the taker sold.
* Amount: base quantity (``q``). Time: trade time ``T`` (ms).
* Heartbeat: the server sends WebSocket pings (answered by the library); no
  application ping. Thin symbols may be silent for minutes, so the stale
  bound is long; a dead TCP peer is caught by the WebSocket keepalive.
* A frame of a trade stream (``<sym>@trade``/``@aggTrade``, or a raw
  ``"e":"trade"``/``"aggTrade"`` event) that yields no trade is a dead letter,
  whatever its key order or spacing.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, TradeBatch
from sensorhub.errors import ConfigError
from sensorhub.sources.exchanges.parsing import ensure_whole, loads, split_concatenated
from sensorhub.sources.exchanges.venue import Venue, register_venue

__all__ = ["VENUE", "Binance"]

#: Quote currencies for splitting ``NKNUSDT`` when a symbol was not configured (longest first).
QUOTES = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BIDR", "IDRT", "TRY", "EUR", "GBP", "BRL", "BTC", "ETH", "BNB",
          "AUD", "RUB", "UAH", "NGN", "DAI", "JPY", "PAX", "XRP", "DOT")


class _AggTrade(msgspec.Struct):
    s: str
    a: int
    p: float
    q: float
    T: int
    m: bool


class _Trade(msgspec.Struct):
    s: str
    t: int
    p: float
    q: float
    T: int
    m: bool


class _AggMsg(msgspec.Struct):
    data: _AggTrade


class _TradeMsg(msgspec.Struct):
    data: _Trade


# strict=False: Binance sends prices and sizes as decimal strings.
_agg_msg = msgspec.json.Decoder(_AggMsg, strict=False).decode
_trade_msg = msgspec.json.Decoder(_TradeMsg, strict=False).decode
_agg_raw = msgspec.json.Decoder(_AggTrade, strict=False).decode
_trade_raw = msgspec.json.Decoder(_Trade, strict=False).decode


@register_venue
class Binance(Venue):
    """Binance spot trades."""

    name = "binance"
    endpoint = "wss://stream.binance.com:9443"
    heartbeat_s = None
    stale_after_s = 600.0
    sequential_ids = True
    options: ClassVar[dict[str, Any]] = {"stream": "trade"}
    derivative_hosts = ("fstream.binance.com", "dstream.binance.com", "fstream-auth.binance.com",
                        "testnet.binancefuture.com")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = str(self.opts["stream"])
        if self.stream not in ("trade", "aggTrade"):
            raise ConfigError("sources.binance.options.stream", "trade or aggTrade", self.stream)

    def to_venue_symbol(self, symbol: str) -> str:
        """``NKN-USDT`` -> ``NKNUSDT``."""
        return symbol.replace("-", "")

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``NKNUSDT`` -> ``NKN-USDT`` when a known quote currency ends it."""
        return split_concatenated(venue_symbol, QUOTES) or venue_symbol

    def url(self, endpoint: str) -> str:
        """Combined-stream URL naming every symbol's trade stream."""
        base = endpoint.rstrip("/")
        for suffix in ("/stream", "/ws"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        streams = "/".join(f"{self.venue_symbols[s].lower()}@{self.stream}" for s in self.symbols)
        return f"{base}/stream?streams={streams}"

    def url_subscription_keys(self, path: str) -> set[str]:
        """``aggTrade:NKN-USDT`` / ``trade:NKN-USDT`` keys of the trade streams named in a combined-stream URL."""
        qs = parse_qs(urlsplit(path).query).get("streams", [""])[0]
        keys = set()
        for st in qs.split("/"):
            sym, _, kind = st.partition("@")
            if kind in ("trade", "aggTrade") and sym:
                keys.add(f"{kind}:{self.normal_symbol(sym.upper())}")
        return keys

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        head = payload[:64]
        if head.startswith(b'{"stream":"'):
            if b'@aggTrade"' in head:
                self.trade_frame = True
                return self._agg(_agg_msg(payload).data, recv_us, batch)
            if b'@trade"' in head:
                self.trade_frame = True
                return self._trade(_trade_msg(payload).data, recv_us, batch)
            ensure_whole(payload)  # depth, bookTicker, kline...: nothing to store
            return 0
        if head.startswith(b'{"e":"aggTrade"'):
            self.trade_frame = True
            return self._agg(_agg_raw(payload), recv_us, batch)
        if head.startswith(b'{"e":"trade"'):
            self.trade_frame = True
            return self._trade(_trade_raw(payload), recv_us, batch)
        msg = loads(payload)  # subscription results, errors, other events; any frame in another spelling
        if not isinstance(msg, dict):
            return 0
        stream, event = msg.get("stream"), msg.get("e")
        if isinstance(stream, str):
            if stream.endswith("@aggTrade"):
                self.trade_frame = True
                return self._agg(msgspec.convert(msg, _AggMsg, strict=False).data, recv_us, batch)
            if stream.endswith("@trade"):
                self.trade_frame = True
                return self._trade(msgspec.convert(msg, _TradeMsg, strict=False).data, recv_us, batch)
        elif event == "aggTrade":
            self.trade_frame = True
            return self._agg(msgspec.convert(msg, _AggTrade, strict=False), recv_us, batch)
        elif event == "trade":
            self.trade_frame = True
            return self._trade(msgspec.convert(msg, _Trade, strict=False), recv_us, batch)
        if "error" in msg:
            self.log_venue_error(msg)
        return 0

    def _agg(self, a: _AggTrade, recv_us: int, batch: TradeBatch) -> int:
        return self.emit(
            batch, self.normal_symbol(a.s), f"a{a.a}", a.p, a.q, SIDE_SELL if a.m else SIDE_BUY, a.T * 1000, recv_us, a.a,
        )

    def _trade(self, t: _Trade, recv_us: int, batch: TradeBatch) -> int:
        return self.emit(
            batch, self.normal_symbol(t.s), str(t.t), t.p, t.q, SIDE_SELL if t.m else SIDE_BUY, t.T * 1000, recv_us, t.t,
        )


VENUE = Binance
