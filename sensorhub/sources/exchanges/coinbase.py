"""Coinbase Advanced Trade ``market_trades`` channel.

* Symbols: Coinbase product ids are already ``BASE-QUOTE``.
* A subscription first sends an event of type ``snapshot`` holding recent
  trades from before it, then ``update`` events. After a reconnect the
  snapshot repeats trades already stored; the recent-id set drops them and
  the store's ReplacingMergeTree key would absorb any that slip past it.
* Trade ids are consecutive per product (listed newest first within a
  message): gaps are counted. Side: ``side`` as Coinbase reports it.
* Amount: ``size`` in base currency. Time: ``time`` (ISO 8601, µs).
* Heartbeat: the ``heartbeats`` channel (one message a second) keeps the
  connection open and proves the feed alive; no client ping.
* A ``market_trades`` message without events, or with an event that has no
  ``trades`` list, is a dead letter (whatever its key order or spacing); a
  snapshot event with an empty list is not (a quiet product has no recent trades).
"""

from __future__ import annotations

import json

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.sources.exchanges.parsing import ensure_whole, iso_to_us, loads
from sensorhub.sources.exchanges.venue import Venue, register_venue

__all__ = ["VENUE", "Coinbase"]


class _Trade(msgspec.Struct):
    product_id: str
    trade_id: str
    price: float
    size: float
    time: str
    side: str


class _Event(msgspec.Struct):
    trades: list[_Trade]


class _TradesMsg(msgspec.Struct):
    events: list[_Event]


_trades_msg = msgspec.json.Decoder(_TradesMsg, strict=False).decode
_SIDES = {"BUY": SIDE_BUY, "SELL": SIDE_SELL}


@register_venue
class Coinbase(Venue):
    """Coinbase Advanced Trade trades."""

    name = "coinbase"
    endpoint = "wss://advanced-trade-ws.coinbase.com"
    heartbeat_s = None
    stale_after_s = 30.0
    sequential_ids = True

    def to_venue_symbol(self, symbol: str) -> str:
        """Product ids are spelled like normalized symbols."""
        return symbol

    def subscribe_messages(self) -> list[str | bytes]:
        """``market_trades`` and ``heartbeats`` for every product."""
        products = [self.venue_symbols[s] for s in self.symbols]
        return [
            json.dumps({"type": "subscribe", "product_ids": products, "channel": ch}, separators=(",", ":"))
            for ch in ("market_trades", "heartbeats")
        ]

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """``market_trades:BTC-USD`` keys of a subscribe request."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict) or msg.get("type") != "subscribe":
            return set()
        return {f"{msg.get('channel')}:{p}" for p in msg.get("product_ids", ())}

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        if payload.startswith(b'{"channel":"market_trades"'):
            self.trade_frame = True
            return self._trades(_trades_msg(payload), recv_us, batch)
        if payload.startswith(b'{"channel":"'):
            ensure_whole(payload)  # heartbeats, subscriptions, l2_data, ticker...: nothing to store
            return 0
        msg = loads(payload)  # errors; any frame in another spelling than the usual
        if isinstance(msg, dict):
            if msg.get("channel") == "market_trades":
                self.trade_frame = True
                return self._trades(msgspec.convert(msg, _TradesMsg, strict=False), recv_us, batch)
            if msg.get("type") == "error":
                self.log_venue_error(msg)
        return 0

    def _trades(self, m: _TradesMsg, recv_us: int, batch: TradeBatch) -> int:
        if not m.events:
            raise self.no_trades("no events")
        n = 0
        emit = self.emit
        for ev in m.events:
            for t in ev.trades:
                n += emit(
                    batch, self.normal_symbol(t.product_id), t.trade_id, t.price, t.size,
                    _SIDES.get(t.side, SIDE_UNKNOWN), iso_to_us(t.time), recv_us, int(t.trade_id),
                )
        return n


VENUE = Coinbase
