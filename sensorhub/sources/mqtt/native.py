"""MQTT source with its own lean client: Cython framing, one thread, coalesced acknowledgements.

The same behaviour as the paho driver (:class:`sensorhub.sources.mqtt.paho.MqttSource`)
at a fraction of its CPU per message:

- persistent session: fixed client id, clean start off, a session expiry
  (MQTT 5) or clean session off (3.1.1); the broker keeps what arrives while
  we are away and redelivers what we received but did not acknowledge;
- at most ``mqtt.receive_maximum`` unacknowledged messages in flight (MQTT 5);
- a message is acknowledged only through :meth:`MqttNativeSource.ack`, after
  the ingest loop has its readings in Redis; all acknowledgements of one call
  become one ``send`` (many PUBACKs in one ``bytes``), so small writes do not
  meet Nagle's algorithm and cost one system call per flush, not per message;
- subscriptions from ``mqtt.routes`` (under ``$share/<group>/`` when
  ``mqtt.shared_group`` is set), the same routing, route cache and Sparkplug
  host as the paho driver (:class:`sensorhub.sources.mqtt.routing.MqttRouting`; the
  Sparkplug host keeps its low-rate paho connection);
- reconnect forever with capped exponential backoff and full jitter, keep
  alive PINGREQ, and the broker's server keep alive honoured.

One thread owns the socket (blocking, polled with a timeout) and parses every
read with :class:`PacketReader` (``cython_ext/mqttwire.pyx``, or its twin);
the frames of one read go to the ingest loop as one batch: one queue operation
per read, not per message. The queue is bounded in frames; when it is full
the thread stops reading, TCP and the receive maximum push back on the broker.

Acknowledgement tokens are ``generation << 16 | packet_id``: a packet id
means something only on the connection it arrived on. Tokens of an earlier
connection are not sent on the new one (they are counted as stale); the
broker redelivers those messages with the DUP flag and their original packet
ids (MQTT 3.1.1 4.4, MQTT 5 4.4), and the ingest loop recognises them as
already written from that (``Frame.delivery``), not from their content.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from sensorhub._impl import load
from sensorhub.config import MqttSettings, Settings
from sensorhub.errors import DecodeError, SourceError
from sensorhub.sources.base import Frame, register
from sensorhub.sources.mqtt.routing import MqttSourceBase

__all__ = ["FrameBatchQueue", "MqttNativeSource"]

log = logging.getLogger(__name__)

wire = load("mqttwire", "sensorhub.sources.mqtt.wire_py")

RECV_BYTES = 256 * 1024  # one read; many messages at full rate
CONNECT_TIMEOUT_S = 10.0  # TCP connect and CONNACK
SEND_TIMEOUT_S = 10.0  # a broker that takes no bytes for this long is dropped
_POLL_S = 0.25  # longest wait before the thread looks at stop and keep alive again

_CONNACK_CODES = {
    1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
    4: "bad user name or password", 5: "not authorized", 0x80: "unspecified error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid",
    0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
    0x89: "server busy", 0x8A: "banned", 0x95: "packet too large", 0x97: "quota exceeded",
}


class FrameBatchQueue:
    """Bounded hand-over of whole reads (lists of frames) from the network thread to the ingest loop.

    The bound counts frames. ``put`` waits while the queue holds ``max_frames``
    or more, so at most one read's worth goes over the bound.
    """

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self._batches: deque[list[Frame]] = deque()
        self._n = 0
        self._cond = threading.Condition()
        self.high_water = 0

    def __len__(self) -> int:
        return self._n

    def put(self, frames: list[Frame], stopping: threading.Event, idle: Callable[[], None] | None = None) -> bool:
        """Queue one read; False if ``stopping`` was set while waiting for room.

        ``idle`` is called between waits (the connection's keep alive).
        """
        with self._cond:
            while self._n >= self.max_frames:
                if stopping.is_set():
                    return False
                self._cond.wait(_POLL_S)
                if idle is not None and self._n >= self.max_frames:
                    idle()
            self._batches.append(frames)
            self._n += len(frames)
            if self._n > self.high_water:
                self.high_water = self._n
            self._cond.notify_all()
        return True

    def get(self, max_n: int, timeout_s: float) -> list[Frame]:
        """Up to ``max_n`` frames in arrival order; waits at most ``timeout_s`` for the first."""
        with self._cond:
            q = self._batches
            if not q and not self._cond.wait_for(lambda: bool(self._batches), timeout_s):
                return []
            first = q.popleft()
            if len(first) > max_n:
                q.appendleft(first[max_n:])
                out = first[:max_n]
            else:
                out = first
                while q and len(out) + len(q[0]) <= max_n:
                    out.extend(q.popleft())
            was_full = self._n >= self.max_frames
            self._n -= len(out)
            if was_full:
                self._cond.notify_all()
            return out


def max_packet_for(cfg: MqttSettings) -> int:
    """The largest packet we take: room for payloads well over ``max_payload_bytes``,
    so those still reach the ingest loop and are dead-lettered rather than refused."""
    return int(min(wire.MAX_REMAINING_LENGTH + 5, max(16 << 20, 4 * cfg.max_payload_bytes + 65536)))


@register("mqtt-native")
class MqttNativeSource(MqttSourceBase):
    """Readings from line devices over MQTT, through the native client."""

    def __init__(self, name: str, settings: Settings, **_: Any) -> None:
        super().__init__(name, settings)
        self.queue = FrameBatchQueue(settings.ingest.max_inflight_frames)
        self.protocol = 5 if self.cfg.protocol == "5" else 4
        self.max_packet = max_packet_for(self.cfg)
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._generation = 0
        self._last_send = 0.0
        self._keepalive = float(self.cfg.keepalive_s)
        self._ping_sent = 0.0
        self._thread: threading.Thread | None = None
        #: acknowledgements sent, and ack tokens dropped because their connection was gone
        self.acks_sent = 0
        self.ack_writes = 0
        self.stale_acks = 0
        self.redelivered = 0
        self.health.extra["client"] = "native"

    # ---- connection thread ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-native-{self.name}", daemon=True)
        self._thread.start()
        self.routing.start_sparkplug(self._deliver_one)

    def _run(self) -> None:
        b = self.settings.ingest.backoff
        attempt = 0
        while not self._stopping.is_set():
            try:
                self._session()
            except (OSError, SourceError) as exc:
                if not self._stopping.is_set():
                    log.warning("MQTT %s:%s: %s", self.cfg.host, self.cfg.port, exc)
                    self.health.detail = str(exc)
            except DecodeError as exc:
                # the broker's byte stream is out of step: only a new connection puts it right
                log.error("MQTT %s:%s sent a malformed stream (%s); reconnecting", self.cfg.host, self.cfg.port, exc)
                self.health.detail = f"malformed stream: {exc}"
            finally:
                established = self.health.connected
                self._close()
            if self._stopping.is_set():
                break
            if established:
                attempt = 0
            # full jitter: anywhere between 0 and the capped exponential delay
            cap = min(b.max_s, b.initial_s * b.factor**attempt)
            attempt = min(attempt + 1, 64)
            self._stopping.wait(random.uniform(0.0, cap))

    def _close(self) -> None:
        with self._send_lock:
            sock, self._sock = self._sock, None
        if self.health.connected:
            self.health.reconnects += 1
        self.health.connected = False
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _session(self) -> None:
        """One connection, from TCP connect until it fails or the source stops."""
        cfg = self.cfg
        sock = socket.create_connection((cfg.host, cfg.port), timeout=CONNECT_TIMEOUT_S)
        try:
            # our writes are whole batches already; Nagle would only hold acks back
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(SEND_TIMEOUT_S)
        except OSError:
            sock.close()
            raise
        with self._send_lock:
            self._sock = sock
            # from here on, tokens of the previous connection are stale
            self._generation += 1
            generation = self._generation
        base = wire.token_base(generation)
        reader = wire.PacketReader(self.protocol, self.max_packet, Frame)
        pw = cfg.password.get_secret_value().encode() if cfg.password else None
        self._send(wire.encode_connect(
            self.client_id, protocol=self.protocol, clean=False, keepalive=cfg.keepalive_s,
            session_expiry=cfg.session_expiry_s, receive_maximum=cfg.receive_maximum,
            maximum_packet_size=self.max_packet if self.protocol == 5 else 0,
            username=cfg.username, password=pw,
        ))
        self._keepalive = float(cfg.keepalive_s)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        # CONNACK first; the broker sends nothing else before it
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        frames: list[Frame] = []
        controls: list[tuple[Any, ...]] = []
        while not controls:
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                raise SourceError(f"no CONNACK within {CONNECT_TIMEOUT_S:.0f} s")
            if not poller.poll(int(min(left, _POLL_S) * 1000)):
                continue
            data = sock.recv(RECV_BYTES)
            if not data:
                raise SourceError("the broker closed the connection before CONNACK")
            frames, controls = reader.feed(data, time.time_ns(), base)
        ack = controls[0]
        if ack[0] != wire.CONNACK:
            raise SourceError(f"expected CONNACK, got packet type {ack[0]}")
        if ack[2] != 0:
            raise SourceError(f"connection refused: {_CONNACK_CODES.get(ack[2], hex(ack[2]))}")
        if ack[3] >= 0:
            self._keepalive = float(ack[3])  # the broker's server keep alive overrides ours
        log.info("MQTT connected to %s:%s (session present: %s, connection %d)",
                 cfg.host, cfg.port, ack[1], generation)
        # Subscribing again is harmless with a present session and needed without one.
        self._send(wire.encode_subscribe(1, self.routing.subscriptions(), self.protocol))
        self.health.connected = True
        self.health.detail = ""
        self._handle(frames, controls[1:], reader)
        self._ping_sent = 0.0
        last_recv = time.monotonic()
        poll_ms = int(_POLL_S * 1000)
        while not self._stopping.is_set():
            ready = poller.poll(poll_ms)
            now = time.monotonic()
            if ready:
                data = sock.recv(RECV_BYTES)
                if not data:
                    raise SourceError("the broker closed the connection")
                last_recv = now
                frames, controls = reader.feed(data, time.time_ns(), base)
                if controls:
                    for c in controls:
                        if c[0] == wire.PINGRESP:
                            self._ping_sent = 0.0
                if not self._handle(frames, controls, reader):
                    return
            ka = self._keepalive
            if ka > 0:
                # silence since the ping (bytes of any kind prove the broker alive)
                if self._ping_sent and now - max(self._ping_sent, last_recv) > ka:
                    raise SourceError(f"no PINGRESP within {ka:.0f} s")
                self._ping_if_due(now)

    def _ping_if_due(self, now: float) -> None:
        """PINGREQ when we sent nothing for a keep-alive interval (acks count as traffic)."""
        if not self._ping_sent and now - self._last_send >= self._keepalive > 0:
            try:
                self._send(wire.encode_pingreq())
            except (OSError, SourceError):
                return  # the reading side notices the broken connection
            self._ping_sent = now

    def _idle(self) -> None:
        self._ping_if_due(time.monotonic())

    def _handle(self, frames: list[Frame], controls: list[tuple[Any, ...]], reader: Any) -> bool:
        """Hand one read's frames over and act on its control packets; False when stopping."""
        for c in controls:
            if c[0] == wire.SUBACK:
                refused = [code for code in c[2] if code >= 0x80]
                if refused:
                    log.error("MQTT broker refused %d of %d subscriptions (codes %s)",
                              len(refused), len(c[2]), refused)
                    self.health.detail = f"subscriptions refused: {refused}"
            elif c[0] == wire.DISCONNECT:
                raise SourceError(f"the broker disconnected us (reason {c[1]:#x})")
        if frames:
            self.redelivered = reader.dups
            if not self.queue.put(frames, self._stopping, self._idle):
                return False
            h = self.health
            h.frames += len(frames)
            h.last_frame_ns = frames[-1].recv_ns
        return True

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            sock = self._sock
            if sock is None:
                raise SourceError("not connected")
            sock.sendall(data)
            self._last_send = time.monotonic()

    def _deliver_one(self, frame: Frame) -> None:
        """Frames of the Sparkplug host's connection (no ack token)."""
        if self.queue.put([frame], self._stopping):
            self.health.frames += 1
            self.health.last_frame_ns = frame.recv_ns

    # ---- ingest interface ----
    def get(self, max_n: int, timeout_s: float) -> list[Frame]:
        return self.queue.get(max_n, timeout_s)

    def ack(self, tokens: Sequence[Any]) -> None:
        """PUBACK every token of the current connection, all in one write."""
        if tokens:
            with self._send_lock:
                data, acked, stale = wire.encode_pubacks(tokens, self._generation)
                self.stale_acks += stale
                sock = self._sock
                if data and sock is not None:
                    try:
                        sock.sendall(data)
                        self._last_send = time.monotonic()
                        self.acks_sent += acked
                        self.ack_writes += 1
                    except OSError as exc:
                        # the broker redelivers these on the next connection; drop this one
                        log.warning("MQTT ack write failed (%s); reconnecting", exc)
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
        self.routing.flush_sparkplug()

    def stop(self) -> None:
        """Disconnect normally (the session stays with the broker) and end the thread."""
        self._stopping.set()
        with self._send_lock:
            sock = self._sock
            if sock is not None:
                try:
                    sock.sendall(wire.encode_disconnect(self.protocol))
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.routing.stop_sparkplug()
        self.health.connected = False
        h = self.health.extra
        h.update(acks_sent=self.acks_sent, ack_writes=self.ack_writes, stale_acks=self.stale_acks)
