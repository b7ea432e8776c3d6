"""An ingest that stops taking frames: the feed's event loop keeps the connection alive and loses nothing.

The replay server sends more trade frames than the frame queue holds and pings
the connection with a short timeout, as venues do; the test takes no frame for
several seconds, then takes them all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from sensorhub.config import SourceSettings
from sensorhub.replay import Capture, CaptureConnection, CaptureRecord, ReplayServer, ReplayThread
from sensorhub.sources.exchanges import VENUES, ExchangeSource

QUEUE = 16
#: More than the queue holds, and few enough that the rest fits the WebSocket client's own buffer
#: (64 frames): what the server sends behind them, its pings, is then read and answered.
FRAMES = 48
STALL_S = 4.0
PING_INTERVAL_S = 0.2
PING_TIMEOUT_S = 1.0
HEARTBEAT_S = 0.5
STALE_AFTER_S = 1.5  # shorter than the stall: waiting for the ingest is not a silent venue
WAIT_S = 15.0


def _trade(i: int) -> str:
    trade = {"instId": "BTC-USDT", "tradeId": str(i), "px": "30000.5", "sz": "0.01", "side": "buy",
             "ts": str(1_650_000_000_000 + i)}
    return json.dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": [trade]}, separators=(",", ":"))


def _wait(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_stalled_ingest_keeps_the_connection_up_and_every_frame_arrives_in_order() -> None:
    okx = VENUES["okx"](["BTC-USDT"])
    frames = [_trade(i) for i in range(1, FRAMES + 1)]
    subscribe = okx.subscribe_messages()[0]
    records = [CaptureRecord("send", 0.0, subscribe)]
    records += [CaptureRecord("recv", 0.0, f) for f in frames]
    cap = Capture("OKX", {}, [CaptureConnection("OKX.ws.1", "wss://ws.okx.com:8443/ws/v5/public", records)], [])
    server = ReplayServer(cap, okx, ping_interval_s=PING_INTERVAL_S, ping_timeout_s=PING_TIMEOUT_S)
    with ReplayThread(server):
        settings = SourceSettings(
            driver="okx", symbols=("BTC-USDT",), endpoint=server.ws_url,
            options={"heartbeat_s": HEARTBEAT_S, "stale_after_s": STALE_AFTER_S,
                     "backoff_initial_s": 0.05, "backoff_max_s": 0.2},
        )
        src = ExchangeSource("test-okx", "okx", settings, max_inflight_frames=QUEUE)
        src.start()
        try:
            _wait(lambda: len(src.queue) == QUEUE and src.queue_full_waits == 1, "the frame queue to fill")
            pongs, pings = server.stats.pongs, src.pings_sent
            # The stall: nothing is taken. The feed holds one frame in hand and reads no further.
            end = time.monotonic() + STALL_S
            while time.monotonic() < end:
                assert len(src.queue) == QUEUE
                assert src.health.frames == QUEUE + 1
                assert src.connections == 1 and src.ready(), src.health.detail
                time.sleep(0.02)
            assert server.stats.pongs - pongs >= STALL_S / PING_INTERVAL_S / 4  # the loop answered pings ...
            assert src.pings_sent - pings >= STALL_S / HEARTBEAT_S / 4  # ... and sent its heartbeats
            assert server.stats.ping_timeouts == 0

            got: list[bytes] = []
            deadline = time.monotonic() + WAIT_S
            while sum(p != b"pong" for p in got) < FRAMES:
                assert time.monotonic() < deadline, f"{len(got)} frames taken; health {src.health}"
                got += [f.payload for f in src.get(7, 0.05)]  # a few at a time: the feed waits again
        finally:
            src.stop()

    assert [p for p in got if p != b"pong"] == [f.encode() for f in frames]
    assert src.queue.high_water == QUEUE
    assert src.queue_full_waits > 1
    assert src.connections == 1 and src.health.reconnects == 0 and src.stale_reconnects == 0
    assert server.stats.connections == 1 and server.stats.ping_timeouts == 0
    assert server.stats.subscribe_mismatches == []
