"""Shared pieces of the exchange feed tests: captures, and running a real source against a replay server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from sensorhub.config import SourceSettings
from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.replay import Capture, ReplayServer, ReplayThread, read_capture
from sensorhub.replay.capture import default_capture_dir
from sensorhub.sources.exchanges import VENUES, ExchangeSource

CAPTURES = default_capture_dir()

#: Symbols per capture, in the normalized spelling the sources are configured with.
SYMBOLS = {
    "BINANCE": ["NKN-USDT", "BLZ-ETH", "LRC-BTC", "RUNE-EUR"],
    "OKX": ["BTC-USDT", "BTC-USD-220527", "UNI-USD-PERP"],
    "COINBASE": ["BTC-USD", "ETH-USD"],
    "KRAKEN": ["KSM-BTC", "XMR-USD", "ETH-CHF", "OMG-USD", "GRT-ETH", "WAVES-EUR", "ADA-BTC", "BTC-CHF", "SC-EUR", "OCEAN-BTC"],
    "BYBIT": ["BTC-USDT-PERP", "ETH-USDT-PERP", "SOL-USDT-PERP", "DOGE-USDT-PERP"],
    "BITFINEX": ["BFT-USD", "IOT-ETH", "DOG-USD", "MNA-BTC", "ODE-USD", "TESTBTC-TESTUSD", "SNG-USD"],
    "BITSTAMP": ["SGB-EUR", "ETH-USD", "XRP-EUR", "BAT-EUR", "USDT-EUR", "USDT-USD", "XLM-GBP", "ADA-EUR", "BAT-BTC",
                 "GALA-EUR"],
    "GEMINI": ["BTC-USD", "BTC-EUR", "BTC-GBP", "BTC-USDT", "ETH-USD", "ETH-USDT", "SOL-USD", "BTC-USDC-PERP",
               "ETH-USDC-PERP", "SOL-USDC-PERP"],
    "KUCOIN": ["EQZ-BTC", "ANKR-BTC", "SNX-BTC", "FET-BTC", "BSV-USDT", "NRG-BTC", "CAPP-BTC", "DAPPT-BTC", "COV-BTC",
               "LTX-USDT"],
    "GATEIO": ["INK-USDT", "HAI-ETH", "BTC-USDC", "NANO-USDT", "QTUM3S-USDT", "DIS-USDT", "NEO-BTC", "FAST-USDT",
               "ZKS-ETH", "OMG-USDT"],
    "HUOBI": ["TRIO-ETH", "BOR-USDT", "OMG-BTC", "XVG-ETH", "YFI-HUSD", "ZEN-ETH", "DOGE-ETH", "FIL3S-USDT", "PROPY-ETH",
              "NEST-ETH"],
}
#: Driver name of a capture's venue where it is not the capture's name in lower case.
DRIVERS = {"HUOBI": "htx"}
OPTIONS: dict[str, dict[str, Any]] = {"BINANCE": {"stream": "aggTrade"}}

_cache: dict[str, Capture] = {}


def capture(exchange: str) -> Capture:
    """The recorded capture of ``exchange`` (read once per test run)."""
    path = CAPTURES / f"{exchange}.jsonl.zst"
    if not path.exists():
        pytest.skip(f"capture {path} not present")
    if exchange not in _cache:
        _cache[exchange] = read_capture(path)
    return _cache[exchange]


def driver(exchange: str) -> str:
    """The source driver of a capture's venue (``HUOBI`` -> ``htx``)."""
    return DRIVERS.get(exchange, exchange.lower())


def make_source(exchange: str, endpoint: str, **options: Any) -> ExchangeSource:
    """A real source for the capture's venue, pointed at ``endpoint``."""
    opts = {**OPTIONS.get(exchange, {}), "backoff_initial_s": 0.05, "backoff_max_s": 0.2, **options}
    name = driver(exchange)
    settings = SourceSettings(driver=name, symbols=tuple(SYMBOLS[exchange]), endpoint=endpoint, options=opts)
    return ExchangeSource(f"test-{name}", name, settings, max_inflight_frames=10_000)


def replay_options(exchange: str, server: ReplayServer) -> dict[str, Any]:
    """Options pointing a source's pre-connect REST step at the replay server (KuCoin's ``rest_url``)."""
    return {"rest_url": server.http_url} if "rest_url" in VENUES[driver(exchange)].options else {}


def server_venue(exchange: str) -> Any:
    """A venue instance for the replay server's heartbeat answers and subscription checks."""
    return VENUES[driver(exchange)](SYMBOLS[exchange], OPTIONS.get(exchange))


def pump(
    src: ExchangeSource,
    batch: TradeBatch,
    until: Callable[[], bool],
    timeout_s: float = 15.0,
) -> int:
    """Take frames from ``src`` and decode them into ``batch`` until ``until()`` and the queue is empty.

    Returns the number of frames decoded. Bounded by ``timeout_s``. Each frame
    goes to the decoder of its topic, as in the ingest loop (a feed of several
    connections, Bybit's spot and linear, tells them apart by topic).
    """
    frames = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = src.get(512, 0.05)
        for f in got:
            route = src.decoder_for(f.topic)
            assert route is not None, f"no decoder for topic {f.topic!r}"
            route[0].decode(None, f.payload, f.recv_ns, batch)
            frames += 1
        if not got and until():
            return frames
    raise AssertionError(f"timed out after {timeout_s} s; {frames} frames decoded; health {src.health}")


def run_replay(
    server: ReplayServer,
    make: Callable[[str], ExchangeSource],
    expected_frames: int,
    timeout_s: float = 15.0,
) -> tuple[TradeBatch, int, ExchangeSource]:
    """Serve a capture, run the source ``make(ws_url)`` against it, decode all it delivers.

    Stops once the source has received ``expected_frames`` frames and the
    queue is drained; returns the batch, the frames decoded and the (stopped) source.
    """
    batch = TradeBatch()
    with ReplayThread(server):
        src = make(server.ws_url)
        src.start()
        try:
            frames = pump(src, batch, lambda: src.health.frames >= expected_frames, timeout_s)
        finally:
            src.stop()
    return batch, frames, src
