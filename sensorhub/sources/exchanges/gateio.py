"""Gate spot WebSocket v4 ``spot.trades`` channel.

* Symbols: ``BTC-USDT`` <-> ``BTC_USDT``.
* Subscription: ``{"time":<s>,"channel":"spot.trades","event":"subscribe","payload":[pairs]}``.
* Each ``"event":"update"`` message carries one trade in ``result``: ``id``
  (unique on the venue, not consecutive per pair: no gap detection),
  ``side`` (the taker side), ``amount`` (base currency), ``price``, and
  ``create_time_ms``, milliseconds as a decimal string with a fraction
  (``"1619093543708.2642"``), read exactly to the µs.
* Heartbeat: the client sends ``{"time":<s>,"channel":"spot.ping"}`` every
  15 s; the server answers on channel ``spot.pong``.
* A ``spot.trades`` update that yields no trade is a dead letter, whatever its
  key order or spacing; subscribe results on that channel are not. Spot only:
  derivative symbols and Gate's futures endpoint (``fx-ws.gateio.ws``, whose
  contracts are spelled like spot pairs) are configuration errors.
"""

from __future__ import annotations

import json
import time

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.errors import InvalidValue
from sensorhub.sources.exchanges.parsing import ensure_whole, loads
from sensorhub.sources.exchanges.venue import Venue, register_venue

__all__ = ["VENUE", "GateIo", "gate_ms_to_us"]


class _Trade(msgspec.Struct):
    id: int
    currency_pair: str
    side: str
    amount: float
    price: float
    create_time_ms: str | float


class _TradeMsg(msgspec.Struct):
    result: _Trade


# strict=False: amounts and prices are decimal strings.
_trade_msg = msgspec.json.Decoder(_TradeMsg, strict=False).decode
_SIDES = {"buy": SIDE_BUY, "sell": SIDE_SELL}


def gate_ms_to_us(value: str | float) -> int:
    """``"1619093543708.2642"`` (ms, decimal string) -> µs, without float rounding; a number is accepted too."""
    text = value if isinstance(value, str) else repr(float(value))
    ms, _, frac = text.partition(".")
    if not ms.isdigit() or (frac and not frac.isdigit()):
        raise InvalidValue(f"gate create_time_ms {value!r}")
    return int(ms) * 1000 + int((frac + "000")[:3])


@register_venue
class GateIo(Venue):
    """Gate spot trades."""

    name = "gateio"
    endpoint = "wss://api.gateio.ws/ws/v4/"
    heartbeat_s = 15.0
    stale_after_s = 60.0
    sequential_ids = False
    derivative_hosts = ("fx-ws.gateio.ws", "fx-ws-testnet.gateio.ws")

    def to_venue_symbol(self, symbol: str) -> str:
        """``BTC-USDT`` -> ``BTC_USDT``."""
        return symbol.replace("-", "_")

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``BTC_USDT`` -> ``BTC-USDT``."""
        return venue_symbol.replace("_", "-")

    def subscribe_messages(self) -> list[str | bytes]:
        """One ``spot.trades`` subscription for every pair."""
        pairs = [self.venue_symbols[s] for s in self.symbols]
        return [json.dumps({"time": int(time.time()), "channel": "spot.trades", "event": "subscribe", "payload": pairs},
                           separators=(",", ":"))]

    def heartbeat_message(self) -> str | bytes | None:
        """``{"time":<s>,"channel":"spot.ping"}``."""
        return json.dumps({"time": int(time.time()), "channel": "spot.ping"}, separators=(",", ":"))

    def pong_for(self, client_message: str | bytes) -> str | bytes | None:
        """The server's ``spot.pong``."""
        text = client_message.decode() if isinstance(client_message, bytes) else client_message
        if '"channel":"spot.ping"' not in text.replace(" ", ""):
            return None
        return json.dumps({"time": int(time.time()), "channel": "spot.pong", "event": "", "error": None, "result": None},
                          separators=(",", ":"))

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """``spot.trades:BTC-USDT`` keys of a ``spot.trades`` subscribe request."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict) or msg.get("event") != "subscribe" or msg.get("channel") != "spot.trades":
            return set()
        return {f"spot.trades:{self.normal_symbol(str(p))}" for p in msg.get("payload", ())}

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        head = payload[:96].replace(b" ", b"")
        if b'"channel":"spot.trades","event":"update"' in head or (
            b'"spot.trades"' in head and b'"event":"update"' in head
        ):
            self.trade_frame = True
            return self._trade(_trade_msg(payload).result, recv_us, batch)
        if b'"event":"update"' in head and b'"spot.trades"' not in payload:
            ensure_whole(payload)  # books, candles, tickers: nothing to store
            return 0
        msg = loads(payload)  # subscribe results, pongs; any update in another key order
        if isinstance(msg, dict):
            if msg.get("channel") == "spot.trades" and msg.get("event") == "update":
                self.trade_frame = True
                return self._trade(msgspec.convert(msg, _TradeMsg, strict=False).result, recv_us, batch)
            result = msg.get("result")
            if msg.get("error") or (isinstance(result, dict) and result.get("status") == "fail"):
                self.log_venue_error(msg)
        return 0

    def _trade(self, t: _Trade, recv_us: int, batch: TradeBatch) -> int:
        return self.emit(
            batch, self.normal_symbol(t.currency_pair), str(t.id), t.price, t.amount,
            _SIDES.get(t.side, SIDE_UNKNOWN), gate_ms_to_us(t.create_time_ms), recv_us,
        )


VENUE = GateIo
