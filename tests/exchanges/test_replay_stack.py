"""``sensorhub replay --stack``: a capture through the real ingest process, Redis, writer and ClickHouse.

The stored counts are compared with the independent plain-JSON count of
``test_replay_venues`` over the recorded frames.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
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


def test_replay_stack_failure_is_one_line_with_how_the_ingest_log_ends(stack_factory: Callable[..., Any]) -> None:
    # The ingest process dies while the recording is still being sent (at half the recorded pace).
    stack = stack_factory()
    capture("BINANCE")  # skips when the capture is not there
    argv = [
        sys.executable, "-m", "sensorhub", "--log-level", "WARNING", "replay", str(CAPTURES / "BINANCE.jsonl.zst"),
        "--venue", "binance", "--symbols", ",".join(SYMBOLS["BINANCE"]), "--speed", "0.5", "--stack", str(stack.dir),
    ]
    replay = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log_path = Path(stack.dir).resolve() / "logs" / f"replay-ingest-binance-{replay.pid}.log"
        deadline = time.monotonic() + 30
        while not (log_path.exists() and "connected to ws://" in log_path.read_text(errors="replace")):
            assert replay.poll() is None and time.monotonic() < deadline, f"no ingest connected; {replay.poll()}"
            time.sleep(0.1)
        (ingest,) = [p for p in psutil.Process(replay.pid).children() if "ingest" in p.cmdline()]
        ingest.send_signal(signal.SIGKILL)
        _out, err = replay.communicate(timeout=30)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.communicate()
    assert replay.returncode == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last_log_line = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1]
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]], err
    assert lines[-1].startswith("error: the ingest process ended (status -9) before the recording to be sent; "), err
    assert f"its log ends: {last_log_line[:300]}" in lines[-1] and lines[-1].endswith(f"({log_path})"), err

