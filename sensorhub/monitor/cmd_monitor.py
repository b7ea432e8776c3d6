"""``sensorhub monitor``: the live terminal status screen (or one frame, or JSON).

Reads only Redis (metrics snapshots, streams, audit counters, events) and
ClickHouse for today's stored totals; a ClickHouse that does not answer is
shown as down and retried. Keys: ``q`` quit, ``s`` cycle the source sort,
``d`` focus dead letters. Keys are read without blocking from a terminal in
cbreak mode, restored on every exit path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import time
from collections.abc import Iterator
from typing import Any

from sensorhub.config import load_settings, mask_url
from sensorhub.monitor.state import StateCollector
from sensorhub.monitor.view import SORTS, render
from sensorhub.pipeline.keys import StreamLayout

__all__ = ["build_collector", "run"]

def build_collector(args: argparse.Namespace) -> StateCollector:
    """The collector for the URLs the arguments (or the stack, or the settings) name."""
    from sensorhub.pipeline.redisconn import redis_client

    s = load_settings(getattr(args, "config", None))
    redis_url = args.redis or s.redis.url
    ch_url = args.clickhouse or s.clickhouse.url
    if args.stack is not None:
        from sensorhub.service.stack import stack_status

        st = stack_status(args.stack)
        ro = st.get("monitor", st)  # the read-only accounts
        redis_url = args.redis or ro["redis_url"]
        ch_url = args.clickhouse or ro["clickhouse_url"]
    ch_cfg = s.clickhouse.at(ch_url).model_copy(update={"connect_timeout_s": 1.0, "send_receive_timeout_s": 3.0})
    r = redis_client(s.redis, redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)

    def ch_factory() -> Any:
        from sensorhub.sinks.clickhouse import connect

        return connect(ch_cfg)

    return StateCollector(
        r,
        StreamLayout(s.redis.prefix, s.redis.partitions),
        group=s.redis.group,
        database=ch_cfg.database,
        ch_factory=None if args.no_clickhouse else ch_factory,
        ch_url="" if args.no_clickhouse else mask_url(ch_url),  # shown on screen and in --json
        redis_url=mask_url(redis_url),
        stale_after_s=args.stale_after,
        lag_alert_s=s.writer.lag_alert_s,
        ch_interval_s=2.0,
        disk_alert_days=s.metrics.disk_alert_days,
        disk_alert_free_pct=s.metrics.disk_alert_free_pct,
    )


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[bool]:
    """Terminal in cbreak mode (keys without Enter, no echo) and restored after; False if no tty."""
    if not os.isatty(fd):
        yield False
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _keys(fd: int, timeout: float) -> str:
    """Keys typed within ``timeout`` seconds (at most 64 bytes), without blocking longer."""
    r, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not r:
        return ""
    try:
        return os.read(fd, 64).decode(errors="ignore")
    except OSError:
        return ""


def _live(col: StateCollector, refresh: float, exit_after: float) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    sort_i = 0
    focus: str | None = None
    fd = sys.stdin.fileno()
    started = time.monotonic()

    def frame() -> Any:
        # measure the terminal at every frame (a COLUMNS exported at start would pin the size)
        try:
            w, h = os.get_terminal_size(sys.stdout.fileno())
            console.size = (w, h)
        except OSError:
            w, h = console.size
        return render(col.collect(), width=w, height=h, sort=SORTS[sort_i], focus=focus)

    with _cbreak(fd) as tty_keys, Live(
        frame(), console=console, screen=True, auto_refresh=False, vertical_overflow="crop", transient=True
    ) as live:
        next_at = time.monotonic() + refresh
        while exit_after <= 0 or time.monotonic() - started < exit_after:
            wait = next_at - time.monotonic()
            keys = _keys(fd, wait) if tty_keys else ""
            if not tty_keys and wait > 0:
                time.sleep(wait)
            changed = False
            for k in keys.lower():
                if k == "q":
                    return 0
                if k == "s":
                    sort_i = (sort_i + 1) % len(SORTS)
                    changed = True
                elif k == "d":
                    focus = None if focus == "dead" else "dead"
                    changed = True
            if changed or time.monotonic() >= next_at:
                live.update(frame(), refresh=True)
                next_at = time.monotonic() + refresh
    return 0


def run(args: argparse.Namespace) -> int:
    col = build_collector(args)
    if args.json:
        print(json.dumps(col.collect(), indent=1, default=str))
        return 0
    if args.once:
        from rich.console import Console

        console = Console(width=args.width or None, height=args.height or None)
        w, h = console.size
        console.print(render(col.collect(), width=w, height=args.height or h))
        return 0
    refresh = min(1.0, max(0.1, args.refresh))
    return _live(col, refresh, args.exit_after)
