"""Each venue's capture replayed through the real source over loopback WebSocket.

The expected per-symbol distinct trade counts are computed here with plain
``json`` from the capture's recorded frames, independently of the adapters.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import pytest
from exchange_kit import SYMBOLS, capture, make_source, run_replay, server_venue

from sensorhub.replay import ReplayServer

# Venue spelling -> the normalized symbols the sources are configured with, written out by hand.
BINANCE_NAMES = {"NKNUSDT": "NKN-USDT", "BLZETH": "BLZ-ETH", "LRCBTC": "LRC-BTC", "RUNEEUR": "RUNE-EUR"}
OKX_NAMES = {"BTC-USDT": "BTC-USDT", "BTC-USD-220527": "BTC-USD-220527", "UNI-USD-SWAP": "UNI-USD-PERP"}
KRAKEN_NAMES = {
    "WAVES/EUR": "WAVES-EUR", "XMR/USD": "XMR-USD", "KSM/XBT": "KSM-BTC", "GRT/ETH": "GRT-ETH", "SC/EUR": "SC-EUR",
    "ETH/CHF": "ETH-CHF", "OCEAN/XBT": "OCEAN-BTC", "OMG/USD": "OMG-USD", "XBT/CHF": "BTC-CHF", "ADA/XBT": "ADA-BTC",
}


def expected_trades(exchange: str, frames: list[Any]) -> dict[str, set[Any]]:
    """Distinct trades per symbol in the recorded frames, by plain JSON reading."""
    out: dict[str, set[Any]] = defaultdict(set)
    for raw in frames:
        msg = json.loads(raw)
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

    server = ReplayServer(cap, server_venue(exchange))
    batch, n, src = run_replay(server, lambda url: make_source(exchange, url), len(frames))

    assert n == len(frames)
    got = Counter(batch.symbols[i] for i in batch.symbol_idx)
    assert dict(got) == want
    # Nothing emitted twice.
    keys = list(zip((batch.symbols[i] for i in batch.symbol_idx), batch.trade_id, strict=True))
    assert len(keys) == len(set(keys))
    assert set(batch.venues) == {exchange.lower()}
    assert src.health.extra["parse_errors"] == 0
    assert src.health.extra["trades"] == len(batch)
    assert server.stats.subscribe_mismatches == []
    assert server.stats.client_keys  # the client did subscribe to something the capture serves
