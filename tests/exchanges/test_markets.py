"""A perpetual and a spot pair never share a stored symbol, on any venue.

Bybit spells its spot pair and its USDT perpetual alike (``BTCUSDT``) and
serves them on separate connections: symbols are resolved per connection,
and a feed opens every connection its symbols need. The replay server gives
each connection the recording of its own market. Venues whose drivers read
spot only refuse derivative symbols, and the derivatives endpoints that
spell perpetuals like spot pairs.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from exchange_kit import capture, make_source, run_replay, server_venue
from injection_kit import bybit_spot_trades, bybit_with_spot
from test_replay_venues import expected_trades

from sensorhub.config import SourceSettings
from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.errors import ConfigError
from sensorhub.replay import ReplayServer
from sensorhub.sources.exchanges import VENUES, ExchangeSource

#: The symbols of the Bybit capture's header: four linear perpetuals and two spot pairs.
BYBIT_HEADER = ["BTC-USDT-PERP", "ETH-USDT-PERP", "SOL-USDT-PERP", "DOGE-USDT-PERP", "BTC-USDT", "ETH-USDT"]


def _bybit_push(sym: str, tid: str) -> bytes:
    return json.dumps({"topic": f"publicTrade.{sym}", "ts": 1786310820347, "type": "snapshot", "data": [
        {"T": 1786310820346, "s": sym, "S": "Buy", "v": "0.01", "p": "1922.50", "i": tid}]}, separators=(",", ":")).encode()


def _symbols(batch: TradeBatch) -> list[str]:
    return [batch.symbols[i] for i in batch.symbol_idx]


def test_bybit_resolves_each_symbol_on_its_own_connection() -> None:
    v = VENUES["bybit"]([*BYBIT_HEADER, "BTC-USDC-PERP", "BTC-USD-PERP"])
    assert v.connections() == ("linear", "spot", "inverse")
    assert v.symbols_on("spot") == ("BTC-USDT", "ETH-USDT")
    assert v.venue_symbols["BTC-USDC-PERP"] == "BTCPERP" and v.venue_symbols["BTC-USD-PERP"] == "BTCUSD"
    subs = {c: [a for m in v.subscribe_messages_for(c) for a in json.loads(m)["args"]] for c in v.connections()}
    assert subs == {
        "linear": ["publicTrade.BTCUSDT", "publicTrade.ETHUSDT", "publicTrade.SOLUSDT", "publicTrade.DOGEUSDT",
                   "publicTrade.BTCPERP"],
        "spot": ["publicTrade.BTCUSDT", "publicTrade.ETHUSDT"],
        "inverse": ["publicTrade.BTCUSD"],
    }
    b = TradeBatch()
    pushes = [("spot", "BTCUSDT"), ("linear", "BTCUSDT"), ("spot", "ETHUSDT"), ("linear", "ETHUSDT"),
              ("linear", "DOGEUSDT"), ("linear", "SOLUSDT"), ("linear", "BTCPERP"), ("inverse", "BTCUSD"),
              ("spot", "SOLUSDT"), ("linear", "XRPUSDT")]  # the last two were not configured
    for n, (conn, sym) in enumerate(pushes):
        assert v.parse(_bybit_push(sym, f"t{n}"), 1_000, b, conn) == 1
    assert _symbols(b) == ["BTC-USDT", "BTC-USDT-PERP", "ETH-USDT", "ETH-USDT-PERP", "DOGE-USDT-PERP",
                           "SOL-USDT-PERP", "BTC-USDC-PERP", "BTC-USD-PERP", "SOL-USDT", "XRP-USDT-PERP"]
    assert v.amount_unit("BTC-USD-PERP") == "contracts" and v.amount_unit("BTC-USDT-PERP") == "base"


def test_bybit_endpoints_per_category() -> None:
    v = VENUES["bybit"](BYBIT_HEADER)
    for configured in ("wss://stream.bybit.com", "wss://stream.bybit.com/v5/public/linear",
                       "wss://stream.bybit.com/v5/public/"):
        assert v.connection_endpoint(configured, "spot") == "wss://stream.bybit.com/v5/public/spot"
    assert v.connection_endpoint("ws://127.0.0.1:9000", "linear") == "ws://127.0.0.1:9000/v5/public/linear"
    assert v.connection_of("/v5/public/spot") == "spot" and v.connection_of("/") == ""
    src = ExchangeSource("bybit", "bybit", SourceSettings(driver="bybit", symbols=tuple(BYBIT_HEADER)))
    assert src.topics == {"ws/linear": "wss://stream.bybit.com/v5/public/linear",
                          "ws/spot": "wss://stream.bybit.com/v5/public/spot"}
    assert src.decoder_for("ws") is None  # a frame of neither connection has no market to be read in
    b = TradeBatch()
    for topic in ("ws/spot", "ws/linear"):
        route = src.decoder_for(topic)
        assert route is not None
        route[0].decode(None, _bybit_push("BTCUSDT", topic), 1_000, b)
    assert _symbols(b) == ["BTC-USDT", "BTC-USDT-PERP"]
    one = ExchangeSource("b", "bybit", SourceSettings(driver="bybit", symbols=("BTC-USDT",)))
    assert one.topics == {"ws": "wss://stream.bybit.com/v5/public/spot"}


def _linear_expected() -> dict[str, int]:
    frames = capture("BYBIT").connections[0].frames()
    return {s: len(ids) for s, ids in expected_trades("BYBIT", frames).items()}


def _replay_bybit(cap: Any, symbols: list[str]) -> tuple[Counter[str], ReplayServer, ExchangeSource]:
    server = ReplayServer(cap, VENUES["bybit"](symbols))
    frames = sum(len(c.frames()) for c in cap.connections)

    def make(url: str) -> ExchangeSource:
        settings = SourceSettings(driver="bybit", symbols=tuple(symbols), endpoint=url,
                                  options={"backoff_initial_s": 0.05, "backoff_max_s": 0.2})
        return ExchangeSource("test-bybit", "bybit", settings)

    batch, _n, src = run_replay(server, make, frames)
    return Counter(_symbols(batch)), server, src


def test_bybit_recording_with_spot_and_linear_replays_both() -> None:
    cap = bybit_with_spot()
    got, server, src = _replay_bybit(cap, BYBIT_HEADER)
    want = {**_linear_expected(), **bybit_spot_trades()}
    assert dict(got) == want
    assert (got["BTC-USDT"], got["ETH-USDT"]) == (14, 15)  # the spot pushes only, none of the perpetuals
    assert sorted(server.stats.ws_targets) == ["/v5/public/linear", "/v5/public/spot"]
    assert server.stats.subscribe_mismatches == []
    assert src.health.extra["parse_errors"] == 0 and src.connections == 2


def test_bybit_spot_connection_never_gets_the_linear_recording() -> None:
    # The capture as it is: the spot connection fell beyond the cut. The feed's spot
    # connection is served nothing; the linear trades keep their perpetual names.
    got, server, _src = _replay_bybit(capture("BYBIT"), BYBIT_HEADER)
    assert dict(got) == _linear_expected()
    assert "BTC-USDT" not in got and "ETH-USDT" not in got
    assert sorted(server.stats.ws_targets) == ["/v5/public/linear", "/v5/public/spot"]


def test_bybit_linear_feed_is_unchanged_by_the_capture_spot_symbols() -> None:
    # Only perpetuals configured: one connection, to the linear endpoint, frames on topic "ws".
    cap = capture("BYBIT")
    server = ReplayServer(cap, server_venue("BYBIT"))
    batch, _n, src = run_replay(server, lambda url: make_source("BYBIT", url), len(cap.connections[0].frames()))
    assert dict(Counter(_symbols(batch))) == _linear_expected()
    assert server.stats.ws_targets == ["/v5/public/linear"] and list(src.topics) == ["ws"]


def _okx_push(inst: str, tid: int) -> bytes:
    return json.dumps({"arg": {"channel": "trades", "instId": inst}, "data": [
        {"instId": inst, "tradeId": str(tid), "px": "30218.8", "sz": "1", "side": "buy", "ts": "1652459199958"}]},
        separators=(",", ":")).encode()


def test_okx_spot_swap_and_future_stay_three_symbols() -> None:
    v = VENUES["okx"](["BTC-USDT", "BTC-USDT-PERP", "BTC-USDT-220527"])
    assert v.connections() == ("",)
    b = TradeBatch()
    for n, inst in enumerate(("BTC-USDT", "BTC-USDT-SWAP", "BTC-USDT-220527", "ETH-USDT-SWAP")):
        assert v.parse(_okx_push(inst, n + 1), 1_000, b) == 1
    assert _symbols(b) == ["BTC-USDT", "BTC-USDT-PERP", "BTC-USDT-220527", "ETH-USDT-PERP"]
    with pytest.raises(ConfigError, match="distinct instruments"):  # one instrument configured twice
        VENUES["okx"](["BTC-USDT-PERP", "BTC-USDT-SWAP"])


SPOT_ONLY = ["binance", "gateio", "htx", "kucoin", "kraken", "coinbase", "bitfinex", "bitstamp"]


@pytest.mark.parametrize("venue", SPOT_ONLY)
@pytest.mark.parametrize("symbol", ["BTC-USDT-PERP", "BTC-USDT-220527"])
def test_spot_only_drivers_refuse_derivative_symbols(venue: str, symbol: str) -> None:
    with pytest.raises(ConfigError) as err:
        VENUES[venue](["BTC-USDT", symbol])
    assert err.value.key == f"sources.{venue}.symbols" and symbol in str(err.value)
    VENUES[venue](["BTC-USDT"])  # the spot pair alone is fine


@pytest.mark.parametrize(
    ("venue", "endpoint"),
    [
        ("binance", "wss://fstream.binance.com"),
        ("binance", "wss://dstream.binance.com/stream"),
        ("gateio", "wss://fx-ws.gateio.ws/v4/ws/usdt"),
        ("htx", "wss://api.hbdm.com/linear-swap-ws"),
        ("kraken", "wss://futures.kraken.com/ws/v1"),
    ],
)
def test_spot_only_drivers_refuse_derivatives_endpoints(venue: str, endpoint: str) -> None:
    settings = SourceSettings(driver=venue, symbols=("BTC-USDT",), endpoint=endpoint)
    with pytest.raises(ConfigError) as err:
        ExchangeSource(venue, venue, settings)
    assert err.value.key == f"sources.{venue}.endpoint"
    ExchangeSource(venue, venue, SourceSettings(driver=venue, symbols=("BTC-USDT",)))  # the default: spot


def test_kucoin_refuses_the_futures_rest_api() -> None:
    with pytest.raises(ConfigError) as err:
        VENUES["kucoin"](["BTC-USDT"], {"rest_url": "https://api-futures.kucoin.com"})
    assert err.value.key == "sources.kucoin.options.rest_url"


def test_two_symbols_of_one_venue_spelling_are_refused() -> None:
    # Binance spells both BTCUSDT: their trades would be stored under whichever came last.
    with pytest.raises(ConfigError, match="BTC-USDT and BTCU-SDT are both BTCUSDT"):
        VENUES["binance"](["BTC-USDT", "BTCU-SDT"])
