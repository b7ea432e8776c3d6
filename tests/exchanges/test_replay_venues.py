"""Each venue's capture replayed through the real source over loopback WebSocket.

The expected per-symbol distinct trade counts are computed here with plain
``json`` from the capture's recorded frames, independently of the adapters.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from typing import Any

import pytest
from exchange_kit import (
    SYMBOLS,
    capture,
    driver,
    make_source,
    replay_options,
    run_replay,
    server_venue,
)

from sensorhub.replay import ReplayServer

# Venue spelling -> the normalized symbols the sources are configured with, written out by hand.
BINANCE_NAMES = {"NKNUSDT": "NKN-USDT", "BLZETH": "BLZ-ETH", "LRCBTC": "LRC-BTC", "RUNEEUR": "RUNE-EUR"}
OKX_NAMES = {"BTC-USDT": "BTC-USDT", "BTC-USD-220527": "BTC-USD-220527", "UNI-USD-SWAP": "UNI-USD-PERP"}
KRAKEN_NAMES = {
    "WAVES/EUR": "WAVES-EUR", "XMR/USD": "XMR-USD", "KSM/XBT": "KSM-BTC", "GRT/ETH": "GRT-ETH", "SC/EUR": "SC-EUR",
    "ETH/CHF": "ETH-CHF", "OCEAN/XBT": "OCEAN-BTC", "OMG/USD": "OMG-USD", "XBT/CHF": "BTC-CHF", "ADA/XBT": "ADA-BTC",
}
BITFINEX_NAMES = {
    "tBFTUSD": "BFT-USD", "tIOTETH": "IOT-ETH", "tDOGUSD": "DOG-USD", "tMNABTC": "MNA-BTC", "tODEUSD": "ODE-USD",
    "tTESTBTC:TESTUSD": "TESTBTC-TESTUSD", "tSNGUSD": "SNG-USD",
}
BITSTAMP_NAMES = {
    "sgbeur": "SGB-EUR", "ethusd": "ETH-USD", "xrpeur": "XRP-EUR", "bateur": "BAT-EUR", "usdteur": "USDT-EUR",
    "usdtusd": "USDT-USD", "xlmgbp": "XLM-GBP", "adaeur": "ADA-EUR", "batbtc": "BAT-BTC", "galaeur": "GALA-EUR",
}
GEMINI_NAMES = {
    "BTCUSD": "BTC-USD", "BTCEUR": "BTC-EUR", "BTCGBP": "BTC-GBP", "BTCUSDT": "BTC-USDT", "ETHUSD": "ETH-USD",
    "ETHUSDT": "ETH-USDT", "SOLUSD": "SOL-USD", "BTCUSDCPERP": "BTC-USDC-PERP", "ETHUSDCPERP": "ETH-USDC-PERP",
    "SOLUSDCPERP": "SOL-USDC-PERP",
}
HTX_NAMES = {
    "trioeth": "TRIO-ETH", "borusdt": "BOR-USDT", "omgbtc": "OMG-BTC", "xvgeth": "XVG-ETH", "yfihusd": "YFI-HUSD",
    "zeneth": "ZEN-ETH", "dogeeth": "DOGE-ETH", "fil3susdt": "FIL3S-USDT", "propyeth": "PROPY-ETH", "nesteth": "NEST-ETH",
}


def text_of(raw: str | bytes) -> str:
    """A recorded frame as text (HTX frames are gzip)."""
    return gzip.decompress(raw).decode() if isinstance(raw, bytes) else raw


def is_server_ping(raw: str | bytes) -> bool:
    """HTX ``{"ping": n}``: answered on the network thread, never handed to the parser."""
    return isinstance(raw, bytes) and "ping" in json.loads(text_of(raw))


def expected_trades(exchange: str, frames: list[Any]) -> dict[str, set[Any]]:
    """Distinct trades per symbol in the recorded frames, by plain JSON reading."""
    out: dict[str, set[Any]] = defaultdict(set)
    bitfinex_channels: dict[int, str] = {}
    for raw in frames:
        msg = json.loads(text_of(raw))
        if exchange == "BINANCE":
            if isinstance(msg, dict) and msg.get("stream", "").endswith("@aggTrade"):
                out[BINANCE_NAMES[msg["data"]["s"]]].add(msg["data"]["a"])
        elif exchange == "OKX":
            if isinstance(msg, dict) and msg.get("arg", {}).get("channel") == "trades" and "data" in msg:
                for t in msg["data"]:
                    out[OKX_NAMES[t["instId"]]].add(t["tradeId"])
        elif exchange == "COINBASE":
            if msg.get("channel") == "market_trades":
                for ev in msg["events"]:
                    for t in ev["trades"]:
                        out[t["product_id"]].add(t["trade_id"])
        elif exchange == "KRAKEN":
            if isinstance(msg, list) and msg[-2] == "trade":
                for i, t in enumerate(msg[1]):
                    out[KRAKEN_NAMES[msg[-1]]].add((t[2], i, t[0], t[1], t[3]))
        elif exchange == "BYBIT" and isinstance(msg, dict) and msg.get("topic", "").startswith("publicTrade."):
            for t in msg["data"]:
                out[t["s"].replace("USDT", "-USDT-PERP")].add(t["i"])
        elif exchange == "BITFINEX":
            if isinstance(msg, dict) and msg.get("event") == "subscribed" and msg["channel"] == "trades":
                bitfinex_channels[msg["chanId"]] = BITFINEX_NAMES[msg["symbol"]]
            elif isinstance(msg, list) and msg[0] in bitfinex_channels:
                sym = bitfinex_channels[msg[0]]
                if isinstance(msg[1], list):  # snapshot
                    out[sym].update(t[0] for t in msg[1])
                elif msg[1] in ("te", "tu"):  # one trade, told twice: one id
                    out[sym].add(msg[2][0])
        elif exchange == "BITSTAMP":
            if msg.get("event") == "trade" and msg["channel"].startswith("live_trades_"):
                out[BITSTAMP_NAMES[msg["channel"][len("live_trades_"):]]].add(msg["data"]["id"])
        elif exchange == "GEMINI":
            if msg.get("type") == "l2_updates":
                for t in msg.get("trades", ()):
                    out[GEMINI_NAMES[msg["symbol"]]].add(t["tid"])
            elif msg.get("type") == "trade":
                out[GEMINI_NAMES[msg["symbol"]]].add(msg["tid"])
        elif exchange == "KUCOIN":
            if msg.get("subject") == "trade.l3match":
                sym = msg["data"]["symbol"].replace("BCHSV", "BSV")
                out[sym].add(msg["data"]["tradeId"])
        elif exchange == "GATEIO":
            if msg.get("channel") == "spot.trades" and msg.get("event") == "update":
                out[msg["result"]["currency_pair"].replace("_", "-")].add(msg["result"]["id"])
        elif exchange == "HUOBI" and str(msg.get("ch", "")).endswith(".trade.detail"):
            sym = HTX_NAMES[msg["ch"].split(".")[1]]
            for t in msg["tick"]["data"]:
                out[sym].add(t["tradeId"])
    return out


def served_connection(exchange: str) -> Any:
    """The recorded connection a trade feed is given (Kraken: the one that subscribed to trades)."""
    conns = capture(exchange).connections
    for c in conns:
        if any('"trade"' in s for s in c.sends() if isinstance(s, str)):
            return c
    return conns[0]


@pytest.mark.parametrize("exchange", list(SYMBOLS))
def test_capture_replay_counts_match(exchange: str) -> None:
    cap = capture(exchange)
    frames = served_connection(exchange).frames()
    want = {s: len(ids) for s, ids in expected_trades(exchange, frames).items()}
    assert sum(want.values()) > 0
    to_parser = [f for f in frames if not is_server_ping(f)]

    server = ReplayServer(cap, server_venue(exchange))
    batch, n, src = run_replay(
        server, lambda url: make_source(exchange, url, **replay_options(exchange, server)), len(to_parser)
    )

    assert n == len(to_parser)
    got = Counter(batch.symbols[i] for i in batch.symbol_idx)
    assert dict(got) == want
    # Nothing emitted twice.
    keys = list(zip((batch.symbols[i] for i in batch.symbol_idx), batch.trade_id, strict=True))
    assert len(keys) == len(set(keys))
    assert set(batch.venues) == {driver(exchange)}
    assert src.health.extra["parse_errors"] == 0
    assert src.health.extra["trades"] == len(batch)
    assert server.stats.subscribe_mismatches == []
    assert server.stats.client_keys  # the client did subscribe to something the capture serves
