"""Bitfinex WebSocket v2 ``trades`` channel (trading pairs).

* Symbols: ``BTC-USD`` <-> ``tBTCUSD``; a pair with a currency longer than
  three letters is spelled with a colon (``TESTBTC-TESTUSD`` <->
  ``tTESTBTC:TESTUSD``). Bitfinex labels Tether ``UST``: stored as ``USDT``.
* The client first sends ``{"event":"conf","flags":65536}``: the server then
  appends a sequence number to every array message. It counts messages of the
  whole connection (all channels, heartbeats included) and restarts with each
  connection; a forward jump is counted as a gap (``gaps``/``missing``) because
  messages, possibly trades, were lost.
* Data messages are arrays keyed by the ``chanId`` that the ``subscribed``
  event announces: ``[chanId, [[ID, MTS, AMOUNT, PRICE], ...], seq]`` (the
  snapshot of recent trades, on every subscription), ``[chanId, "te",
  [ID, MTS, AMOUNT, PRICE], seq]`` (trade executed), ``[chanId, "tu", [...],
  seq]`` (the same trade again, once the venue has booked it) and
  ``[chanId, "hb", seq]`` (heartbeat, every 15 s on a quiet channel).
* ``te`` and ``tu`` describe one trade with one ``ID``: it is stored once
  (``trade_id`` = ``ID``); a ``tu`` whose ``te`` was seen is dropped without
  counting a duplicate, a ``tu`` whose ``te`` was lost stores the trade.
  Trade ids are unique across pairs, not consecutive per pair: no gap
  detection on them.
* Side: the sign of ``AMOUNT`` (positive: the taker bought). Amount:
  ``abs(AMOUNT)`` in base currency. Time: ``MTS`` (ms).
* Heartbeat: the server's ``hb`` messages keep a quiet connection alive, so
  the stale bound is 45 s; the client also sends ``{"event":"ping"}`` every
  30 s (answered with ``{"event":"pong"}``). ``{"event":"info","code":20051}``
  asks the client to reconnect, which it does.
* A message on a trades channel other than a heartbeat that yields no trade
  (a field of the wrong type, a short array, an unknown kind) is a dead
  letter; a snapshot may be empty (a quiet pair has no recent trades).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, TradeBatch
from sensorhub.errors import InvalidValue
from sensorhub.sources.exchanges.parsing import ensure_whole, loads
from sensorhub.sources.exchanges.venue import Venue, register_venue

__all__ = ["VENUE", "Bitfinex"]

log = logging.getLogger(__name__)

_ALIASES = {"USDT": "UST"}
_NAMES = {v: k for k, v in _ALIASES.items()}
#: flags value: append a sequence number to every array message.
SEQ_ALL = 65536

# [chanId, [[ID, MTS, AMOUNT, PRICE], ...], seq] or [chanId, "te"|"tu", [ID, MTS, AMOUNT, PRICE], seq]
_array = msgspec.json.Decoder(list[msgspec.Raw]).decode
_snapshot = msgspec.json.Decoder(list[tuple[int, int, float, float]]).decode
_one = msgspec.json.Decoder(tuple[int, int, float, float]).decode


@register_venue
class Bitfinex(Venue):
    """Bitfinex v2 trades."""

    name = "bitfinex"
    endpoint = "wss://api-pub.bitfinex.com/ws/2"
    heartbeat_s = 30.0
    stale_after_s = 45.0
    sequential_ids = False
    honours_reconnect_requests = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: chanId -> normalized symbol, for the trades channels announced on this feed
        self.channels: dict[int, str] = {}
        self._last_msg_seq: int | None = None

    def to_venue_symbol(self, symbol: str) -> str:
        """``BTC-USD`` -> ``tBTCUSD``; ``TESTBTC-TESTUSD`` -> ``tTESTBTC:TESTUSD``; ``BTC-USDT`` -> ``tBTCUST``."""
        base, _, quote = symbol.partition("-")
        base, quote = _ALIASES.get(base, base), _ALIASES.get(quote, quote)
        return f"t{base}{quote}" if len(base) == 3 and len(quote) == 3 else f"t{base}:{quote}"

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``tBTCUSD`` -> ``BTC-USD``, ``tTESTBTC:TESTUSD`` -> ``TESTBTC-TESTUSD``."""
        pair = venue_symbol[1:] if venue_symbol.startswith(("t", "f")) else venue_symbol
        base, sep, quote = pair.partition(":")
        if not sep:
            base, quote = pair[:3], pair[3:]
        return f"{_NAMES.get(base, base)}-{_NAMES.get(quote, quote)}"

    def subscribe_messages(self) -> list[str | bytes]:
        """``conf`` with sequence numbers, then one ``trades`` subscription per pair."""
        msgs: list[str | bytes] = [json.dumps({"event": "conf", "flags": SEQ_ALL}, separators=(",", ":"))]
        msgs += [
            json.dumps({"event": "subscribe", "channel": "trades", "symbol": self.venue_symbols[s]}, separators=(",", ":"))
            for s in self.symbols
        ]
        return msgs

    def heartbeat_message(self) -> str | bytes | None:
        """``{"event":"ping"}``."""
        return '{"event":"ping"}'

    def pong_for(self, client_message: str | bytes) -> str | bytes | None:
        """The server answers ``{"event":"ping"}`` with ``{"event":"pong"}``."""
        text = client_message.decode() if isinstance(client_message, bytes) else client_message
        return '{"event":"pong"}' if text.replace(" ", "") == '{"event":"ping"}' else None

    def is_reconnect_request(self, payload: bytes) -> bool:
        """``{"event":"info","code":20051,...}``: the server is about to restart."""
        return payload.startswith(b'{"event":"info"') and b'"code":20051' in payload

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """``trades:BTC-USD`` keys of a subscribe request (``conf`` asks for nothing)."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict) or msg.get("event") != "subscribe":
            return set()
        return {f"{msg.get('channel')}:{self.normal_symbol(str(msg.get('symbol')))}"}

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        if payload[:1] == b"[":
            comma = payload.find(b",")
            if comma < 0:
                raise InvalidValue("bitfinex: array message without a channel id")
            chan = int(payload[1:comma])
            symbol = self.channels.get(chan)
            if symbol is None:
                ensure_whole(payload)  # books, tickers, other channels: nothing to store
                self._sequence(payload)
                return 0
            return self._trades(payload, symbol, recv_us, batch)
        msg = loads(payload)
        if not isinstance(msg, dict):
            raise InvalidValue("bitfinex: a message must be an array or an object")
        event = msg.get("event")
        if event == "subscribed":
            if msg.get("channel") == "trades":
                self.channels[int(msg["chanId"])] = self.normal_symbol(str(msg["symbol"]))
        elif event == "info" and "version" in msg:
            self._last_msg_seq = None  # a new connection: sequence numbers start again
        elif event == "error":
            self.log_venue_error(msg)
        return 0

    def _trades(self, payload: bytes, symbol: str, recv_us: int, batch: TradeBatch) -> int:
        self.trade_frame = True  # a heartbeat says otherwise below
        parts = _array(payload)
        if len(parts) < 2:
            raise InvalidValue("too short (no trades after the channel id)")
        second = bytes(parts[1])
        n = 0
        emit = self.emit
        if second[:1] == b"[":  # snapshot: [chanId, [[...], ...], seq]
            self._check_msg_seq(parts, 2)
            for tid, mts, amount, price in _snapshot(second):
                n += emit(batch, symbol, str(tid), price, abs(amount), SIDE_BUY if amount > 0 else SIDE_SELL,
                          mts * 1000, recv_us)
            return n
        kind = second.strip(b'"')
        if kind in (b"te", b"tu"):  # [chanId, "te", [ID, MTS, AMOUNT, PRICE], seq]
            if len(parts) < 3:
                raise InvalidValue("a trade update without a trade")
            self._check_msg_seq(parts, 3)
            tid, mts, amount, price = _one(bytes(parts[2]))
            trade_id = str(tid)
            if kind == b"tu" and self.seen(symbol, trade_id):
                return 0  # the same trade as its "te": not a duplicate to count
            return emit(batch, symbol, trade_id, price, abs(amount), SIDE_BUY if amount > 0 else SIDE_SELL,
                        mts * 1000, recv_us)
        if kind == b"hb":
            self.trade_frame = False
            self._check_msg_seq(parts, 2)
            return 0
        raise InvalidValue(
            f"expected a snapshot array or te/tu/hb after the channel id, got {kind[:20]!r}"
        )

    def _sequence(self, payload: bytes) -> None:
        # The sequence number is the last element: read it without parsing the (large) book message.
        end = payload.rstrip()
        cut = end.rfind(b",")
        if cut > 0 and end[-1:] == b"]":
            tail = end[cut + 1 : -1]
            if tail.isdigit():
                self._note_msg_seq(int(tail))

    def _check_msg_seq(self, parts: list[msgspec.Raw], index: int) -> None:
        if len(parts) > index:
            raw = bytes(parts[index])
            if raw.isdigit():
                self._note_msg_seq(int(raw))

    def _note_msg_seq(self, seq: int) -> None:
        last = self._last_msg_seq
        if last is not None and seq > last + 1:
            self.stats.gaps += 1
            self.stats.missing += seq - last - 1
            log.warning("bitfinex: message sequence jumps from %d to %d", last, seq)
        self._last_msg_seq = seq  # lower: a new connection or a resent stretch; not a gap


VENUE = Bitfinex
