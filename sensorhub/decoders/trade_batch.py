"""Columnar batch of exchange trades (one per ingest process of an exchange feed).

Columns: ``venue``, ``symbol`` (interned), ``trade_id`` (string), ``price``,
``amount``, ``side`` (0 unknown, 1 buy, 2 sell), ``ts_us`` (exchange time),
``recv_us``. ``begin``/``rollback`` as for readings: a message that fails to
parse leaves the batch as it was.
"""

from __future__ import annotations

from array import array
from typing import Any

SIDE_UNKNOWN, SIDE_BUY, SIDE_SELL = 0, 1, 2
SIDE_NAMES = ("unknown", "buy", "sell")


class TradeBatch:
    """Columnar trades with interned venue and symbol names."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.venue_idx: array[int] = array("I")
        self.symbol_idx: array[int] = array("I")
        self.trade_id: list[str] = []
        self.price: array[float] = array("d")
        self.amount: array[float] = array("d")
        self.side: array[int] = array("B")
        self.ts_us: array[int] = array("q")
        self.recv_us: array[int] = array("q")
        self.venues: list[str] = []
        self.symbols: list[str] = []
        self._venue_index: dict[str, int] = {}
        self._symbol_index: dict[str, int] = {}
        self._mark = (0, 0, 0)

    def __len__(self) -> int:
        return len(self.trade_id)

    def _intern(self, table: list[str], index: dict[str, int], name: str) -> int:
        i = index.get(name)
        if i is None:
            i = index[name] = len(table)
            table.append(name)
        return i

    def append(
        self,
        venue: str,
        symbol: str,
        trade_id: str,
        price: float,
        amount: float,
        side: int,
        ts_us: int,
        recv_us: int,
    ) -> None:
        if side not in (0, 1, 2):
            raise ValueError("side must be 0 (unknown), 1 (buy) or 2 (sell)")
        self.venue_idx.append(self._intern(self.venues, self._venue_index, venue))
        self.symbol_idx.append(self._intern(self.symbols, self._symbol_index, symbol))
        self.trade_id.append(trade_id)
        self.price.append(price)
        self.amount.append(amount)
        self.side.append(side)
        self.ts_us.append(ts_us)
        self.recv_us.append(recv_us)

    def begin(self) -> None:
        self._mark = (len(self.trade_id), len(self.venues), len(self.symbols))

    def rollback(self) -> None:
        n, nv, ns = self._mark
        for col in (self.venue_idx, self.symbol_idx, self.price, self.amount, self.side, self.ts_us, self.recv_us):
            del col[n:]
        del self.trade_id[n:]
        for name in self.venues[nv:]:
            del self._venue_index[name]
        del self.venues[nv:]
        for name in self.symbols[ns:]:
            del self._symbol_index[name]
        del self.symbols[ns:]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "venue": self.venues[self.venue_idx[i]],
                "symbol": self.symbols[self.symbol_idx[i]],
                "trade_id": self.trade_id[i],
                "price": self.price[i],
                "amount": self.amount[i],
                "side": SIDE_NAMES[self.side[i]],
                "ts_us": self.ts_us[i],
                "recv_us": self.recv_us[i],
            }
            for i in range(len(self.trade_id))
        ]
