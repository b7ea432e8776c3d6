"""The ingest bounds a payload by its source's own setting: an exchange feed's frame bound, MQTT's for MQTT.

An exchange feed's frames (a book snapshot of several MB) are not MQTT
payloads; the real ingest takes them from a real feed into a real Redis
with ``mqtt.max_payload_bytes`` far below their size.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import redis
from kit.services import ManagedProcess

from sensorhub.config import SourceSettings, load_settings
from sensorhub.pipeline.ingest import Ingest
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.streams import F_BLOCK
from sensorhub.pipeline.tradecodec import decode_trades
from sensorhub.replay import Capture, CaptureConnection, CaptureRecord, ReplayServer, ReplayThread
from sensorhub.sources.base import create
from sensorhub.sources.exchanges import VENUES, ExchangeSource

MQTT_BOUND = 256
FRAMES = 10
TRADES_PER_FRAME = 40  # about 4 kB a frame
WAIT_S = 20.0


def _frame(first_id: int) -> str:
    trades = [{"instId": "BTC-USDT", "tradeId": str(i), "px": "30000.5", "sz": "0.01", "side": "sell",
               "ts": str(1_650_000_000_000 + i)} for i in range(first_id, first_id + TRADES_PER_FRAME)]
    return json.dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": trades}, separators=(",", ":"))


def _stored_trade_ids(r: redis.Redis, layout: StreamLayout) -> list[str]:
    ids: list[str] = []
    for p in range(layout.partitions):
        for _id, fields in r.xrange(layout.trades(p)):
            ids += decode_trades(fields[F_BLOCK]).trade_id
    return ids


def test_exchange_frames_over_the_mqtt_bound_are_stored(redis_server: ManagedProcess) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = load_settings(redis={"url": redis_server.url, "prefix": prefix}, mqtt={"max_payload_bytes": MQTT_BOUND})
    layout = StreamLayout(prefix, settings.redis.partitions)
    r = redis.Redis.from_url(redis_server.url)
    okx = VENUES["okx"](["BTC-USDT"])
    frames = [_frame(1 + k * TRADES_PER_FRAME) for k in range(FRAMES)]
    assert min(len(f) for f in frames) > 10 * MQTT_BOUND
    records = [CaptureRecord("send", 0.0, okx.subscribe_messages()[0])] + [CaptureRecord("recv", 0.0, f) for f in frames]
    cap = Capture("OKX", {}, [CaptureConnection("OKX.ws.1", "wss://ws.okx.com:8443/ws/v5/public", records)], [])
    want = [str(i) for i in range(1, FRAMES * TRADES_PER_FRAME + 1)]
    with ReplayThread(ReplayServer(cap, okx)) as server:
        src = ExchangeSource("test-okx", "okx", SourceSettings(
            driver="okx", symbols=("BTC-USDT",), endpoint=server.ws_url, options={"max_frame_bytes": 64 * 1024},
        ))
        assert (src.max_payload_bytes, src.max_payload_setting) == (64 * 1024, "sources.test-okx.options.max_frame_bytes")
        ingest = Ingest(settings, src)
        runner = threading.Thread(target=ingest.run, name="ingest-okx", daemon=True)
        runner.start()
        try:
            deadline = time.monotonic() + WAIT_S
            while len(_stored_trade_ids(r, layout)) < len(want):
                assert time.monotonic() < deadline, f"stored {len(_stored_trade_ids(r, layout))}; {src.health}"
                time.sleep(0.05)
        finally:
            ingest.stop_event.set()
            runner.join(20)
    assert not runner.is_alive()
    assert sorted(_stored_trade_ids(r, layout), key=int) == want
    assert sum(r.xlen(s) for s in layout.dlq_streams()) == 0


def test_an_mqtt_source_is_bounded_by_mqtt_max_payload_bytes() -> None:
    src = create("mqtt", "line-1", settings=load_settings(mqtt={"max_payload_bytes": 300}))
    assert (src.max_payload_bytes, src.max_payload_setting) == (300, "mqtt.max_payload_bytes")
