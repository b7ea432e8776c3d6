"""The Source interface and the registry of source drivers.

A source produces raw frames ``(topic, payload, recv_ns, ack_token)``. The
ingest loop decodes them, writes the readings to Redis, and only then calls
:meth:`Source.ack` with the frames' tokens. Sources know nothing of Redis or
ClickHouse. A driver registers itself by name with :func:`register`; the
ingest process looks it up with :func:`create` and nothing in the pipeline
changes when a driver is added.

Sources run their network I/O on their own thread (paho's loop, or an asyncio
loop for WebSocket feeds) and hand frames over through a bounded queue, so a
slow pipeline pushes back on the network instead of growing memory.
"""

from __future__ import annotations

import abc
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from sensorhub.errors import ConfigError

__all__ = [
    "DELIVERY_DUP",
    "DELIVERY_PACKET_ID_SHIFT",
    "DELIVERY_REPLAY",
    "DELIVERY_RETAIN",
    "Decoder",
    "Frame",
    "FrameQueue",
    "Source",
    "SourceHealth",
    "create",
    "driver_names",
    "register",
]

RecordKind = Literal["reading", "trade"]


#: ``Frame.delivery`` bits: the broker sends this message again (MQTT DUP) ...
DELIVERY_DUP = 1
#: ... it was published with the retain flag (MQTT RETAIN, Retain As Published) ...
DELIVERY_RETAIN = 2
#: ... it is the topic's stored retained message, handed over because the subscription is new ...
DELIVERY_REPLAY = 4
#: ... and the MQTT packet id sits above these bits (0: QoS 0, or not MQTT)
DELIVERY_PACKET_ID_SHIFT = 3


class Frame(NamedTuple):
    """One raw message as it arrived: nothing decoded yet.

    ``delivery`` is what the transport says about this delivery, for telling a
    redelivery from a new message: the MQTT packet id shifted by
    :data:`DELIVERY_PACKET_ID_SHIFT` with the ``DELIVERY_*`` bits, 0 for
    sources that never redeliver.
    """

    topic: str
    payload: bytes
    recv_ns: int
    ack_token: Any
    delivery: int = 0


class Decoder(Protocol):
    """Decodes one payload and appends its records to ``batch``.

    Returns the number of records appended. Raises a ``DecodeError`` subclass
    for invalid input and leaves ``batch`` exactly as it was.
    """

    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int: ...


@dataclass
class SourceHealth:
    """What a source tells the operator about itself."""

    connected: bool = False
    reconnects: int = 0
    last_frame_ns: int = 0
    frames: int = 0
    gaps: int = 0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class FrameQueue:
    """Bounded hand-over of frames from a network thread to the ingest loop.

    When it is full the producer stops reading its socket, which lets the
    peer's flow control (MQTT receive maximum, TCP) push back. ``put`` blocks
    (with a timeout) for that; a producer on an event loop, which must not
    block, uses ``put_or_wake`` and awaits its own wake-up instead.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._wakers: list[Callable[[], None]] = []  # at most one per waiting producer
        self.high_water = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, frame: Frame, timeout: float | None = None) -> bool:
        """Append ``frame``, waiting up to ``timeout`` seconds for room; False if there was none."""
        with self._cond:
            if len(self._items) >= self.maxsize and not self._cond.wait_for(
                lambda: len(self._items) < self.maxsize, timeout
            ):
                return False
            self._append(frame)
        return True

    def put_or_wake(self, frame: Frame, wake: Callable[[], None]) -> bool:
        """Append ``frame`` if there is room (True); never waits.

        When full it returns False and calls ``wake`` once, on the consumer's
        thread, as soon as :meth:`get_many` has made room; the producer then
        tries again. Checked and registered under one lock, so no wake-up is missed.
        """
        with self._cond:
            if len(self._items) >= self.maxsize:
                self._wakers.append(wake)
                return False
            self._append(frame)
        return True

    def _append(self, frame: Frame) -> None:
        self._items.append(frame)
        n = len(self._items)
        if n > self.high_water:
            self.high_water = n
        if n == 1:
            self._cond.notify_all()

    def get_many(self, max_n: int, timeout: float) -> list[Frame]:
        """Up to ``max_n`` frames; waits at most ``timeout`` seconds for the first."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: bool(self._items), timeout):
                return []
            items = self._items
            n = min(max_n, len(items))
            out = [items.popleft() for _ in range(n)]
            self._cond.notify_all()
            wakers = None
            if self._wakers:
                wakers, self._wakers = self._wakers, []
        if wakers:
            for wake in wakers:
                wake()
        return out


class Source(abc.ABC):
    """A producer of raw frames, run by one ingest process."""

    #: ``"reading"`` for devices, ``"trade"`` for exchange feeds.
    kind: RecordKind = "reading"
    #: What the packet ids in ``Frame.delivery`` belong to (the MQTT client id of
    #: the persistent session); empty for sources that never redeliver.
    session_id: str = ""
    #: The most messages the peer may have sent and not had acknowledged
    #: (MQTT's receive maximum): a redelivery is among that many last frames.
    inflight_bound: int = 0
    #: The largest payload the ingest decodes; a larger one is a dead letter. Each driver sets
    #: its own from its settings (MQTT ``mqtt.max_payload_bytes``, an exchange feed its frame bound) ...
    max_payload_bytes: int = 1 << 20
    #: ... and names that setting here, for the dead letter's reason.
    max_payload_setting: str = "the source's payload bound"

    def __init__(self, name: str) -> None:
        self.name = name
        self.health = SourceHealth()

    @abc.abstractmethod
    def start(self) -> None:
        """Begin connecting in the background; returns at once."""

    @abc.abstractmethod
    def get(self, max_n: int, timeout_s: float) -> list[Frame]:
        """Frames received so far, up to ``max_n``, waiting up to ``timeout_s`` for one."""

    @abc.abstractmethod
    def ack(self, tokens: Sequence[Any]) -> None:
        """Acknowledge upstream frames whose records are now in Redis."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop taking new frames and disconnect."""

    @abc.abstractmethod
    def decoder_for(self, topic: str) -> tuple[Decoder, str | None] | None:
        """The decoder for a frame's topic and the device the topic names, or None."""

    def ready(self) -> bool:
        """True once connected and able to deliver frames."""
        return self.health.connected


SourceFactory = Callable[..., Source]
_REGISTRY: dict[str, SourceFactory] = {}


def register(name: str) -> Callable[[SourceFactory], SourceFactory]:
    """Class decorator: make a driver available under ``name``."""

    def deco(factory: SourceFactory) -> SourceFactory:
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_builtin_drivers(until: str | None = None) -> None:
    """Import the built-in driver packages, in order, stopping once ``until`` is registered.

    An MQTT ingest thus never imports the exchange drivers (websockets and
    eleven venue modules) it does not run.
    """
    import importlib

    for mod in ("sensorhub.sources.mqtt", "sensorhub.sources.exchanges"):
        if until is not None and until in _REGISTRY:
            return
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a driver package not installed
            if exc.name != mod:
                raise


def driver_names() -> list[str]:
    _load_builtin_drivers()
    return sorted(_REGISTRY)


def create(driver: str, name: str, **kwargs: Any) -> Source:
    """Instantiate the driver registered as ``driver`` for the source ``name``."""
    _load_builtin_drivers(until=driver)
    try:
        factory = _REGISTRY[driver]
    except KeyError:
        raise ConfigError(
            f"sources.{name}.driver", "one of " + ", ".join(sorted(_REGISTRY)), driver
        ) from None
    return factory(name=name, **kwargs)
