"""Bitfinex, Bitstamp, Gemini, KuCoin, Gate and HTX parsers on hand-made frames."""

from __future__ import annotations

import gzip
import json

import pytest

from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.errors import ConfigError, DecodeError
from sensorhub.sources.exchanges import VENUES
from sensorhub.sources.exchanges.bitfinex import Bitfinex
from sensorhub.sources.exchanges.gateio import gate_ms_to_us
from sensorhub.sources.exchanges.htx import inflate


def _bitfinex() -> Bitfinex:
    v = Bitfinex(["BTC-USDT", "TESTBTC-TESTUSD"])
    b = TradeBatch()
    assert v.parse(b'{"event":"info","version":2,"serverId":"x","platform":{"status":1}}', 1, b) == 0
    assert v.parse(b'{"event":"subscribed","channel":"trades","chanId":17,"symbol":"tBTCUST","pair":"BTCUST"}', 1, b) == 0
    assert v.parse(b'{"event":"subscribed","channel":"book","chanId":18,"symbol":"tBTCUST","pair":"BTCUST"}', 1, b) == 0
    return v


def test_bitfinex_te_and_tu_store_one_trade_and_sequence_gaps_count() -> None:
    v = _bitfinex()
    b = TradeBatch()
    assert v.parse(b"[17,[[5,1618677442819,-0.5,60410],[4,1618677442000,0.25,60400]],1]", 2_000, b) == 2
    assert v.parse(b'[17,"te",[6,1618677443000,1.5,60420],2]', 3_000, b) == 1
    assert v.parse(b'[17,"tu",[6,1618677443000,1.5,60420],3]', 4_000, b) == 0
    assert v.parse(b'[17,"tu",[7,1618677444000,-2,60430],4]', 5_000, b) == 1  # te lost
    assert v.parse(b"[18,[[60400,1,0.5]],5]", 6_000, b) == 0  # a book: not stored
    assert v.parse(b'[17,"hb",6]', 7_000, b) == 0
    st = v.stats
    assert (st.duplicates, st.gaps) == (0, 0)  # a "tu" after its "te" is not a duplicate
    rows = b.rows()
    assert [r["trade_id"] for r in rows] == ["5", "4", "6", "7"]
    assert rows[0] == {"venue": "bitfinex", "symbol": "BTC-USDT", "trade_id": "5", "price": 60410.0, "amount": 0.5,
                       "side": "sell", "ts_us": 1618677442819000, "recv_us": 2}
    assert [r["side"] for r in rows] == ["sell", "buy", "buy", "sell"]
    assert v.parse(b'[17,"hb",9]', 8_000, b) == 0  # 7 and 8 never came
    assert (st.gaps, st.missing) == (1, 2)
    assert v.parse(b'{"event":"info","version":2}', 1, b) == 0  # a new connection
    assert v.parse(b'[17,"hb",1]', 1, b) == 0 and st.gaps == 1


def test_bitfinex_symbols_and_requests() -> None:
    v = VENUES["bitfinex"](["BTC-USDT", "TESTBTC-TESTUSD"])
    assert v.venue_symbols == {"BTC-USDT": "tBTCUST", "TESTBTC-TESTUSD": "tTESTBTC:TESTUSD"}
    assert v.normal_symbol("tETHBTC") == "ETH-BTC"
    subs = [json.loads(m) for m in v.subscribe_messages()]
    assert subs[0] == {"event": "conf", "flags": 65536}
    assert subs[1] == {"event": "subscribe", "channel": "trades", "symbol": "tBTCUST"}
    assert v.subscription_keys(v.subscribe_messages()[0]) == set()
    assert v.subscription_keys(v.subscribe_messages()[2]) == {"trades:TESTBTC-TESTUSD"}
    assert v.is_reconnect_request(b'{"event":"info","code":20051,"msg":"Stopping"}')
    assert not v.is_reconnect_request(b'{"event":"info","code":20060}')
    with pytest.raises(DecodeError):
        _bitfinex().parse(b'[17,"te",[6,"x",1.5,60420],2]', 1, TradeBatch())  # a trades channel: parsed


def test_bitstamp_trade_keys_in_any_order_and_reconnect_request() -> None:
    v = VENUES["bitstamp"](["ETH-USD"])
    b = TradeBatch()
    usual = (b'{"data":{"id":216000477,"timestamp":"1641343699","amount":0.0792,"amount_str":"0.07920000",'
             b'"price":3805.44,"price_str":"3805.44","type":1,"microtimestamp":"1641343699596000"},'
             b'"channel":"live_trades_ethusd","event":"trade"}')
    assert v.parse(usual, 5_000, b) == 1
    reordered = json.dumps({"event": "trade", "channel": "live_trades_ethusd", "data": {
        "id": 216000478, "amount": 1, "price": 3806, "type": 0, "microtimestamp": "1641343699600001"}}).encode()
    assert v.parse(reordered, 6_000, b) == 1
    assert v.parse(usual, 7_000, b) == 0 and v.stats.duplicates == 1
    rows = b.rows()
    assert rows[0]["side"] == "sell" and rows[0]["ts_us"] == 1641343699596000 and rows[1]["side"] == "buy"
    assert v.is_reconnect_request(b'{"event":"bts:request_reconnect","channel":"","data":""}')
    assert v.parse(b'{"event":"bts:request_reconnect","channel":"","data":""}', 1, b) == 0
    assert v.pong_for('{"event":"bts:heartbeat"}') is not None


