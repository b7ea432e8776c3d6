"""Heartbeats, reconnects, stale feeds and subscription checks against the replay server."""

from __future__ import annotations

import logging
import time
from collections import Counter

import pytest
from exchange_kit import capture, make_source, pump, run_replay, server_venue
from test_replay_venues import expected_trades

from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.replay import Capture, CaptureConnection, ReplayServer, ReplayThread


def _distinct(batch: TradeBatch) -> Counter[str]:
    keys = set(zip((batch.symbols[i] for i in batch.symbol_idx), batch.trade_id, strict=True))
    assert len(keys) == len(batch), "a trade was emitted twice"
    return Counter(s for s, _ in keys)


def test_reconnect_resubscribes_and_drops_duplicates() -> None:
    # Coinbase: snapshot then updates; the server drops the connection after 150 frames and,
    # on the reconnect, resends the 60 frames before the drop point (trades already emitted).
    cap = capture("COINBASE")
    frames = cap.connections[0].frames()
    want = {s: len(ids) for s, ids in expected_trades("COINBASE", frames).items()}
    server = ReplayServer(cap, server_venue("COINBASE"), drop_after=150, overlap=60)
    batch, _n, src = run_replay(server, lambda url: make_source("COINBASE", url), len(frames) + 60)
    assert server.stats.drops == 1
    assert server.stats.connections == 2
    assert src.health.reconnects == 1
    assert server.stats.client_messages == 4  # market_trades + heartbeats, subscribed on each connection
    assert dict(_distinct(batch)) == want
    assert src.venue.stats.duplicates > 0
    assert src.venue.stats.gaps == 0


def test_reconnect_bybit_counts_stay_distinct() -> None:
    cap = capture("BYBIT")
    frames = cap.connections[0].frames()
    want = {s: len(ids) for s, ids in expected_trades("BYBIT", frames).items()}
    server = ReplayServer(cap, server_venue("BYBIT"), drop_after=700, overlap=200)
    batch, _n, src = run_replay(server, lambda url: make_source("BYBIT", url), len(frames) + 200)
    assert src.health.reconnects == 1 and server.stats.connections == 2
    assert server.stats.client_messages == 2  # one subscribe request per connection
    assert dict(_distinct(batch)) == want
    assert src.venue.stats.duplicates > 0


def test_heartbeats_are_sent_and_answered() -> None:
    # Bybit {"op":"ping"}, OKX "ping", Kraken v1 {"event":"ping"}: the replay answers as the venue does,
    # and the answers reach the parser as frames without trades or errors.
    for exchange in ("BYBIT", "OKX", "KRAKEN"):
        cap = capture(exchange)
        server = ReplayServer(cap, server_venue(exchange), speed=50.0)
        with ReplayThread(server):
            src = make_source(exchange, server.ws_url, heartbeat_s=0.1)
            src.start()
            batch = TradeBatch()
            try:
                pump(src, batch, lambda s=src, r=server: s.pings_sent >= 3 and r.stats.pings_answered >= 3, 10)
            finally:
                src.stop()
        assert src.venue.stats.parse_errors == 0, exchange
        assert server.stats.pings_answered >= 3, exchange


def test_stale_feed_reconnects() -> None:
    # A recorded connection with no frames: the venue accepts and then says nothing.
    cap = Capture("SILENT", {}, [CaptureConnection("SILENT.ws.1", "wss://example.invalid/")], [])
    server = ReplayServer(cap, server_venue("BYBIT"))
    with ReplayThread(server):
        src = make_source("BYBIT", server.ws_url, stale_after_s=0.3, heartbeat_s=60)
        src.start()
        try:
            deadline = time.monotonic() + 10
            while src.stale_reconnects < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            src.stop()
    assert src.stale_reconnects >= 2
    assert server.stats.connections >= 2
    assert not src.ready()


def test_unreachable_endpoint_backs_off_and_keeps_trying() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = make_source("OKX", f"ws://127.0.0.1:{port}", connect_timeout_s=0.5)
    src.start()
    try:
        deadline = time.monotonic() + 10
        while "reconnecting" not in src.health.detail and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        src.stop()
    assert "reconnecting in" in src.health.detail
    assert src.connections == 0 and not src.ready()
    delays = [src._backoff_delay(a) for a in range(1, 200)]
    assert all(0 <= d <= 0.2 for d in delays)  # backoff_max_s in make_source


def test_subscription_outside_capture_strict_and_lenient(caplog: pytest.LogCaptureFixture) -> None:
    # The capture holds aggTrade streams; a feed asking for plain trades is not what it recorded.
    cap = capture("BINANCE")
    frames = len(cap.connections[0].frames())
    lenient = ReplayServer(cap, server_venue("BINANCE"))
    _batch, decoded, lenient_src = run_replay(lenient, lambda url: make_source("BINANCE", url, stream="trade"), frames)
    assert "trade:NKN-USDT" in lenient.stats.subscribe_mismatches
    # Lenient: the mismatch is only noted; the recording is served on the one connection.
    assert lenient.stats.connections == 1 and lenient_src.connections == 1
    assert lenient.stats.frames_sent == frames
    assert lenient_src.health.frames == frames and decoded == frames
    assert lenient_src.venue.stats.parse_errors == 0

    # Strict: the server closes every connection with 1008 before sending anything; the source
    # sees that close, counts no frame, and keeps reconnecting.
    caplog.set_level(logging.INFO, logger="sensorhub.sources.exchanges.connection")

    def policy_closes() -> list[str]:
        return [
            r.getMessage() for r in list(caplog.records)
            if "connection closed: received 1008 (policy violation) subscription not in capture" in r.getMessage()
        ]

    strict = ReplayServer(cap, server_venue("BINANCE"), strict=True)
    with ReplayThread(strict):
        src = make_source("BINANCE", strict.ws_url, stream="trade")
        src.start()
        try:
            deadline = time.monotonic() + 10
            while len(policy_closes()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            src.stop()
    assert len(policy_closes()) >= 2, [r.getMessage() for r in caplog.records]
    assert src.connections >= 2 and strict.stats.connections >= 2
    assert strict.stats.frames_sent == 0
    assert src.health.frames == 0 and len(src.queue) == 0
    assert not src.ready()
