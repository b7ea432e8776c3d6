"""Bitstamp WebSocket v2 ``live_trades_<pair>`` channels.

* Symbols: ``ETH-USD`` <-> ``ethusd`` (the pair inside the channel name).
* Subscription: ``{"event":"bts:subscribe","data":{"channel":"live_trades_ethusd"}}``
  per pair; the server confirms with ``bts:subscription_succeeded``.
* Trade messages: ``{"data":{"id", "amount", "price", "type", "microtimestamp",
  ...}, "channel":"live_trades_<pair>", "event":"trade"}``. ``id`` is unique
  on the venue (not consecutive per pair: no gap detection). ``type`` 0 means
  the taker bought, 1 that the taker sold. Amount in base currency. Time:
  ``microtimestamp`` (µs, as a string).
* Heartbeat: the client sends ``{"event":"bts:heartbeat"}`` every 20 s; the
  server answers ``{"event":"bts:heartbeat","channel":"","data":{"status":"success"}}``.
* ``{"event":"bts:request_reconnect"}``: the server is about to go away and
  asks the client to reconnect; the source does so at once and resubscribes.
* A ``"event":"trade"`` message that yields no trade (a field of the wrong
  type or missing, a channel that is not ``live_trades_<pair>``) is a dead
  letter, whatever its key order or spacing.
"""

from __future__ import annotations

import json

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.errors import InvalidValue
from sensorhub.sources.exchanges.parsing import ensure_whole, loads, split_concatenated
from sensorhub.sources.exchanges.venue import Venue, register_venue

__all__ = ["VENUE", "Bitstamp"]

QUOTES = ("USDT", "USDC", "PAX", "USD", "EUR", "GBP", "BTC", "ETH")
_TRADE_CHANNEL = "live_trades_"


class _Trade(msgspec.Struct):
    id: int
    amount: float
    price: float
    type: int
    microtimestamp: int


class _TradeMsg(msgspec.Struct):
    data: _Trade
    channel: str


# strict=False: ``microtimestamp`` arrives as a decimal string.
_trade_msg = msgspec.json.Decoder(_TradeMsg, strict=False).decode
_SIDES = {0: SIDE_BUY, 1: SIDE_SELL}


@register_venue
class Bitstamp(Venue):
    """Bitstamp v2 trades."""

    name = "bitstamp"
    endpoint = "wss://ws.bitstamp.net"
    heartbeat_s = 20.0
    stale_after_s = 60.0
    sequential_ids = False
    honours_reconnect_requests = True

    def to_venue_symbol(self, symbol: str) -> str:
        """``ETH-USD`` -> ``ethusd``."""
        return symbol.replace("-", "").lower()

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``ethusd`` -> ``ETH-USD`` when a known quote currency ends it."""
        upper = venue_symbol.upper()
        return split_concatenated(upper, QUOTES) or upper

    def subscribe_messages(self) -> list[str | bytes]:
        """One ``bts:subscribe`` per pair's ``live_trades`` channel."""
        return [
            json.dumps({"event": "bts:subscribe", "data": {"channel": _TRADE_CHANNEL + self.venue_symbols[s]}},
                       separators=(",", ":"))
            for s in self.symbols
        ]

    def heartbeat_message(self) -> str | bytes | None:
        """``{"event":"bts:heartbeat"}``."""
        return '{"event":"bts:heartbeat"}'

    def pong_for(self, client_message: str | bytes) -> str | bytes | None:
        """The server's answer to a heartbeat."""
        text = client_message.decode() if isinstance(client_message, bytes) else client_message
        if text.replace(" ", "") == '{"event":"bts:heartbeat"}':
            return '{"event":"bts:heartbeat","channel":"","data":{"status":"success"}}'
        return None

    def is_reconnect_request(self, payload: bytes) -> bool:
        """``{"event":"bts:request_reconnect",...}``."""
        return b'"bts:request_reconnect"' in payload[:64]

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """``live_trades:ETH-USD`` keys of a subscribe request."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict) or msg.get("event") != "bts:subscribe":
            return set()
        channel = str((msg.get("data") or {}).get("channel", ""))
        kind, _, pair = channel.rpartition("_")
        return {f"{kind}:{self.normal_symbol(pair)}"}

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        tail = payload[-24:]
        if tail.endswith(b'"event":"trade"}') or payload.startswith(b'{"event":"trade"'):
            return self._trade(payload, recv_us, batch)
        if tail.endswith(b'"event":"data"}'):
            ensure_whole(payload)  # order-book diffs: nothing to store
            return 0
        msg = loads(payload)  # subscription results, heartbeats, reconnect requests, errors
        if isinstance(msg, dict):
            event = msg.get("event")
            if event == "trade":  # keys in another order than the venue's usual one
                return self._trade(payload, recv_us, batch)
            if event == "bts:error":
                self.log_venue_error(msg)
        return 0

    def _trade(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        self.trade_frame = True
        m = _trade_msg(payload)
        t = m.data
        if not m.channel.startswith(_TRADE_CHANNEL):
            raise InvalidValue(f"a trade event on channel {m.channel[:60]!r}, not {_TRADE_CHANNEL}<pair>")
        return self.emit(
            batch, self.normal_symbol(m.channel[len(_TRADE_CHANNEL):]), str(t.id), t.price, t.amount,
            _SIDES.get(t.type, SIDE_UNKNOWN), t.microtimestamp, recv_us,
        )


VENUE = Bitstamp
