"""Stream entry codec for trades: a ``TradeBatch`` as one msgpack block.

Trade rates are thousands per second, not tens of thousands, so msgpack of
the columns (numeric columns as raw little-endian arrays) is ample.
"""

from __future__ import annotations

from array import array
from typing import Any

import msgspec

from sensorhub.errors import InvalidValue

__all__ = ["TradeBlock", "decode_trades", "encode_trades"]

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()
_NUM = (("venue_idx", "I"), ("symbol_idx", "I"), ("price", "d"), ("amount", "d"), ("side", "B"), ("ts_us", "q"), ("recv_us", "q"))


def encode_trades(batch: Any, decode_ns: int) -> bytes:
    doc: dict[str, Any] = {
        "v": 1,
        "decode_ns": decode_ns,
        "venues": batch.venues,
        "symbols": batch.symbols,
        "trade_id": batch.trade_id,
    }
    for name, _ in _NUM:
        doc[name] = getattr(batch, name).tobytes()
    return _enc.encode(doc)


class TradeBlock:
    venue_idx: array[int]
    symbol_idx: array[int]
    price: array[float]
    amount: array[float]
    side: array[int]
    ts_us: array[int]
    recv_us: array[int]

    def __init__(self, doc: dict[str, Any]) -> None:
        self.decode_ns = int(doc["decode_ns"])
        self.venues: list[str] = doc["venues"]
        self.symbols: list[str] = doc["symbols"]
        self.trade_id: list[str] = doc["trade_id"]
        n = len(self.trade_id)
        for name, code in _NUM:
            a = array(code)
            a.frombytes(doc[name])
            if len(a) != n:
                raise InvalidValue(f"trade block column {name} has {len(a)} values, expected {n}")
            setattr(self, name, a)

    def __len__(self) -> int:
        return len(self.trade_id)


def decode_trades(data: bytes) -> TradeBlock:
    try:
        doc = _dec.decode(data)
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise InvalidValue("not a version 1 trade block")
        return TradeBlock(doc)
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidValue(f"trade block does not decode: {exc}") from None
