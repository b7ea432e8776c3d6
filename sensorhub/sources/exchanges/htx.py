"""HTX (formerly Huobi) spot ``market.<symbol>.trade.detail`` channels.

* Every frame the server sends is binary, gzip-compressed JSON. Frames are
  decompressed in the parser (ingest loop) with a bound on the inflated size
  (option ``max_inflated_bytes``); a frame that is not gzip or inflates past
  the bound is a ``DecodeError`` (dead letter).
* Server heartbeat: ``{"ping": n}`` about every 5 s, answered on the network
  thread with ``{"pong": n}`` (the same ``n``); after two missed answers the
  server closes the connection. A gzip ping is about 42 bytes, so only frames
  up to 128 bytes are inflated there to look for one; every other frame goes
  to the ingest loop untouched. The stale bound is 30 s.
* Symbols: ``BTC-USDT`` <-> ``btcusdt``.
* Subscription: ``{"sub":"market.<symbol>.trade.detail","id":"<n>"}`` per symbol.
* Trade messages: ``{"ch":"market.<symbol>.trade.detail","tick":{"data":[{"id",
  "tradeId", "ts", "amount", "price", "direction"}]}}``. Two ids per trade: ``id``
  is an integer longer than 64 bits (``100182534526255757567432481``),
  ``tradeId`` an ordinary integer unique per symbol. **``trade_id`` is
  ``tradeId``** (as a decimal string): it fits every integer type downstream,
  and the venue documents it as the unique trade id. ``id`` is not read at all
  (msgspec skips it without converting it). Not consecutive by contract: no
  gap detection. Side: ``direction`` is the taker side. Amount: base currency.
  Time: ``ts`` (ms).
* A ``trade.detail`` message that yields no trade (no ``tick.data`` list, an
  empty one, a field of the wrong type) is a dead letter, whatever its key
  order or spacing. Spot only: derivative symbols and the HTX derivatives
  endpoints (``api.hbdm.com``) are configuration errors.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, ClassVar

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.errors import ConfigError, InvalidValue, Truncated
from sensorhub.sources.exchanges.parsing import ensure_whole, loads, split_concatenated
from sensorhub.sources.exchanges.venue import Venue, register_venue

__all__ = ["VENUE", "Htx", "inflate"]

QUOTES = ("USDT", "USDC", "USDD", "HUSD", "BTC", "ETH", "HT", "TRX", "EUR")
PING_FRAME_MAX = 128  # gzip of {"ping":1618678073643} is 42 bytes


class _Trade(msgspec.Struct):
    tradeId: int
    ts: int
    amount: float
    price: float
    direction: str


class _Tick(msgspec.Struct):
    data: list[_Trade]


class _TradeMsg(msgspec.Struct):
    ch: str
    tick: _Tick


_trade_msg = msgspec.json.Decoder(_TradeMsg).decode
_SIDES = {"buy": SIDE_BUY, "sell": SIDE_SELL}
_CH_PREFIX = "market."
_CH_SUFFIX = ".trade.detail"


def inflate(payload: bytes, max_bytes: int) -> bytes:
    """gzip -> bytes, refusing more than ``max_bytes`` of output (a bound against gzip bombs)."""
    d = zlib.decompressobj(wbits=31)  # gzip container only
    try:
        out = d.decompress(payload, max_bytes)
    except zlib.error as exc:
        raise InvalidValue(f"htx: not a gzip frame ({exc})") from None
    if d.unconsumed_tail:
        raise InvalidValue(f"htx: frame inflates past {max_bytes} bytes")
    if not d.eof:
        raise Truncated("htx: gzip stream cut short", len(payload))
    return out


@register_venue
class Htx(Venue):
    """HTX spot trades."""

    name = "htx"
    endpoint = "wss://api.huobi.pro/ws"
    heartbeat_s = None
    stale_after_s = 30.0
    sequential_ids = False
    answers_server_pings = True
    options: ClassVar[dict[str, Any]] = {"max_inflated_bytes": 16 * 1024 * 1024}
    derivative_hosts = ("hbdm.com", "hbdm.vn", "btcgateway.pro")  # HTX futures and swaps

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.max_inflated = int(self.opts["max_inflated_bytes"])
        except (TypeError, ValueError):
            raise ConfigError("sources.htx.options.max_inflated_bytes", "a positive integer", self.opts["max_inflated_bytes"]) from None
        if self.max_inflated <= 0:
            raise ConfigError("sources.htx.options.max_inflated_bytes", "a positive integer", self.max_inflated)

    def to_venue_symbol(self, symbol: str) -> str:
        """``BTC-USDT`` -> ``btcusdt``."""
        return symbol.replace("-", "").lower()

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``btcusdt`` -> ``BTC-USDT`` when a known quote currency ends it."""
        upper = venue_symbol.upper()
        return split_concatenated(upper, QUOTES) or upper

    def subscribe_messages(self) -> list[str | bytes]:
        """One ``trade.detail`` subscription per symbol."""
        return [
            json.dumps({"sub": f"{_CH_PREFIX}{self.venue_symbols[s]}{_CH_SUFFIX}", "id": str(i + 1)}, separators=(",", ":"))
            for i, s in enumerate(self.symbols)
        ]

    def server_ping_reply(self, payload: bytes) -> str | bytes | None:
        """``{"ping": n}`` (gzip) -> ``{"pong": n}``; None for every other frame."""
        if len(payload) > PING_FRAME_MAX:
            return None
        try:
            text = inflate(payload, 256)
        except (InvalidValue, Truncated):
            return None  # not a ping; the parser reports the bad frame
        if not text.startswith(b'{"ping"'):
            return None
        msg = loads(text)
        ping = msg.get("ping") if isinstance(msg, dict) else None
        if not isinstance(ping, int):
            return None
        return json.dumps({"pong": ping}, separators=(",", ":"))

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """``market.btcusdt.trade.detail`` keys (symbol normalized: ``trade.detail:BTC-USDT``); pongs ask for nothing."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict) or "sub" not in msg:
            return set()
        ch = str(msg["sub"])
        parts = ch.split(".", 2)
        if len(parts) < 3:
            return {ch}
        return {f"{parts[2]}:{self.normal_symbol(parts[1])}"}

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        text = inflate(payload, self.max_inflated) if payload[:2] == b"\x1f\x8b" else payload
        head = text[:64]
        if head.startswith(b'{"ch":"market.'):
            if _CH_SUFFIX.encode() + b'"' not in head:
                ensure_whole(text)  # depth and other channels: nothing to store
                return 0
            return self._trades(text, recv_us, batch)
        msg = loads(text)  # sub acks, pings (normally answered before this), errors
        if isinstance(msg, dict):
            if str(msg.get("ch", "")).endswith(_CH_SUFFIX):  # keys in another order than usual
                return self._trades(text, recv_us, batch)
            if msg.get("status") == "error":
                self.log_venue_error(msg)
        return 0

    def _trades(self, text: bytes, recv_us: int, batch: TradeBatch) -> int:
        self.trade_frame = True
        m = _trade_msg(text)
        if not m.ch.startswith(_CH_PREFIX) or not m.ch.endswith(_CH_SUFFIX):
            raise InvalidValue(f"channel {m.ch[:80]!r} is not market.<symbol>.trade.detail")
        symbol = self.normal_symbol(m.ch[len(_CH_PREFIX) : -len(_CH_SUFFIX)])
        if not m.tick.data:
            raise self.no_trades(m.ch[:80])
        n = 0
        emit = self.emit
        for t in m.tick.data:
            n += emit(batch, symbol, str(t.tradeId), t.price, t.amount, _SIDES.get(t.direction, SIDE_UNKNOWN),
                      t.ts * 1000, recv_us)
        return n


VENUE = Htx
