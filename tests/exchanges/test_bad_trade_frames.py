"""A trade frame that yields no trade is a dead letter on every venue, and a feed whose trade frames keep failing
is unhealthy.

Each venue's capture is replayed over a real WebSocket through the real
source and the real ingest loop into a real Redis, with malformed trade
frames injected (``injection_kit``: a field of the wrong type, a wrong
shape, a missing field, each spelled three ways) and a respelled control
message. Checked in Redis, as the writer would read it: every malformed frame
is in the dead-letter stream raw with a reason naming the problem, the
control message is not, the valid trades are all in the trade streams, and
the health the ingest publishes (what the monitor shows) says the feed is
unhealthy.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from exchange_kit import OPTIONS, SYMBOLS, driver, make_source, replay_options, server_venue
from injection_kit import inject, reason_names_problem
from kit.services import ManagedProcess
from test_replay_venues import expected_trades, is_server_ping, served_connection, text_of

from sensorhub.config import load_settings
from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.errors import DecodeError
from sensorhub.monitor.state import StateCollector
from sensorhub.pipeline.ingest import Ingest
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.streams import F_BLOCK
from sensorhub.pipeline.tradecodec import decode_trades
from sensorhub.replay import ReplayServer, ReplayThread
from sensorhub.sources.exchanges import VENUES

WAIT_S = 30.0


def _until(cond: Any, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _snapshot(r: Any, layout: StreamLayout, process: str) -> dict[str, Any]:
    raw = r.hget(layout.metrics_key(process), "state")
    return dict(json.loads(raw)) if raw else {}


@pytest.mark.parametrize("exchange", list(SYMBOLS))
def test_malformed_trade_frames_are_dead_letters_and_the_feed_unhealthy(
    exchange: str, redis_server: ManagedProcess
) -> None:
    import redis

    redis_url = redis_server.url
    inj = inject(exchange)
    want = {s: len(ids) for s, ids in expected_trades(exchange, inj.original.frames()).items()}
    frames = inj.connection.frames()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        redis={"url": redis_url, "prefix": prefix},
        metrics={"publish_interval_s": 0.2},
        # mqtt.max_payload_bytes stays 1 MiB: Coinbase's book snapshots (2.5 and 5 MB) are within the feed's own bound
    )
    layout = StreamLayout(prefix, settings.redis.partitions)
    r = redis.Redis.from_url(redis_url)
    server = ReplayServer(inj.capture, server_venue(exchange))
    with ReplayThread(server):
        src = make_source(exchange, server.ws_url, **replay_options(exchange, server))
        ingest = Ingest(settings, src)
        runner = threading.Thread(target=ingest.run, name=f"ingest-{exchange}", daemon=True)
        runner.start()
        try:
            _until(lambda: src.health.frames + src.server_pings_answered >= len(frames), "every frame")
            process = ingest.metrics.process
            _until(
                lambda: int(_snapshot(r, layout, process).get("counters", {}).get("frames", 0)) >= src.health.frames
                and int(_snapshot(r, layout, process).get("counters", {}).get("dead_letters", 0)) >= len(inj.bad),
                "the ingest to publish what it took",
            )
            snap = _snapshot(r, layout, process)
            monitor = StateCollector(r, layout).collect()
        finally:
            ingest.stop_event.set()
            runner.join(20)
    assert not runner.is_alive()

    # Every malformed frame, raw and untouched, with a reason naming its problem; nothing else.
    dead = {fields[b"payload"]: fields[b"error"].decode() for s in layout.dlq_streams() for _id, fields in r.xrange(s)}
    assert set(dead) == set(inj.bad), "dead letters are exactly the malformed frames"
    for raw, kind in inj.bad.items():
        assert reason_names_problem(kind, dead[raw]), (kind, dead[raw])
    assert not set(inj.control) & set(dead)  # a control message respelled is still a control message

    # Every valid trade is in the trade streams.
    stored: set[tuple[str, str]] = set()
    for p in range(layout.partitions):
        for _id, fields in r.xrange(layout.trades(p)):
            block = decode_trades(fields[F_BLOCK])
            stored.update((block.symbols[i], t) for i, t in zip(block.symbol_idx, block.trade_id, strict=True))
    assert dict(Counter(s for s, _ in stored)) == want

    # The feed says it is unhealthy, and the monitor shows it.
    extra = src.health.extra
    assert extra["trade_frame_errors"] == len(inj.bad) == 9
    assert extra["unhealthy"] == "9 of the last 100 trade frames yielded no trade"
    gauges = snap["gauges"]
    assert gauges["unhealthy"] == extra["unhealthy"] and gauges["parse_errors"] == 9
    rows = [s for s in monitor["sources"] if s["name"] == src.name]
    assert [(s["status"], s["unhealthy"], s["dead_letters"]) for s in rows] == [("parse-errors", extra["unhealthy"], 9)]


# --------------------------------------------------------------------------- the recorded frames alone


def _trade_frames(exchange: str, frames: list[str | bytes]) -> int:
    """Frames on a trade channel, by plain JSON reading (acks, heartbeats and info events are not)."""
    n = 0
    bitfinex: set[int] = set()
    for raw in frames:
        if is_server_ping(raw):
            continue
        msg = json.loads(text_of(raw))
        if exchange == "BITFINEX":
            if isinstance(msg, dict) and msg.get("event") == "subscribed" and msg["channel"] == "trades":
                bitfinex.add(msg["chanId"])
            elif isinstance(msg, list) and msg[0] in bitfinex and msg[1] != "hb":
                n += 1
            continue
        if exchange == "KRAKEN":
            n += isinstance(msg, list) and msg[-2] == "trade"
            continue
        if not isinstance(msg, dict):
            continue
        n += {
            "BINANCE": lambda m: str(m.get("stream", "")).endswith(("@aggTrade", "@trade")),
            "OKX": lambda m: m.get("arg", {}).get("channel") == "trades" and "event" not in m,
            "COINBASE": lambda m: m.get("channel") == "market_trades",
            "BYBIT": lambda m: str(m.get("topic", "")).startswith("publicTrade."),
            "BITSTAMP": lambda m: m.get("event") == "trade",
            "GEMINI": lambda m: m.get("type") == "trade" or (m.get("type") == "l2_updates" and "trades" in m),
            "KUCOIN": lambda m: m.get("type") == "message" and str(m.get("topic", "")).startswith("/market/match:"),
            "GATEIO": lambda m: m.get("channel") == "spot.trades" and m.get("event") == "update",
            "HUOBI": lambda m: str(m.get("ch", "")).endswith(".trade.detail"),
        }[exchange](msg)
    return n


@pytest.mark.parametrize("exchange", list(SYMBOLS))
def test_recorded_control_messages_are_not_trade_frames(exchange: str) -> None:
    frames = served_connection(exchange).frames()
    v = VENUES[driver(exchange)](SYMBOLS[exchange], OPTIONS.get(exchange))
    b = TradeBatch()
    for raw in frames:
        if not is_server_ping(raw):
            v.parse(raw if isinstance(raw, bytes) else raw.encode(), 1_000_000, b)
    st = v.stats
    assert st.trade_frames == _trade_frames(exchange, frames) > 0
    assert (st.parse_errors, st.trade_frame_errors, st.unhealthy) == (0, 0, "")


def test_health_window_turns_unhealthy_and_back() -> None:
    v = VENUES["okx"](["BTC-USDT"], trade_error_window=10, unhealthy_trade_errors=3)
    b = TradeBatch()

    def push(tid: int, px: str = "30218.8", data: Any = None) -> bytes:
        trades = data if data is not None else [
            {"instId": "BTC-USDT", "tradeId": str(tid), "px": px, "sz": "1", "side": "buy", "ts": "1652459199958"}]
        return json.dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": trades}).encode()

    def bad(tid: int) -> None:
        with pytest.raises(DecodeError):
            v.parse(push(tid, "abc"), 1, b)

    assert v.parse(push(1), 1, b) == 1
    assert v.parse(push(1), 1, b) == 0  # a frame of trades already stored: no failure
    bad(2)
    bad(3)
    assert v.stats.unhealthy == ""  # two of the last ten
    assert v.parse(b'{"event":"subscribe","arg":{"channel":"trades","instId":"BTC-USDT"},"connId":"a"}', 1, b) == 0
    bad(4)
    assert v.stats.unhealthy == "3 of the last 10 trade frames yielded no trade"
    for tid in range(5, 15):
        v.parse(push(tid), 1, b)
    assert v.stats.unhealthy == "", "the failures left the window"
    assert (v.stats.trade_frames, v.stats.trade_frame_errors, v.stats.parse_errors) == (15, 3, 3)


@pytest.mark.parametrize(
    ("exchange", "frame"),
    [
        ("OKX", b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[]}'),
        ("OKX", b'{"arg":{"channel":"trades","instId":"BTC-USDT"}}'),
        ("BYBIT", b'{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1,"data":[]}'),
        ("HUOBI", b'{"ch":"market.trioeth.trade.detail","ts":1,"tick":{"id":1,"ts":1,"data":[]}}'),
        ("KRAKEN", b'[993,[],"trade","XMR/USD"]'),
        ("KRAKEN", b'[993,[["354.11","0.5","1618678142.5","s","l",""]],"trade"]'),
        ("COINBASE", b'{"channel":"market_trades","events":[]}'),
        ("COINBASE", b'{"channel":"market_trades","events":[{"type":"update"}]}'),
        ("BITSTAMP", b'{"data":{"id":1,"amount":1,"price":1,"type":0,"microtimestamp":"1"},"channel":"x","event":"trade"}'),
        ("OKX", b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT","tradeId":"1",'
                b'"px":"NaN","sz":"1","side":"buy","ts":"1"}]}'),
        ("OKX", b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT","tradeId":"1",'
                b'"px":"-5","sz":"1","side":"buy","ts":"1"}]}'),
        ("GATEIO", b'{"result":{"id":1,"currency_pair":"BTC_USDT","side":"buy","amount":"0","price":"1",'
                   b'"create_time_ms":"1.5"},"event":"update","channel":"spot.trades"}'),
    ],
)
def test_trade_frames_without_a_trade_are_errors(exchange: str, frame: bytes) -> None:
    v = VENUES[driver(exchange)](["BTC-USDT", "XMR-USD", "TRIO-ETH"])
    with pytest.raises(DecodeError) as err:
        v.parse(gzip.compress(frame) if exchange == "HUOBI" else frame, 1, TradeBatch())
    assert "trade frame" in str(err.value)
    assert v.stats.trade_frame_errors == 1


@pytest.mark.parametrize(
    ("exchange", "frame"),
    [
        ("BITFINEX", b"[17,[],1]"),  # a quiet pair's snapshot
        ("COINBASE", b'{"channel":"market_trades","events":[{"type":"snapshot","trades":[]}]}'),
        ("KRAKEN", b'{"channel":"trade","type":"snapshot","data":[]}'),
        ("GEMINI", b'{"type":"l2_updates","symbol":"BTCUSD","changes":[],"trades":[]}'),
    ],
)
def test_empty_snapshots_are_not_errors(exchange: str, frame: bytes) -> None:
    v = VENUES[driver(exchange)](["BTC-USD"])
    b = TradeBatch()
    if exchange == "BITFINEX":
        v.parse(b'{"event":"subscribed","channel":"trades","chanId":17,"symbol":"tBTCUSD","pair":"BTCUSD"}', 1, b)
    assert v.parse(frame, 1, b) == 0
    assert (v.stats.parse_errors, v.stats.trade_frames) == (0, 1)

