"""``sensorhub replay --stack`` with recordings of two markets, and with trade frames that keep failing.

Both run the real ingest process against the replay, into a running stack,
and read back what ClickHouse holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exchange_kit import SYMBOLS, capture
from injection_kit import bybit_spot_trades, bybit_with_spot, inject, write_capture
from test_replay_venues import expected_trades


def _replay_stack(path: Path, venue: str, stack_dir: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    argv = [sys.executable, "-m", "sensorhub", "replay", str(path), "--venue", venue, "--speed", "max",
            "--stack", str(stack_dir), "--stack-timeout", "20", *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"status {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    return out.returncode, dict(json.loads(lines[-1]))


def test_replay_stack_markets_and_failing_trade_frames(stack_factory: Callable[..., Any], tmp_path: Path) -> None:
    stack = stack_factory()

    # Bybit, both connections of the recording, the symbols of its header (spot pairs included).
    path = write_capture(bybit_with_spot(), tmp_path / "BYBIT-spot-linear.jsonl.zst")
    linear = {s: len(ids) for s, ids in expected_trades("BYBIT", capture("BYBIT").connections[0].frames()).items()}
    want = {**linear, **bybit_spot_trades()}
    status, result = _replay_stack(path, "bybit", stack.dir)
    assert status == 0 and result["complete"] is True, result
    assert {s: t["stored"] for s, t in result["trades"].items()} == want
    assert {s: t["expected"] for s, t in result["trades"].items()} == want
    assert result["connections"] == 2
    assert (result["dead_letters"], result["trade_frame_errors"], result["unhealthy"]) == (
        {"stored": 0, "expected": 0}, 0, None)

    # OKX with nine malformed trade frames: every valid trade stored, every bad frame a dead letter,
    # and the replay does not call the feed complete; the ingest reported it unhealthy.
    inj = inject("OKX")
    path = write_capture(inj.capture, tmp_path / "OKX-bad.jsonl.zst")
    want = {s: len(ids) for s, ids in expected_trades("OKX", inj.original.frames()).items()}
    status, result = _replay_stack(path, "okx", stack.dir, "--symbols", ",".join(SYMBOLS["OKX"]))
    assert status == 1 and result["complete"] is False, result
    assert {s: t["stored"] for s, t in result["trades"].items()} == want
    assert result["dead_letters"] == {"stored": 9, "expected": 9} and result["trade_frame_errors"] == 9
    assert result["unhealthy"] == "9 of the last 100 trade frames yielded no trade"

    ch = stack.ch()
    rows = ch.query("SELECT payload, error FROM sensorhub.dead_letters WHERE source = 'okx'").result_rows
    assert {p.encode() if isinstance(p, str) else p for p, _e in rows} == set(inj.bad)
    assert all("okx trade frame" in e for _p, e in rows)
    perps = ch.query(
        "SELECT symbol, uniqExact(trade_id) FROM sensorhub.trades FINAL WHERE venue = 'bybit' GROUP BY symbol"
    ).result_rows
    assert dict(perps) == {**linear, **bybit_spot_trades()}