def test_gemini_l2_trades_and_trade_messages() -> None:
    v = VENUES["gemini"](["BTC-USD", "BTC-USDC-PERP"])
    assert v.venue_symbols == {"BTC-USD": "BTCUSD", "BTC-USDC-PERP": "BTCUSDCPERP"}
    b = TradeBatch()
    first = json.dumps({"changes": [["buy", "1", "2"]], "symbol": "BTCUSDCPERP", "trades": [
        {"event_id": 1, "price": "65283.0", "quantity": "0.0006", "side": "buy", "symbol": "BTCUSDCPERP",
         "tid": 11, "timestamp": 1786291951123, "type": "trade"}], "type": "l2_updates"}, separators=(",", ":"))
    assert v.parse(first.encode(), 1_000, b) == 1
    later = b'{"type":"trade","symbol":"BTCUSD","event_id":3,"timestamp":1786291951200,"price":"9004.21","quantity":"0.0911","side":"sell","tid":12}'
    assert v.parse(later, 2_000, b) == 1
    assert v.parse(b'{"changes":[["buy","65205.5","0.0"]],"symbol":"BTCUSD","type":"l2_updates"}', 1, b) == 0
    assert [(r["symbol"], r["trade_id"], r["side"]) for r in b.rows()] == [("BTC-USDC-PERP", "11", "buy"),
                                                                          ("BTC-USD", "12", "sell")]
    with pytest.raises(DecodeError):
        v.parse(b'{"type":"trade","tid":1,"price":"1","quantity":"1","side":"buy","timestamp":1}', 1, b)


def test_kucoin_match_time_in_ns_and_token_response() -> None:
    v = VENUES["kucoin"](["BSV-USDT"])
    assert v.venue_symbols == {"BSV-USDT": "BCHSV-USDT"}
    b = TradeBatch()
    frame = (b'{"data":{"symbol":"BCHSV-USDT","sequence":"1","side":"sell","size":"0.5","price":"243.65",'
             b'"takerOrderId":"a","time":"1619378327739050725","type":"match","makerOrderId":"b",'
             b'"tradeId":"6085c09769bc506996295e36"},"subject":"trade.l3match","topic":"/market/match:BCHSV-USDT",'
             b'"type":"message"}')
    assert v.parse(frame, 9_000, b) == 1
    assert b.rows()[0]["ts_us"] == 1619378327739050 and b.rows()[0]["symbol"] == "BSV-USDT"
    body = json.loads(v.replay_http_response("POST", "/api/v1/bullet-public", "ws://127.0.0.1:5", None, 3, 0.5) or "")
    server = body["data"]["instanceServers"][0]
    assert (body["data"]["token"], server["endpoint"], server["pingInterval"]) == ("TOKEN-3", "ws://127.0.0.1:5/endpoint", 500)
    assert v.replay_http_response("GET", "/api/v1/symbols", "ws://x", "[]", 1, 1.0) is None
    assert v.pong_for('{"id":"ping","type":"ping"}') == '{"id":"ping","type":"pong"}'


def test_gate_exact_milliseconds() -> None:
    assert gate_ms_to_us("1619093543708.2642") == 1619093543708264
    assert gate_ms_to_us("1619093543708") == 1619093543708000
    for bad in ("", "x", "1.2.3", "-1"):
        with pytest.raises(DecodeError):
            gate_ms_to_us(bad)
    v = VENUES["gateio"](["DIS-USDT"])
    b = TradeBatch()
    frame = (b'{"time":1619093543,"channel":"spot.trades","event":"update","result":{"id":816995772,"create_time":1619093543,'
             b'"create_time_ms":"1619093543708.2642","side":"sell","currency_pair":"DIS_USDT","amount":"0.201","price":"121.58"}}')
    assert v.parse(frame, 1_000, b) == 1
    assert b.rows()[0] == {"venue": "gateio", "symbol": "DIS-USDT", "trade_id": "816995772", "price": 121.58,
                           "amount": 0.201, "side": "sell", "ts_us": 1619093543708264, "recv_us": 1}


def test_htx_gzip_ids_pings_and_bounds() -> None:
    v = VENUES["htx"](["TRIO-ETH"])
    b = TradeBatch()
    msg = (b'{"ch":"market.trioeth.trade.detail","ts":1618678027942,"tick":{"id":100182534526,"ts":1618678027940,'
           b'"data":[{"id":100182534526255757567432481,"ts":1618678027940,"tradeId":100045088885,"amount":20995.88,'
           b'"price":9.2E-7,"direction":"buy"}]}}')
    assert v.parse(gzip.compress(msg), 1_000, b) == 1
    assert b.rows()[0]["trade_id"] == "100045088885" and b.rows()[0]["symbol"] == "TRIO-ETH"
    ping = gzip.compress(b'{"ping":1618678073643}')
    assert v.server_ping_reply(ping) == '{"pong":1618678073643}'
    assert v.server_ping_reply(gzip.compress(msg)) is None
    assert v.server_ping_reply(b"\x1f\x8bnot gzip") is None
    bomb = gzip.compress(b"[" + b" " * 2_000_000 + b"]")
    with pytest.raises(DecodeError):
        VENUES["htx"](["TRIO-ETH"], {"max_inflated_bytes": 1_000_000}).parse(bomb, 1, b)
    with pytest.raises(DecodeError):
        v.parse(gzip.compress(msg)[:-12], 1, b)  # cut short
    assert inflate(gzip.compress(b"{}"), 10) == b"{}"
    with pytest.raises(ConfigError):
        VENUES["htx"](["TRIO-ETH"], {"max_inflated_bytes": 0})
    assert v.subscription_keys('{"pong":1}') == set()
    assert v.subscription_keys('{"sub":"market.trioeth.trade.detail","id":"1"}') == {"trade.detail:TRIO-ETH"}
