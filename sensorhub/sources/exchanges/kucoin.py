"""KuCoin spot ``/market/match`` topic (trades).

* Connecting takes a token first: before every connect the source POSTs
  ``<rest_url>/api/v1/bullet-public`` (option ``rest_url``, default
  ``https://api.kucoin.com``). The answer names the WebSocket server
  (``instanceServers[0].endpoint``), the token, and the ping interval
  (``pingInterval``, ms). The source connects to
  ``<endpoint>?token=<token>&connectId=<random>``; the configured ``endpoint``
  is not used, KuCoin assigns the server. A token expires (the server then
  closes the connection): since the step runs before every connect, each
  reconnect uses a fresh token.
* Heartbeat: ``{"id":"<n>","type":"ping"}`` every ``pingInterval`` (unless the
  ``heartbeat_s`` option says otherwise); the server answers ``"type":"pong"``.
* Symbols: KuCoin spells pairs ``BASE-QUOTE`` like the normalized form, except
  that Bitcoin SV is ``BCHSV`` (stored as ``BSV``).
* Subscription: ``{"type":"subscribe","topic":"/market/match:A-B,C-D",...}``,
  at most 100 symbols per request.
* Messages ``{"type":"message","topic":"/market/match:<sym>","subject":"trade.l3match",
  "data":{"tradeId", "price", "size", "side", "time", ...}}``: ``tradeId`` is a
  hex string, unique per symbol (not consecutive: no gap detection). Side:
  ``side`` is the taker side. Amount: ``size`` in base currency. Time:
  ``time`` in **nanoseconds** (a decimal string).
* A ``/market/match`` message that yields no trade is a dead letter, whatever
  its key order or spacing. Spot only: derivative symbols, and a ``rest_url``
  on KuCoin Futures (``api-futures.kucoin.com``, whose token leads to the
  futures server), are configuration errors.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, ClassVar
from urllib.parse import urlsplit

import msgspec

from sensorhub.decoders.trade_batch import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TradeBatch
from sensorhub.errors import ConfigError, SourceError
from sensorhub.sources.exchanges.parsing import ensure_whole, loads
from sensorhub.sources.exchanges.venue import Venue, http_json, register_venue

__all__ = ["VENUE", "KuCoin"]

_ALIASES = {"BSV": "BCHSV"}
_NAMES = {v: k for k, v in _ALIASES.items()}
_TOPIC = "/market/match:"
_SUBSCRIBE_CHUNK = 100  # KuCoin accepts at most 100 symbols per topic request
BULLET_PATH = "/api/v1/bullet-public"


class _Match(msgspec.Struct):
    symbol: str
    tradeId: str
    price: float
    size: float
    side: str
    time: int


class _MatchMsg(msgspec.Struct):
    data: _Match


# strict=False: price, size and time are decimal strings.
_match_msg = msgspec.json.Decoder(_MatchMsg, strict=False).decode
_SIDES = {"buy": SIDE_BUY, "sell": SIDE_SELL}


@register_venue
class KuCoin(Venue):
    """KuCoin spot trades."""

    name = "kucoin"
    endpoint = "wss://ws-api-spot.kucoin.com"
    heartbeat_s = 18.0  # used until a token response gives pingInterval
    stale_after_s = 60.0
    sequential_ids = False
    options: ClassVar[dict[str, Any]] = {"rest_url": "https://api.kucoin.com"}
    derivative_hosts = ("api-futures.kucoin.com", "ws-api-futures.kucoin.com")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        host = (urlsplit(str(self.opts["rest_url"])).hostname or "").lower()
        if any(host == h or host.endswith("." + h) for h in self.derivative_hosts):
            raise ConfigError("sources.kucoin.options.rest_url", "the KuCoin spot REST API (https://api.kucoin.com)",
                              self.opts["rest_url"])

    def to_venue_symbol(self, symbol: str) -> str:
        """``BSV-USDT`` -> ``BCHSV-USDT``; others unchanged."""
        return "-".join(_ALIASES.get(p, p) for p in symbol.split("-"))

    def from_venue_symbol(self, venue_symbol: str) -> str:
        """``BCHSV-USDT`` -> ``BSV-USDT``; others unchanged."""
        return "-".join(_NAMES.get(p, p) for p in venue_symbol.split("-"))

    async def pre_connect(self, endpoint: str, timeout_s: float) -> str:
        """POST for a token; returns the WebSocket URL it names and sets the heartbeat interval."""
        url = str(self.opts["rest_url"]).rstrip("/") + BULLET_PATH
        resp = await http_json("POST", url, None, timeout_s)
        try:
            data = resp["data"]
            server = data["instanceServers"][0]
            ws_endpoint = str(server["endpoint"])
            token = str(data["token"])
            ping_ms = float(server.get("pingInterval") or 0)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise SourceError(f"kucoin: token response without a server ({type(exc).__name__}: {exc}): {resp!r:.300}") from None
        if not ws_endpoint.startswith(("ws://", "wss://")):
            raise SourceError(f"kucoin: token response names {ws_endpoint!r}, not a WebSocket URL")
        self.heartbeat_hint_s = ping_ms / 1000 if ping_ms > 0 else None
        sep = "&" if "?" in ws_endpoint else "?"
        return f"{ws_endpoint}{sep}token={token}&connectId={secrets.token_hex(8)}"

    def subscribe_messages(self) -> list[str | bytes]:
        """``/market/match`` for every symbol, at most 100 per request."""
        syms = [self.venue_symbols[s] for s in self.symbols]
        return [
            json.dumps({"id": str(i + 1), "type": "subscribe", "topic": _TOPIC + ",".join(syms[i : i + _SUBSCRIBE_CHUNK]),
                        "privateChannel": False, "response": True}, separators=(",", ":"))
            for i in range(0, len(syms), _SUBSCRIBE_CHUNK)
        ]

    def heartbeat_message(self) -> str | bytes | None:
        """``{"id":"ping","type":"ping"}``."""
        return '{"id":"ping","type":"ping"}'

    def pong_for(self, client_message: str | bytes) -> str | bytes | None:
        """The server echoes the ping's id with ``"type":"pong"``."""
        text = client_message.decode() if isinstance(client_message, bytes) else client_message
        if '"type":"ping"' not in text.replace(" ", ""):
            return None
        try:
            msg = json.loads(text)
        except ValueError:
            return None
        return json.dumps({"id": msg.get("id"), "type": "pong"}, separators=(",", ":"))

    def subscription_keys(self, client_message: str | bytes) -> set[str]:
        """``/market/match:EQZ-BTC`` keys of a subscribe request (one per symbol)."""
        msg = loads(client_message.encode() if isinstance(client_message, str) else client_message)
        if not isinstance(msg, dict) or msg.get("type") != "subscribe":
            return set()
        topic, _, syms = str(msg.get("topic", "")).partition(":")
        return {f"{topic}:{self.normal_symbol(s)}" for s in syms.split(",") if s}

    def replay_http_response(
        self, method: str, target: str, ws_url: str, recorded: str | None, n: int, heartbeat_s: float
    ) -> str | None:
        """A token response naming the replay server, a new token per request (``TOKEN-<n>``)."""
        if not urlsplit(target).path.endswith(BULLET_PATH):
            return None
        return json.dumps({"code": "200000", "data": {"token": f"TOKEN-{n}", "instanceServers": [{
            "endpoint": ws_url.rstrip("/") + "/endpoint", "encrypt": False, "protocol": "websocket",
            "pingInterval": round(heartbeat_s * 1000), "pingTimeout": 10000}]}})

    def _parse(self, payload: bytes, recv_us: int, batch: TradeBatch) -> int:
        topic = _TOPIC.encode()
        if topic in payload:
            if b'"type":"message"' in payload:
                self.trade_frame = True
                return self._match(_match_msg(payload).data, recv_us, batch)
            msg = loads(payload)  # another spelling, or an error naming the topic
            if isinstance(msg, dict) and msg.get("type") == "message" and str(msg.get("topic", "")).startswith(_TOPIC):
                self.trade_frame = True
                return self._match(msgspec.convert(msg, _MatchMsg, strict=False).data, recv_us, batch)
        elif b'"topic":"' in payload:
            ensure_whole(payload)  # level2, ticker, candles: nothing to store
            return 0
        else:
            msg = loads(payload)  # welcome, ack, pong, errors
        if isinstance(msg, dict) and msg.get("type") == "error":
            self.log_venue_error(msg)
        return 0

    def _match(self, t: _Match, recv_us: int, batch: TradeBatch) -> int:
        return self.emit(
            batch, self.normal_symbol(t.symbol), t.tradeId, t.price, t.size,
            _SIDES.get(t.side, SIDE_UNKNOWN), t.time // 1000, recv_us,
        )


VENUE = KuCoin
