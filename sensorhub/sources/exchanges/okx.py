"""OKX v5 public ``trades`` channel.

* Symbols: OKX instrument ids are already ``BASE-QUOTE`` (spot) and
  ``BASE-QUOTE-YYMMDD`` (dated futures); perpetual swaps ``X-Y-SWAP`` are
  stored as ``X-Y-PERP``. Every instrument id is distinct on OKX, so the spot
  pair ``BTC-USDT`` and the swap ``BTC-USDT-SWAP`` (``BTC-USDT-PERP``) never
  meet in one stored symbol, all on one connection.
* Amount: ``sz`` as OKX reports it: base currency on spot, **contracts** on
  futures and swaps (see :meth:`Okx.amount_unit`).
* Side: ``side`` is the taker side. Trade ids are consecutive per instrument:
  gaps are counted.
* Heartbeat: the client sends the text ``ping`` at least every 30 s; the
  server answers ``pong``. Subscribe acknowledgements (``{"event":"subscribe"}``)
  may repeat when a subscribe request repeats arguments; they carry no trades.
* A push on the ``trades`` channel (``{"arg":{"channel":"trades",...},"data":[...]}``,
  whatever its key order or spacing) that yields no trade is a dead letter.
"""

from __future__ import annotations

import json

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.sources.exchanges.parsing import ensure_whole, loads
from sensorhub.sources.exchanges.venue import AmountUnit, Venue, register_venue

__all__ = ["VENUE", "Okx"]


class _Trade(msgspec.Struct):
    instId: str
    tradeId: str
    px: float
    sz: float
    side: str
    ts: int


class _TradesMsg(msgspec.Struct):
    data: list[_Trade]


_PUSH_KEYS = ("event", "op")  # acknowledgements and errors, not pushes


_trades_msg = msgspec.json.Decoder(_TradesMsg, strict=False).decode
_SIDES = {"buy": SIDE_BUY, "sell": SIDE_SELL}


@register_venue
class Okx(Venue):
    """OKX spot, futures and perpetual swap trades."""

    name = "okx"
    endpoint = "wss://ws.okx.com:8443/ws/v5/public"
    heartbeat_s = 20.0
    stale_after_s = 60.0
    sequential_ids = True
    instrument_kinds = frozenset({"spot", "perpetual", "future", "other"})  # other: options, ids passed through

    def to_venue_symbol(self, symbol: str) -> str:
        """``UNI-USD-PERP`` -> ``UNI-USD-SWAP``; others unchanged."""
        return symbol[:-5] + "-SWAP" if symbol.endswith("-PERP") else symbol

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``UNI-USD-SWAP`` -> ``UNI-USD-PERP``; others unchanged."""
        return venue_symbol[:-5] + "-PERP" if venue_symbol.endswith("-SWAP") else venue_symbol

    def amount_unit(self, symbol: str) -> AmountUnit:
        """Contracts on swaps and futures (three-part ids), base currency on spot."""
        return "contracts" if symbol.count("-") >= 2 else "base"

    def subscribe_messages(self) -> list[str | bytes]:
        """One subscribe request for every instrument's ``trades`` channel."""
        args = [{"channel": "trades", "instId": self.venue_symbols[s]} for s in self.symbols]
        return [json.dumps({"op": "subscribe", "args": args}, separators=(",", ":"))]

    def heartbeat_message(self) -> str | bytes | None:
        """The text frame ``ping``."""
        return "ping"

    def pong_for(self, client_message: str | bytes) -> str | bytes | None:
        """The server answers ``ping`` with ``pong``."""
        return "pong" if client_message in ("ping", b"ping") else None

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """``trades:BTC-USDT`` keys of a subscribe request."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict) or msg.get("op") != "subscribe":
            return set()
        return {
            f"{a.get('channel')}:{self.normal_symbol(str(a.get('instId')))}"
            for a in msg.get("args", ())
            if isinstance(a, dict)
        }

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        if payload.startswith(b'{"arg":{"channel":"trades","'):
            self.trade_frame = True
            return self._trades(_trades_msg(payload), recv_us, batch)
        if payload.startswith(b'{"arg":{"channel":"'):
            ensure_whole(payload)  # tickers, books...: nothing to store
            return 0
        if payload == b"pong":
            return 0
        msg = loads(payload)  # subscribe acks, errors, notices; any push in another spelling than the usual
        if isinstance(msg, dict):
            arg = msg.get("arg")
            if isinstance(arg, dict) and arg.get("channel") == "trades" and not any(k in msg for k in _PUSH_KEYS):
                self.trade_frame = True
                return self._trades(msgspec.convert(msg, _TradesMsg, strict=False), recv_us, batch)
            if msg.get("event") == "error":
                self.log_venue_error(msg)
        return 0

    def _trades(self, m: _TradesMsg, recv_us: int, batch: TradeBatch) -> int:
        if not m.data:
            raise self.no_trades()
        n = 0
        emit = self.emit
        for t in m.data:
            n += emit(
                batch, self.normal_symbol(t.instId), t.tradeId, t.px, t.sz,
                _SIDES.get(t.side, SIDE_UNKNOWN), t.ts * 1000, recv_us, int(t.tradeId),
            )
        return n


VENUE = Okx
