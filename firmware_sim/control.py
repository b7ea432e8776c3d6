"""The simulator's control connection: Sparkplug B rebirth commands, received with aiomqtt.

A Sparkplug host that has lost a node's state (metrics named only by an
alias it never saw born, a seq gap, data before a birth) publishes an NCMD
with ``Node Control/Rebirth`` = true to ``spBv1.0/<group>/NCMD/<edge node>``;
the node must answer with a new NBIRTH. The simulated nodes publish over
the hand-framed connections of :mod:`firmware_sim.mqtt`, which are built for
throughput; the rare commands come in over one aiomqtt client per simulator
process, where a readable asyncio client matters more than CPU.

The NCMD is decoded here with a small protobuf reader of its own, written
from the Sparkplug B schema and not shared with ``sensorhub/decoders``, so
that the host's encoder and this reader check each other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable

import aiomqtt

__all__ = ["NCMD_FILTER", "REBIRTH_METRIC", "listen", "rebirth_requested"]

log = logging.getLogger(__name__)

REBIRTH_METRIC = "Node Control/Rebirth"
NCMD_FILTER = "spBv1.0/+/NCMD/+"

# Sparkplug B Payload: metrics = 2 (repeated Metric); Metric: name = 1, boolean_value = 14
_PAYLOAD_METRICS, _METRIC_NAME, _METRIC_BOOLEAN = 2, 1, 14


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Top-level (field number, value) pairs of a protobuf message; ValueError if malformed."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
            out.append((field, v))
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            out.append((field, buf[i:i + n]))
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > len(buf):
                raise ValueError("truncated fixed field")
        else:
            raise ValueError(f"wire type {wire}")
    return out


def rebirth_requested(payload: bytes) -> bool:
    """True if an NCMD payload sets ``Node Control/Rebirth`` to true; False for anything else,
    malformed payloads included (a bad command must not stop the simulator)."""
    try:
        for field, value in _fields(payload):
            if field != _PAYLOAD_METRICS or not isinstance(value, bytes):
                continue
            metric = dict(_fields(value))
            if metric.get(_METRIC_NAME) == REBIRTH_METRIC.encode() and metric.get(_METRIC_BOOLEAN) == 1:
                return True
    except ValueError:
        return False
    return False


async def listen(
    host: str,
    port: int,
    client_id: str,
    on_rebirth: Callable[[str, str], None],
    ready: asyncio.Event | None = None,
    *,
    backoff_s: float = 0.2,
    backoff_max_s: float = 5.0,
    username: str | None = None,
    password: str | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> None:
    """Call ``on_rebirth(group, edge_node)`` for every rebirth NCMD, until cancelled.

    Subscribes to :data:`NCMD_FILTER` at QoS 1 on a clean session; ``ready`` is set
    once the subscription is acknowledged. A lost connection is retried forever,
    with capped exponential backoff and jitter. ``username``/``password`` and
    ``tls_context`` (from :func:`sensorhub.security.tlsctx.client_context`) as for
    the publishing connections.
    """
    delay = backoff_s
    while True:
        try:
            async with aiomqtt.Client(host, port, identifier=client_id, clean_session=True, keepalive=30,
                                      username=username, password=password, tls_context=tls_context) as client:
                await client.subscribe(NCMD_FILTER, qos=1)
                delay = backoff_s
                if ready is not None:
                    ready.set()
                async for message in client.messages:
                    parts = str(message.topic).split("/")
                    payload = message.payload
                    if len(parts) == 4 and isinstance(payload, bytes | bytearray) and rebirth_requested(bytes(payload)):
                        on_rebirth(parts[1], parts[3])
        except aiomqtt.MqttError as exc:
            log.debug("control connection %s: %s; again in %.1f s", client_id, exc, delay)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, backoff_max_s)
