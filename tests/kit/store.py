"""Counting rows in ClickHouse from a test, and waiting for a count to be reached."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["count", "wait_count"]


def count(ch: Any, sql: str) -> int:
    """The one number ``sql`` returns, e.g. ``SELECT count() FROM ...``."""
    return int(ch.command(sql))


def wait_count(ch: Any, sql: str, want: int, timeout: float = 60.0) -> int:
    """Poll ``sql`` until it returns at least ``want`` or ``timeout`` seconds pass; the last count."""
    deadline = time.monotonic() + timeout
    n = count(ch, sql)
    while n < want and time.monotonic() < deadline:
        time.sleep(0.2)
        n = count(ch, sql)
    return n
