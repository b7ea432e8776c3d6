"""``sensorhub replay CAPTURE --venue NAME``: serve a recorded capture on loopback like the venue.

Prints one JSON line with the URLs to stdout once listening (give ``ws_url``
to a source as its endpoint override), then replays until every recorded
connection was sent (with ``--exit-when-done``) or until interrupted, and
prints a JSON summary. ``--stack DIR`` (run the venue's ingest source against
the replay and wait for every trade in ClickHouse) needs the ``stack``
command of the pipeline and is refused until that command exists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

from sensorhub.errors import ConfigError
from sensorhub.replay.capture import read_capture
from sensorhub.replay.server import ReplayServer
from sensorhub.sources.exchanges import VENUES

HELP = "serve a recorded exchange capture on a loopback WebSocket, as the venue would"


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a positive number or 'max'") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("a positive number or 'max'")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``sensorhub replay``."""
    p.add_argument("capture", type=Path, help="capture file (*.jsonl.zst)")
    p.add_argument("--venue", required=True, help="venue driver: " + ", ".join(sorted(VENUES)))
    p.add_argument("--symbols", default="", help="comma-separated normalized symbols (default: the capture header's trades)")
    p.add_argument("--speed", type=_speed, default=1.0, help="N times the recorded pace, or 'max' (default 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port")
    p.add_argument("--http-port", type=int, default=0, help="REST replay port when the capture holds REST exchanges")
    p.add_argument("--drop-after", type=int, default=0, help="drop a connection after N frames (reconnect tests)")
    p.add_argument("--drops", type=int, default=1, help="how many connections to drop in all")
    p.add_argument("--overlap", type=int, default=20, help="frames resent after a drop")
    p.add_argument("--strict", action="store_true", help="close connections that subscribe to what the capture lacks")
    p.add_argument("--exit-when-done", action="store_true", help="exit once every recorded connection was sent")
    p.add_argument("--stack", metavar="DIR", help="run the venue's ingest against the replay (needs `sensorhub stack`)")


def run(args: argparse.Namespace) -> int:
    """Serve the capture; see the module docstring."""
    if args.venue not in VENUES:
        raise ConfigError("--venue", "one of " + ", ".join(sorted(VENUES)), args.venue)
    if args.stack:
        from sensorhub.cli import COMMANDS

        if "stack" not in COMMANDS:
            raise ConfigError("--stack", "the `sensorhub stack` command, which this installation does not have yet")
        raise ConfigError("--stack", "a pipeline whose stack mode is wired to replay (not implemented yet)")
    cap = read_capture(args.capture)
    symbols = [s for s in args.symbols.split(",") if s] or list(cap.header.get("config", {}).get("trades", []))
    if not symbols:
        raise ConfigError("--symbols", "at least one symbol (the capture header lists none)")
    venue = VENUES[args.venue](symbols)
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
