"""Kraken spot trades, WebSocket API v1 and v2.

The API version follows the endpoint: a path ending in ``/v2`` (the default
endpoint) speaks v2, anything else v1; option ``api`` (``"v1"``/``"v2"``)
overrides that.

* Symbols: ``BTC-CHF`` <-> v1 ``XBT/CHF`` (v1 spells BTC ``XBT`` and DOGE
  ``XDG``) and v2 ``BTC/CHF``.
* v1 trade messages are arrays ``[channelID, [[price, volume, time, side,
  orderType, misc], ...], "trade", pair]`` and carry no trade id. The id is
  derived from the trade's own fields and its position ``i`` in the message,
  exactly as the venue sent them::

      trade_id = f"{time}:{i}:{price}:{volume}:{side}"

  so a replay of the same frames yields the same ids (idempotent), and two
  equal fills in one message stay distinct. v1 ids are not sequential: no gap
  detection there.
* v2 ``trade`` channel messages carry ``trade_id`` (consecutive per pair:
  gaps are counted) and an ISO timestamp; the first message is a snapshot of
  recent trades.
* Side: ``b``/``buy`` and ``s``/``sell`` (taker side). Amount: base volume.
* Heartbeat: v1 client ping ``{"event":"ping"}`` -> ``{"event":"pong"}``, v2
  ``{"method":"ping"}`` -> ``{"method":"pong"}``; the server also sends a
  heartbeat message every second when the feed is quiet, so the stale bound is short.
* A trade message (v1 ``[..., "trade", pair]``, v2 ``"channel":"trade"``) that
  yields no trade is a dead letter, whatever its spacing or key order; a v2
  snapshot may be empty (a quiet pair), an update may not. Spot only:
  derivative symbols and the Kraken Futures endpoint are configuration errors.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.errors import ConfigError, InvalidValue
from sensorhub.sources.exchanges.parsing import ensure_whole, iso_to_us, loads
from sensorhub.sources.exchanges.venue import Venue, register_venue

__all__ = ["VENUE", "Kraken", "kraken_time_us", "v1_trade_id"]

_V1_ALIASES = {"BTC": "XBT", "DOGE": "XDG"}
_V1_NAMES = {v: k for k, v in _V1_ALIASES.items()}

# [channelID, [[price, volume, time, side, orderType, misc], ...], "trade", pair]
_v1_trade_msg = msgspec.json.Decoder(tuple[int, list[list[str]], str, str]).decode


class _V2Trade(msgspec.Struct):
    symbol: str
    side: str
    price: float
    qty: float
    trade_id: int
    timestamp: str


class _V2Msg(msgspec.Struct):
    data: list[_V2Trade]
    type: str = "update"


_v2_trade_msg = msgspec.json.Decoder(_V2Msg).decode
_SIDES = {"b": SIDE_BUY, "s": SIDE_SELL, "buy": SIDE_BUY, "sell": SIDE_SELL}


def kraken_time_us(text: str) -> int:
    """Kraken v1 ``"1618678142.557535"`` (seconds, decimal) -> µs, without float rounding."""
    sec, _, frac = text.partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        raise InvalidValue(f"kraken time {text!r}")
    return int(sec) * 1_000_000 + int((frac + "000000")[:6])


def v1_trade_id(entry: list[str], i: int) -> str:
    """The derived id of the ``i``-th trade of a v1 message (see the module docstring)."""
    return f"{entry[2]}:{i}:{entry[0]}:{entry[1]}:{entry[3]}"


@register_venue
class Kraken(Venue):
    """Kraken spot trades (v1 or v2)."""

    name = "kraken"
    endpoint = "wss://ws.kraken.com/v2"
    heartbeat_s = 30.0
    stale_after_s = 30.0
    sequential_ids = True  # v2 only; v1 trades pass no sequence number
    options: ClassVar[dict[str, Any]] = {"api": None}
    derivative_hosts = ("futures.kraken.com", "demo-futures.kraken.com")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.api = "v2"
        super().__init__(*args, **kwargs)
        api = self.opts["api"]
        if api not in (None, "v1", "v2"):
            raise ConfigError("sources.kraken.options.api", "v1 or v2", api)
        self._api_option = api

    def url(self, endpoint: str) -> str:
        """The endpoint; also settles the API version from its path unless configured."""
        api = self._api_option or ("v2" if endpoint.rstrip("/").endswith("/v2") else "v1")
        if api != self.api:
            self.api = api
            self.venue_symbols = {s: self.to_venue_symbol(s) for s in self.symbols}
            self.normal_symbols = {v: s for s, v in self.venue_symbols.items()}
        return endpoint

    def to_venue_symbol(self, symbol: str) -> str:
        """``BTC-CHF`` -> ``XBT/CHF`` (v1) or ``BTC/CHF`` (v2)."""
        parts = symbol.split("-")
        if self.api == "v1":
            parts = [_V1_ALIASES.get(p, p) for p in parts]
        return "/".join(parts)

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``XBT/CHF`` or ``BTC/CHF`` -> ``BTC-CHF``."""
        return "-".join(_V1_NAMES.get(p, p) for p in venue_symbol.split("/"))

    def subscribe_messages(self) -> list[str | bytes]:
        """One ``trade`` subscription for every pair."""
        pairs = [self.venue_symbols[s] for s in self.symbols]
        if self.api == "v1":
            msg: dict[str, Any] = {"event": "subscribe", "pair": pairs, "subscription": {"name": "trade"}}
        else:
            msg = {"method": "subscribe", "params": {"channel": "trade", "symbol": pairs, "snapshot": True}}
        return [json.dumps(msg, separators=(",", ":"))]

    def heartbeat_message(self) -> str | bytes | None:
        """``{"event":"ping"}`` (v1) or ``{"method":"ping"}`` (v2)."""
        return '{"event":"ping"}' if self.api == "v1" else '{"method":"ping"}'

    def pong_for(self, client_message: str | bytes) -> str | bytes | None:
        """The server's answer to either ping."""
        text = client_message.decode() if isinstance(client_message, bytes) else client_message
        if text.replace(" ", "") == '{"event":"ping"}':
            return '{"event":"pong"}'
        if text.replace(" ", "") == '{"method":"ping"}':
            return '{"method":"pong"}'
        return None

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """``trade:BTC-CHF`` keys of a v1 or v2 subscribe request."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict):
            return set()
        if msg.get("event") == "subscribe":
            name = (msg.get("subscription") or {}).get("name")
            return {f"{name}:{self.from_venue_symbol(p)}" for p in msg.get("pair", ())}
        if msg.get("method") == "subscribe":
            params = msg.get("params") or {}
            return {f"{params.get('channel')}:{self.from_venue_symbol(p)}" for p in params.get("symbol", ())}
        return set()

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        if payload[:1] == b"[":
            if b',"trade","' in payload[-64:]:
                self.trade_frame = True
                return self._v1(*_v1_trade_msg(payload), recv_us, batch)
            if b'"trade"' not in payload[-80:]:
                ensure_whole(payload)  # ticker, book, spread, ohlc: nothing to store
                return 0
            arr = loads(payload)  # in another spacing than the usual
            if isinstance(arr, list) and "trade" in arr[2:]:
                self.trade_frame = True
                return self._v1(*msgspec.convert(arr, tuple[int, list[list[str]], str, str]), recv_us, batch)
            return 0
        head = payload[:32]
        if head.startswith(b'{"channel":"trade",'):
            self.trade_frame = True
            return self._v2(_v2_trade_msg(payload), recv_us, batch)
        if payload.startswith((b'{"event":"heartbeat"', b'{"channel":"')):
            ensure_whole(payload)
            return 0
        msg = loads(payload)  # systemStatus, subscriptionStatus, pong, method results; other spellings
        if isinstance(msg, dict):
            if msg.get("channel") == "trade":
                self.trade_frame = True
                return self._v2(msgspec.convert(msg, _V2Msg), recv_us, batch)
            if msg.get("status") == "error" or msg.get("success") is False:
                self.log_venue_error(msg)
        return 0

    def _v1(self, _chan: int, trades: list[list[str]], _name: str, pair: str, recv_us: int, batch: TradeBatch) -> int:
        if not trades:
            raise self.no_trades(pair[:40])
        symbol = self.normal_symbol(pair)
        n = 0
        emit = self.emit
        for i, e in enumerate(trades):
            if len(e) < 4:
                raise InvalidValue(f"entry {e!r:.120} has fewer than 4 fields (price, volume, time, side)")
            n += emit(
                batch, symbol, v1_trade_id(e, i), float(e[0]), float(e[1]),
                _SIDES.get(e[3], SIDE_UNKNOWN), kraken_time_us(e[2]), recv_us,
            )
        return n

    def _v2(self, m: _V2Msg, recv_us: int, batch: TradeBatch) -> int:
        if not m.data and m.type != "snapshot":
            raise self.no_trades(f"an empty {m.type[:20]}")
        n = 0
        emit = self.emit
        for t in m.data:
            n += emit(
                batch, self.normal_symbol(t.symbol), str(t.trade_id), t.price, t.qty,
                _SIDES.get(t.side, SIDE_UNKNOWN), iso_to_us(t.timestamp), recv_us, t.trade_id,
            )
        return n


VENUE = Kraken
