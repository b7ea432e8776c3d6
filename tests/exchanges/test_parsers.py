"""Venue parsers on hand-made frames: bad input, Kraken v2, gaps, the recent-id bound, exports, module layering."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from sensorhub.config import SourceSettings
from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.errors import DecodeError, InvalidValue
from sensorhub.sources import exchanges
from sensorhub.sources.base import create, driver_names
from sensorhub.sources.exchanges import VENUES, ExchangeSource
from sensorhub.sources.exchanges.okx import Okx
from sensorhub.sources.exchanges.parsing import iso_to_us

BAD = [b"", b"{", b"not json", b'{"stream":"x@depth","data":{', b'{"arg":{"channel":"trades"},"data":[{"px":1}]}',
       b'{"channel":"market_trades","events":[{"trades":[{"product_id":"BTC-USD"}]}]}',
       b'[1,[["1.0","2.0","bad","b","l",""]],"trade","XBT/USD"]', b'{"topic":"publicTrade.BTCUSDT","data":[{}]}',
       b'{"stream":"btcusdt@aggTrade","data":{"s":"BTCUSDT","a":"x"}}', b"\xff\xfe"]


@pytest.mark.parametrize("venue", sorted(VENUES))
@pytest.mark.parametrize("payload", BAD)
def test_bad_frames_raise_decode_error_and_leave_batch(venue: str, payload: bytes) -> None:
    v = VENUES[venue](["BTC-USD"])
    batch = TradeBatch()
    batch.append("x", "y", "1", 1.0, 1.0, 0, 1, 1)
    try:
        n = v.parse(payload, 1_000, batch)
    except DecodeError:
        assert len(batch) == 1 and batch.symbols == ["y"]
        assert v.stats.parse_errors == 1
    else:  # a frame of another venue's shape may be a well-formed non-trade frame here
        assert n == 0 and len(batch) == 1


def test_kraken_v2_trades_snapshot_and_gap() -> None:
    v = VENUES["kraken"](["BTC-USD", "MATIC-USD"])
    assert v.url("wss://ws.kraken.com/v2").endswith("/v2") and v.api == "v2"
    sub = json.loads(v.subscribe_messages()[0])
    assert sub == {"method": "subscribe", "params": {"channel": "trade", "symbol": ["BTC/USD", "MATIC/USD"], "snapshot": True}}
    def msg(kind: str, ids: list[int]) -> bytes:
        data = [{"symbol": "MATIC/USD", "side": "buy", "price": 0.5147, "qty": 6423.46326, "ord_type": "limit",
                 "trade_id": i, "timestamp": "2023-09-25T07:49:37.708706Z"} for i in ids]
        return json.dumps({"channel": "trade", "type": kind, "data": data}).encode()
    b = TradeBatch()
    assert v.parse(msg("snapshot", [10, 11]), 5_000, b) == 2
    assert v.parse(msg("update", [11, 12]), 6_000, b) == 1  # 11 repeated
    assert v.parse(msg("update", [15]), 7_000, b) == 1
    rows = b.rows()
    assert rows[0] == {"venue": "kraken", "symbol": "MATIC-USD", "trade_id": "10", "price": 0.5147, "amount": 6423.46326,
                       "side": "buy", "ts_us": 1695628177708706, "recv_us": 5}
    assert (v.stats.duplicates, v.stats.gaps, v.stats.missing) == (1, 1, 2)
    assert v.parse(b'{"method":"pong"}', 1, b) == 0
    assert v.pong_for('{"method":"ping"}') == '{"method":"pong"}'


def test_kraken_v1_derived_ids_are_deterministic() -> None:
    frame = b'[993,[["354.11","0.5","1618678142.557535","s","l",""],["354.11","0.5","1618678142.557535","s","l",""]],"trade","XBT/USD"]'
    ids = []
    for _ in range(2):
        v = VENUES["kraken"](["BTC-USD"])
        b = TradeBatch()
        assert v.parse(frame, 1, b) == 2  # two equal fills in one message stay distinct
        ids.append(b.trade_id)
        assert b.symbols == ["BTC-USD"] and b.ts_us[0] == 1618678142557535
    assert ids[0] == ids[1] == ["1618678142.557535:0:354.11:0.5:s", "1618678142.557535:1:354.11:0.5:s"]


def test_coinbase_newest_first_is_not_a_gap_and_jumps_are() -> None:
    v = VENUES["coinbase"](["BTC-USD"])
    def msg(ids: list[int]) -> bytes:
        trades = [{"product_id": "BTC-USD", "trade_id": str(i), "price": "1.5", "size": "2", "time": "2026-08-09T21:05:42.5Z",
                   "side": "BUY"} for i in ids]
        return json.dumps({"channel": "market_trades", "events": [{"type": "update", "trades": trades}]},
                          separators=(",", ":")).encode()
    b = TradeBatch()
    assert v.parse(msg([3, 2, 1]), 1, b) == 3
    assert v.parse(msg([5, 4]), 1, b) == 2
    assert v.stats.gaps == 0
    assert v.parse(msg([9]), 1, b) == 1
    assert (v.stats.gaps, v.stats.missing) == (1, 3)
    assert b.ts_us[0] == iso_to_us("2026-08-09T21:05:42.500000Z")


def test_recent_id_set_is_bounded() -> None:
    v = VENUES["okx"](["BTC-USDT"], recent_trade_ids=2)
    def msg(i: int) -> bytes:
        return (b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT","tradeId":"%d",'
                b'"px":"1","sz":"1","side":"sell","ts":"1"}]}' % i)
    b = TradeBatch()
    for i in (1, 2, 3):
        v.parse(msg(i), 1, b)
    assert v.parse(msg(3), 1, b) == 0  # still remembered
    assert v.parse(msg(1), 1, b) == 1  # forgotten: the bound held, the store's key dedups it
    assert max(len(s) for s in v._recent.values()) <= 2


def test_symbols_and_amount_units() -> None:
    okx = VENUES["okx"](["UNI-USD-PERP", "BTC-USDT"])
    assert okx.venue_symbols == {"UNI-USD-PERP": "UNI-USD-SWAP", "BTC-USDT": "BTC-USDT"}
    assert okx.amount_unit("UNI-USD-PERP") == "contracts" and okx.amount_unit("BTC-USDT") == "base"
    by = VENUES["bybit"](["BTC-USDT-PERP"])
    assert by.connections() == ("linear",) and by.normal_symbol("SOLUSDT") == "SOL-USDT-PERP"
    assert by.connection_endpoint(by.default_endpoint(), "linear") == "wss://stream.bybit.com/v5/public/linear"
    assert VENUES["bybit"](["BTC-USD-PERP"]).amount_unit("BTC-USD-PERP") == "contracts"
    bn = VENUES["binance"](["NKN-USDT"])
    assert bn.url("ws://h:1") == "ws://h:1/stream?streams=nknusdt@trade"
    assert bn.normal_symbol("ETHBTC") == "ETH-BTC"


def test_iso_timestamps() -> None:
    assert iso_to_us("1970-01-01T00:00:01Z") == 1_000_000
    assert iso_to_us("2026-08-09T21:05:48.228568804Z") == iso_to_us("2026-08-09T21:05:48.228568Z")
    for bad in ("2026-08-09", "2026-08-09T21:05:48.1+02:00", "x" * 30):
        with pytest.raises(InvalidValue):
            iso_to_us(bad)


def test_exports_and_registry() -> None:
    assert exchanges.__all__ == ["VENUES", "ExchangeSource", "Venue", "register_venue", "venue_modules"]
    names = {"binance", "bitfinex", "bitstamp", "bybit", "coinbase", "gateio", "gemini", "htx", "kraken", "kucoin", "okx"}
    assert names <= set(driver_names())
    assert set(exchanges.venue_modules) == names


def _exchange_imports(path: Path) -> set[str]:
    """The ``sensorhub.sources.exchanges`` modules a module imports (last name part)."""
    prefix = "sensorhub.sources.exchanges."
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        out |= {n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)}
    return out


def test_dependencies_point_one_way() -> None:
    # venues -> parse framework -> helpers; the connection loop -> parse framework. Nothing imports back.
    folder = Path(exchanges.__file__).parent
    assert _exchange_imports(folder / "parsing.py") == set()
    assert _exchange_imports(folder / "venue.py") == {"parsing"}
    assert _exchange_imports(folder / "connection.py") == {"venue"}
    for name, module in exchanges.venue_modules.items():
        assert _exchange_imports(Path(str(module.__file__))) <= {"parsing", "venue"}, name
    assert not (folder / "base.py").exists()


def test_a_venue_registered_later_is_a_source_driver_too() -> None:
    # The connection loop makes every registered venue a driver, also one registered after it was imported.
    @exchanges.register_venue
    class LateVenue(Okx):
        name = "late-venue-test"

    try:
        assert VENUES["late-venue-test"] is LateVenue
        settings = SourceSettings(driver="late-venue-test", symbols=("BTC-USDT",))
        src = create("late-venue-test", "late", source_settings=settings)
        assert isinstance(src, ExchangeSource) and isinstance(src.venue, LateVenue)
        assert src.venue.symbols == ("BTC-USDT",)
    finally:
        VENUES.pop("late-venue-test", None)



def test_captures_are_found_beside_the_checkout_or_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No fixed absolute path: SENSORHUB_CAPTURES, else shared/captures beside the checkout, else a clear error."""
    import sensorhub.replay.capture as capture
    from sensorhub.errors import ConfigError

    monkeypatch.setenv("SENSORHUB_CAPTURES", str(tmp_path))
    assert capture.default_capture_dir() == tmp_path
    monkeypatch.delenv("SENSORHUB_CAPTURES")
    beside = Path(__file__).resolve().parents[2].parent / "shared" / "captures"
    if beside.is_dir():
        assert capture.default_capture_dir() == beside
    # a package installed outside any checkout has no shared/ beside it
    fake = tmp_path / "site-packages" / "sensorhub" / "replay" / "capture.py"
    monkeypatch.setattr(capture, "__file__", str(fake))
    with pytest.raises(ConfigError) as e:
        capture.default_capture_dir()
    assert "SENSORHUB_CAPTURES" in str(e.value)
