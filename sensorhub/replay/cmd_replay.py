"""``sensorhub replay CAPTURE --venue NAME``: serve a recorded capture on loopback like the venue.

Prints one JSON line with the URLs to stdout once listening (give ``ws_url``
to a source as its endpoint override), then replays until every recorded
connection was sent (with ``--exit-when-done``) or until interrupted, and
prints a JSON summary.

``--stack DIR`` runs the venue's real ingest process against the replay, into
the stack running in ``DIR`` (``sensorhub stack up --dir DIR``): it writes a
small configuration naming the replay as the source's endpoint, starts
``python -m sensorhub --config TMP.toml ingest --source <venue>`` with the
stack's Redis and ClickHouse URLs, waits (bounded) until every recorded
connection the source's symbols need was sent (Bybit: its spot and its linear
connection) and every trade in them is in ClickHouse ``trades`` and every
frame that does not decode is in ``dead_letters``, stops the child and
prints ``{"venue", "frames_sent", "connections", "drops", "trades": {symbol:
{"stored", "expected"}}, "dead_letters": {"stored", "expected"},
"trade_frame_errors", "unhealthy", "complete"}``. ``expected`` is what a
fresh instance of the venue's parser reads from the frames that were sent
(each connection's frames as its market's); ``stored`` the distinct trade
ids in ClickHouse for that venue and symbol, and the distinct dead letters of
the source. ``trade_frame_errors`` counts the frames on a trade channel that
yielded no trade, ``unhealthy`` is the reason the ingest's last published
health gave (what the monitor shows), or null. ``complete`` is true only
when every trade is stored, every dead letter too, and no trade frame failed:
a failed trade frame held trades that are not stored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sensorhub.config import load_settings
from sensorhub.decoders.trade_batch import TradeBatch
from sensorhub.errors import ConfigError, DecodeError, SensorhubError
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.replay.capture import Capture, read_capture
from sensorhub.replay.server import ReplayServer, ReplayThread
from sensorhub.sources.exchanges import VENUES


def run(args: argparse.Namespace) -> int:
    """Serve the capture; see the module docstring."""
    if args.venue not in VENUES:
        raise ConfigError("--venue", "one of " + ", ".join(sorted(VENUES)), args.venue)
    cap = read_capture(args.capture)
    symbols = [s for s in args.symbols.split(",") if s] or list(cap.header.get("config", {}).get("trades", []))
    if not symbols:
        raise ConfigError("--symbols", "at least one symbol (the capture header lists none)")
    venue = VENUES[args.venue](symbols)
    if args.stack:
        return _run_stack(args, cap, symbols)
    server = ReplayServer(
        cap, venue, host=args.host, port=args.port, http_port=args.http_port, speed=args.speed,
        drop_after=args.drop_after or None, drops=args.drops, overlap=args.overlap, strict=args.strict,
    )
    return asyncio.run(_serve(server, args.exit_when_done))


async def _serve(server: ReplayServer, exit_when_done: bool) -> int:
    await server.start()
    print(json.dumps({"venue": server.capture.exchange, "ws_url": server.ws_url, "http_url": server.http_url}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    waiters = [asyncio.create_task(stop.wait(), name="replay-stop")]
    if exit_when_done:
        waiters.append(asyncio.create_task(server.all_sent.wait(), name="replay-done"))
    _done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    if exit_when_done and server.all_sent.is_set():
        await asyncio.sleep(0.2)  # let the last frames leave before closing
    await server.stop()
    st = server.stats
    summary = {
        "venue": server.capture.exchange,
        "frames_sent": st.frames_sent,
        "connections": st.connections,
        "drops": st.drops,
        "pings_answered": st.pings_answered,
        "http_requests": st.http_requests,
        "subscribe_mismatches": sorted(set(st.subscribe_mismatches)),
    }
    print(json.dumps(summary), file=sys.stdout, flush=True)
    return 0


# --------------------------------------------------------------------------- --stack

STOP_TIMEOUT_S = 15.0


def _run_stack(args: argparse.Namespace, cap: Capture, symbols: list[str]) -> int:
    from sensorhub.service.stack import stack_status

    stack_dir = Path(args.stack).resolve()
    info = stack_status(stack_dir)
    if not info.get("running"):
        raise ConfigError("--stack", f"a running stack in {stack_dir} (`sensorhub stack up --dir {stack_dir}`)")
    venue_name = args.venue
    if not venue_name.isidentifier():
        raise ConfigError("--venue", "a venue driver name", venue_name)
    settings = load_settings(args.config)
    database = settings.clickhouse.database
    prefix = settings.redis.prefix
    server = ReplayServer(
        cap, VENUES[venue_name](symbols), host=args.host, port=args.port, http_port=args.http_port, speed=args.speed,
        drop_after=args.drop_after or None, drops=args.drops, overlap=args.overlap, strict=args.strict,
    )
    span = _ws_span_s(cap) / (args.speed or 1e9)
    logs = stack_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with ReplayThread(server), tempfile.TemporaryDirectory(prefix=f"replay-{venue_name}-", dir=stack_dir) as tmp:
        cfg = Path(tmp) / "sensorhub.toml"
        cfg.write_text(_source_toml(venue_name, symbols, server))
        env = {**os.environ, "SENSORHUB_REDIS_URL": info["redis_url"], "SENSORHUB_CLICKHOUSE_URL": info["clickhouse_url"],
               "PYTHONUNBUFFERED": "1"}
        log_path = logs / f"replay-ingest-{venue_name}-{os.getpid()}.log"
        with log_path.open("ab") as log_f:
            child = subprocess.Popen(
                [sys.executable, "-m", "sensorhub", "--config", str(cfg), "ingest", "--source", venue_name],
                env=env, stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        try:
            markets = set(server.venue.connections()) if server.venue is not None else set()
            _wait(lambda: server.served_done and server.sent_markets(markets), span + 60.0, child, log_path,
                  "the recording to be sent")
            expected = _expected(server, venue_name, symbols)
            stored: dict[str, int] = {}
            dead_stored = [0]
            health: dict[str, Any] = {}

            def complete() -> bool:
                stored.clear()
                stored.update(_stored(info["clickhouse_url"], database, venue_name))
                dead_stored[0] = _stored_dead_letters(info["clickhouse_url"], database, venue_name)
                health.clear()
                health.update(_published(info["redis_url"], prefix, venue_name, child.pid))
                counters = health.get("counters", {})
                return (
                    all(stored.get(sym, 0) >= n for sym, n in expected.trades.items())
                    and dead_stored[0] >= expected.dead_letters
                    # the health published after the ingest took the last frame (what the monitor shows)
                    and int(counters.get("dead_letters", 0)) >= expected.dead_letters
                    and int(counters.get("trades", 0)) >= sum(expected.trades.values())
                )

            done = _wait(complete, args.stack_timeout, child, log_path, "the trades and dead letters in ClickHouse",
                         raise_=False)
        finally:
            _stop(child)
    unhealthy = health.get("gauges", {}).get("unhealthy") or None
    result: dict[str, Any] = {
        "venue": venue_name,
        "frames_sent": server.stats.frames_sent,
        "connections": server.stats.connections,
        "drops": server.stats.drops,
        "trades": {sym: {"stored": stored.get(sym, 0), "expected": expected.trades.get(sym, 0)}
                   for sym in sorted(set(stored) | set(expected.trades))},
        "dead_letters": {"stored": dead_stored[0], "expected": expected.dead_letters},
        "trade_frame_errors": expected.trade_frame_errors,
        "unhealthy": unhealthy,
        "complete": done and expected.trade_frame_errors == 0,
    }
    print(json.dumps(result), flush=True)
    return 0 if result["complete"] else 1


def _ws_span_s(cap: Capture) -> float:
    ts = [r.ts for c in cap.connections for r in c.records if r.kind == "recv"]
    return max(ts) - min(ts) if ts else 0.0


def _toml_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


def _source_toml(venue_name: str, symbols: list[str], server: ReplayServer) -> str:
    lines = [
        f"[sources.{venue_name}]",
        f"driver = {_toml_str(venue_name)}",
        "symbols = [" + ", ".join(_toml_str(s) for s in symbols) + "]",
        f"endpoint = {_toml_str(server.ws_url)}",
    ]
    if "rest_url" in VENUES[venue_name].options and server.http_url:
        # the venue's pre-connect REST step (KuCoin's token) goes to the replay too
        lines.append(f"options = {{ rest_url = {_toml_str(server.http_url)} }}")
    return "\n".join(lines) + "\n"


def _wait(
    cond: Any, timeout_s: float, child: subprocess.Popen[bytes], log_path: Path, what: str, raise_: bool = True
) -> bool:
    # A failure is one line (the command line shows one): what failed, how the ingest's log ends, where it is.
    deadline = time.monotonic() + timeout_s
    while True:
        if cond():
            return True
        if child.poll() is not None:
            raise SensorhubError(
                f"the ingest process ended (status {child.returncode}) before {what}; "
                f"its log ends: {_last_log_line(log_path)} ({log_path})"
            )
        if time.monotonic() >= deadline:
            if raise_:
                raise SensorhubError(
                    f"timed out after {timeout_s:.0f} s waiting for {what}; "
                    f"the ingest's log ends: {_last_log_line(log_path)} ({log_path})"
                )
            return False
        time.sleep(0.25)


LOG_LINE_MAX = 300  # characters of the log's last line quoted in an error


def _last_log_line(log_path: Path) -> str:
    """The last non-empty line of a log (an ingest that failed says why there), cut to ``LOG_LINE_MAX``."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * LOG_LINE_MAX))
            tail = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc.strerror})"
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    if not lines:
        return "(nothing)"
    line = lines[-1]
    return line[:LOG_LINE_MAX] + "..." if len(line) > LOG_LINE_MAX else line


