"""Recorded exchange traffic: the capture reader and a loopback replay server.

:func:`read_capture` reads the recorded-traffic capture format (``shared/captures`` beside the checkout)
(``*.jsonl.zst``); :class:`ReplayServer` serves one capture over a local
WebSocket (and HTTP for recorded REST exchanges) so that an exchange source
runs unmodified against it through its endpoint override.
"""

from __future__ import annotations

from sensorhub.replay.capture import (
    Capture,
    CaptureConnection,
    CaptureRecord,
    HttpExchange,
    read_capture,
)
from sensorhub.replay.server import ReplayServer, ReplayStats, ReplayThread

__all__ = [
    "Capture",
    "CaptureConnection",
    "CaptureRecord",
    "HttpExchange",
    "ReplayServer",
    "ReplayStats",
    "ReplayThread",
    "read_capture",
]
