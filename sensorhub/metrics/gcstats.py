"""How long the cyclic garbage collector stops this process, and keeping it short.

A pause of the collector stops every thread of the process (it holds the
GIL), so on the data path it shows up directly as latency. The processes
publish what the collector cost them (:func:`snapshot`), and the monitor can
point at it when a percentile drifts.

:func:`settle` is called once a long-running process has finished starting:
it collects once, then freezes every object that exists (modules, settings,
decoders, caches built at start) into the collector's permanent generation,
so later full collections walk only what the data path created since.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

__all__ = ["install", "settle", "snapshot"]

_lock = threading.Lock()
_state = {"collections": 0, "pause_total_us": 0, "pause_max_us": 0, "gen2": 0}
_started = 0.0
_installed = False


def _callback(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    us = int((time.perf_counter() - _started) * 1e6)
    with _lock:
        _state["collections"] += 1
        _state["pause_total_us"] += us
        if us > _state["pause_max_us"]:
            _state["pause_max_us"] = us
        if info.get("generation") == 2:
            _state["gen2"] += 1


def install() -> None:
    """Start timing the collector's pauses (idempotent)."""
    global _installed
    if not _installed:
        gc.callbacks.append(_callback)
        _installed = True


def settle() -> None:
    """After start-up: one collection, then everything that exists leaves the collector's view."""
    install()
    gc.collect()
    gc.freeze()


def snapshot() -> dict[str, Any]:
    """Collections and pauses since the last snapshot (the maximum restarts each time)."""
    with _lock:
        out = {
            "collections": _state["collections"],
            "full_collections": _state["gen2"],
            "pause_total_ms": round(_state["pause_total_us"] / 1000, 3),
            "pause_max_ms": round(_state["pause_max_us"] / 1000, 3),
            "frozen_objects": gc.get_freeze_count(),
        }
        _state["pause_max_us"] = 0
    return out