@dataclass
class _Expected:
    """What a fresh parser reads from the frames that were sent."""

    trades: dict[str, int]  # distinct trades per symbol
    dead_letters: int  # distinct frames that do not decode (the ingest dead-letters each once)
    trade_frame_errors: int  # of those, frames on a trade channel


def _expected(server: ReplayServer, venue_name: str, symbols: list[str]) -> _Expected:
    """Distinct trades per symbol, and the frames that fail, in the recorded connections that were served."""
    venue = VENUES[venue_name](symbols, recent_trade_ids=1 << 22)
    batch = TradeBatch()
    now = time.time_ns()
    failed: set[tuple[str, bytes]] = set()
    trade_failed: set[tuple[str, bytes]] = set()
    for conn in server.served_connections():
        market = server.market_of(conn)
        for frame in conn.frames():
            raw = frame if isinstance(frame, bytes) else frame.encode()
            if venue.answers_server_pings and venue.server_ping_reply(raw) is not None:
                continue  # answered by the feed, never handed to the ingest
            try:
                venue.parse(raw, now, batch, market)
            except DecodeError:  # the ingest dead-letters these too
                failed.add((market, raw))
                if venue.trade_frame:
                    trade_failed.add((market, raw))
    counts: dict[str, int] = {}
    for i in batch.symbol_idx:
        sym = batch.symbols[i]
        counts[sym] = counts.get(sym, 0) + 1
    return _Expected(counts, len(failed), len(trade_failed))


