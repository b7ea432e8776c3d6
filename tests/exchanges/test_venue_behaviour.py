"""Reconnects, heartbeats, server pings, reconnect requests and KuCoin tokens of the Bitfinex, Bitstamp,
Gemini, KuCoin, Gate and HTX feeds, each against the replay server."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from exchange_kit import capture, make_source, pump, replay_options, server_venue
from test_replay_venues import expected_trades, is_server_ping, text_of

from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.replay import Capture, CaptureConnection, CaptureRecord, ReplayServer, ReplayThread
from sensorhub.sources.exchanges import ExchangeSource

NEW_VENUES = ["BITFINEX", "BITSTAMP", "GEMINI", "KUCOIN", "GATEIO", "HUOBI"]


def _distinct(batch: TradeBatch) -> Counter[str]:
    keys = set(zip((batch.symbols[i] for i in batch.symbol_idx), batch.trade_id, strict=True))
    assert len(keys) == len(batch), "a trade was emitted twice"
    return Counter(s for s, _ in keys)


def _last_trade_frame(exchange: str, frames: list[str | bytes]) -> int:
    """Index of the last recorded frame holding a new trade (the independent reading of the tests).

    The distinct count over a prefix only grows with its length: bisect for the shortest full prefix.
    """
    def count(n: int) -> int:
        return sum(len(ids) for ids in expected_trades(exchange, frames[:n]).values())

    total = count(len(frames))
    assert total > 0
    lo, hi = 1, len(frames)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) >= total:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def _run(server: ReplayServer, exchange: str, until_frames: int, **options: object) -> tuple[TradeBatch, ExchangeSource]:
    """Run the source against ``server`` until it has seen ``until_frames`` frames (pings answered included)."""
    batch = TradeBatch()
    with ReplayThread(server):
        src = make_source(exchange, server.ws_url, **replay_options(exchange, server), **options)
        src.start()
        try:
            pump(src, batch, lambda: src.health.frames + src.server_pings_answered >= until_frames, 20)
        finally:
            src.stop()
    return batch, src


@pytest.mark.parametrize("exchange", NEW_VENUES)
def test_drop_mid_stream_reconnects_resubscribes_and_counts_once(exchange: str) -> None:
    # The server drops the connection right after the last trade frame and resends the frames before it
    # on the next connection: the trades come twice, are stored once.
    cap = capture(exchange)
    conn = cap.connections[0]
    frames = conn.frames()
    want = {s: len(ids) for s, ids in expected_trades(exchange, frames).items()}
    last = _last_trade_frame(exchange, frames)
    drop_after = min(last + 2, len(frames) - 1)
    overlap = 4
    server = ReplayServer(cap, server_venue(exchange), drop_after=drop_after, overlap=overlap)
    batch, src = _run(server, exchange, len(frames) + overlap)

    assert server.stats.drops == 1 and server.stats.connections == 2
    assert src.health.reconnects == 1
    # Subscribed again on the new connection (pongs and Bitfinex's conf ask for no channel).
    v = src.venue
    per_connection = sum(1 for m in v.subscribe_messages() if v.subscription_keys(m))
    assert sum(1 for m in server.stats.client_log if v.subscription_keys(m)) == 2 * per_connection
    assert dict(_distinct(batch)) == want
    assert src.venue.stats.duplicates > 0  # the resent trade frame was seen and dropped
    assert src.venue.stats.parse_errors == 0
    assert server.stats.subscribe_mismatches == []


@pytest.mark.parametrize(
    ("exchange", "ping"),
    [("BITFINEX", '{"event":"ping"}'), ("BITSTAMP", '{"event":"bts:heartbeat"}'), ("GATEIO", '"channel":"spot.ping"')],
)
def test_client_heartbeats_are_sent_and_answered(exchange: str, ping: str) -> None:
    server = ReplayServer(capture(exchange), server_venue(exchange), speed=2.0)
    with ReplayThread(server):
        src = make_source(exchange, server.ws_url, heartbeat_s=0.1)
        src.start()
        batch = TradeBatch()
        try:
            pump(src, batch, lambda: src.pings_sent >= 3 and server.stats.pings_answered >= 3, 10)
        finally:
            src.stop()
    sent = [m for m in server.stats.client_log if isinstance(m, str) and ping in m]
    assert len(sent) >= 3
    assert src.venue.stats.parse_errors == 0  # the venue's answers parse as non-trade frames


def test_kucoin_pings_at_the_token_interval_and_each_connection_takes_a_fresh_token() -> None:
    cap = capture("KUCOIN")
    frames = cap.connections[0].frames()
    # The token response asks for a ping every 0.1 s; no heartbeat_s option is set, so that interval rules.
    server = ReplayServer(cap, server_venue("KUCOIN"), speed=6.0, drop_after=len(frames) // 2, overlap=0,
                          heartbeat_interval_s=0.1)
    batch, src = _run(server, "KUCOIN", len(frames))
    assert src.venue.heartbeat_hint_s == pytest.approx(0.1)
    assert src.pings_sent >= 5 and server.stats.pings_answered >= 5
    posts = [t for t in server.stats.http_targets if t.startswith("POST ") and t.endswith("/api/v1/bullet-public")]
    assert len(posts) == 2  # one token per connection
    assert ["token=TOKEN-1" in server.stats.ws_targets[0], "token=TOKEN-2" in server.stats.ws_targets[1]] == [True, True]
    assert all(t.startswith("/endpoint?") for t in server.stats.ws_targets)
    want = {s: len(ids) for s, ids in expected_trades("KUCOIN", frames).items()}
    assert dict(_distinct(batch)) == want


def test_kucoin_token_failure_backs_off_and_retries() -> None:
    # A REST endpoint that is not there: each attempt fails in pre_connect and the source keeps trying.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = make_source("KUCOIN", "ws://127.0.0.1:1", rest_url=f"http://127.0.0.1:{port}", connect_timeout_s=0.5)
    src.start()
    try:
        deadline = time.monotonic() + 10
        while "reconnecting in" not in src.health.detail and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        src.stop()
    assert "bullet-public" in src.health.detail and src.connections == 0


def test_htx_server_pings_answered_with_the_same_value() -> None:
    cap = capture("HUOBI")
    frames = cap.connections[0].frames()
    pings = [json.loads(text_of(f))["ping"] for f in frames if is_server_ping(f)]
    assert len(pings) >= 2
    server = ReplayServer(cap, server_venue("HUOBI"))
    _batch, src = _run(server, "HUOBI", len(frames))
    pongs = [json.loads(m)["pong"] for m in server.stats.client_log if isinstance(m, str) and m.startswith('{"pong"')]
    assert pongs == pings
    assert src.server_pings_answered == len(pings)
    assert src.health.frames == len(frames) - len(pings)  # pings never reach the parser
    assert src.venue.stats.parse_errors == 0


def test_bitstamp_request_reconnect_is_honoured() -> None:
    # The recording with a bts:request_reconnect inserted before the trade: the source reconnects at once,
    # resubscribes, and the recording goes on from there on the new connection.
    cap = capture("BITSTAMP")
    conn = cap.connections[0]
    recs = list(conn.records)
    first_trade = next(i for i, r in enumerate(recs) if r.kind == "recv" and '"event":"trade"' in str(r.data))
    request = CaptureRecord("recv", recs[first_trade].ts, '{"event":"bts:request_reconnect","channel":"","data":""}')
    recs.insert(first_trade - 3, request)
    edited = Capture(cap.exchange, cap.header, [CaptureConnection(conn.conn_id, conn.addr, recs)], cap.http)
    frames = [r.data for r in recs if r.kind == "recv"]
    server = ReplayServer(edited, server_venue("BITSTAMP"))
    batch, src = _run(server, "BITSTAMP", len(frames))

    assert src.reconnect_requests == 1 and server.stats.reconnect_requests == 1
    assert server.stats.connections == 2 and src.health.reconnects == 1
    assert server.stats.client_messages == 2 * len(src.venue.subscribe_messages())  # subscribed again
    assert dict(_distinct(batch)) == {"ETH-USD": 1}
    assert src.health.extra["reconnect_requests"] == 1
