"""``sensorhub replay --stack``: a capture through the real ingest process, Redis, writer and ClickHouse.

The stored counts are compared with the independent plain-JSON count of
``test_replay_venues`` over the recorded frames.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from exchange_kit import CAPTURES, SYMBOLS, capture, driver
from test_replay_venues import expected_trades, served_connection


def _replay_stack(exchange: str, stack_dir: str, *extra: str) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "sensorhub", "replay", str(CAPTURES / f"{exchange}.jsonl.zst"),
        "--venue", driver(exchange), "--symbols", ",".join(SYMBOLS[exchange]), "--speed", "max",
        "--stack", stack_dir, "--stack-timeout", "20", *extra,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, f"status {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def test_replay_stack_stores_every_trade_once(stack_factory: Callable[..., Any]) -> None:
    stack = stack_factory()
    # Bitfinex (channel ids, snapshots), KuCoin (token over REST first), HTX (gzip frames, server pings),
    # Bitstamp with a dropped connection (the trade comes again after the reconnect).
    runs = [("BITFINEX", ()), ("KUCOIN", ()), ("HUOBI", ()), ("BITSTAMP", ("--drop-after", "230", "--overlap", "60"))]
    for exchange, extra in runs:
        frames = served_connection(exchange).frames()
        want = {s: len(ids) for s, ids in expected_trades(exchange, frames).items()}
        result = _replay_stack(exchange, str(stack.dir), *extra)
        assert result["venue"] == driver(exchange)
        assert result["complete"] is True
        assert {s: t["stored"] for s, t in result["trades"].items()} == want, exchange
        assert result["frames_sent"] >= len(capture(exchange).connections[0].frames())
        assert (result["connections"], result["drops"]) == ((2, 1) if extra else (1, 0))

    # Straight from ClickHouse: one row per trade after merging, every venue there.
    ch = stack.ch()
    rows = ch.query("SELECT venue, count(), uniqExact(symbol, trade_id) FROM sensorhub.trades FINAL GROUP BY venue").result_rows
    by_venue = {v: (n, u) for v, n, u in rows}
    assert set(by_venue) == {"bitfinex", "kucoin", "htx", "bitstamp"}
    assert all(n == u for n, u in by_venue.values())
    assert by_venue["bitfinex"][1] == 210 and by_venue["bitstamp"][1] == 1