def _stored(clickhouse_url: str, database: str, venue_name: str) -> dict[str, int]:
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        client = clickhouse_connect.get_client(dsn=clickhouse_url)
        try:
            # venue_name is a registry key (letters only) and database a validated identifier: safe to inline
            rows = client.query(
                f"SELECT symbol, uniqExact(trade_id) FROM {database}.trades WHERE venue = '{venue_name}' GROUP BY symbol"
            ).result_rows
        finally:
            client.close()
    except (ClickHouseError, OSError):
        return {}  # the table may not exist before the writer's first insert
    return {str(sym): int(n) for sym, n in rows}


def _stored_dead_letters(clickhouse_url: str, database: str, venue_name: str) -> int:
    """Distinct dead letters of the source in ClickHouse."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        client = clickhouse_connect.get_client(dsn=clickhouse_url)
        try:
            # venue_name is a registry key (letters only) and database a validated identifier: safe to inline
            n: Any = client.command(
                f"SELECT uniqExact(topic, payload) FROM {database}.dead_letters WHERE source = '{venue_name}'"
            )
            return int(n or 0)
        finally:
            client.close()
    except (ClickHouseError, OSError):
        return 0  # the table may not exist before the writer's first insert


def _published(redis_url: str, prefix: str, venue_name: str, pid: int) -> dict[str, Any]:
    """The metrics snapshot the ingest child published last (``{}`` before its first)."""
    import redis

    key = StreamLayout(prefix, 1).metrics_key(f"ingest:{venue_name}:{socket.gethostname()}:{pid}")
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        try:
            raw = client.hget(key, "state")
        finally:
            client.close()
        snap = json.loads(raw) if raw else {}
    except (redis.RedisError, ValueError):
        return {}
    return snap if isinstance(snap, dict) else {}


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)  # the ingest drains what it holds and exits
        try:
            child.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)
