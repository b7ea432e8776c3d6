"""A minimal asyncio MQTT 3.1.1 / 5 publishing client, framed by hand.

Only what a publishing device needs: CONNECT (clean or persistent session,
will message), CONNACK, PUBLISH at QoS 0 and 1 with packet ids, PUBACK with a
bounded in-flight window, PINGREQ, DISCONNECT. Packets are built with bytes
concatenation and written through an asyncio transport; :meth:`MqttConnection.publish`
only queues, :meth:`MqttConnection.flush` writes everything queued in one
``write`` so a tick of many messages costs one system call per connection.

That is several times cheaper in CPU than paho-mqtt, which matters because the
simulator shares the machine with the pipeline it loads.

A QoS 1 message counts as published when its PUBACK arrives (``on_ack`` is
called with its token); a QoS 0 message when it was handed to the socket
(``on_ack`` right after the write) — the broker may still drop it after that.
Messages unacknowledged when the connection drops stay queued and are sent
again, with the DUP flag, after :meth:`MqttConnection.connect`.

A connection may authenticate (user name and password in CONNECT) and run over
TLS (an :class:`ssl.SSLContext` from :func:`sensorhub.security.tlsctx.client_context`,
the broker's certificate checked against the host dialled).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MqttConnection",
    "MqttError",
    "Will",
    "encode_connect",
    "encode_publish",
    "encode_remaining_length",
]

CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
    # MQTT 5 reason codes
    0x80: "unspecified error",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
}

_U16 = struct.Struct(">H")


class MqttError(Exception):
    """The broker refused us, went away, or did not answer in time."""


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for us when we vanish without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


def encode_remaining_length(n: int) -> bytes:
    """MQTT variable-length integer (1..4 bytes)."""
    if n < 0 or n > 268_435_455:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# Remaining lengths of small packets, precomputed (the common case by far).
_RL = [encode_remaining_length(i) for i in range(16384)]


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return _U16.pack(len(b)) + b


def encode_connect(
    client_id: str,
    *,
    version: int = 4,
    keepalive: int = 30,
    clean: bool = True,
    will: Will | None = None,
    session_expiry_s: int = 0,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """A CONNECT packet; ``version`` 4 is MQTT 3.1.1, 5 is MQTT 5."""
    flags = 0x02 if clean else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    var = _str(b"MQTT") + bytes([version, flags]) + _U16.pack(keepalive)
    if version == 5:
        props = b""
        if session_expiry_s:
            props += b"\x11" + struct.pack(">I", session_expiry_s)
        var += encode_remaining_length(len(props)) + props
    payload = _str(client_id)
    if will is not None:
        if version == 5:
            payload += b"\x00"  # no will properties
        payload += _str(will.topic) + _str(will.payload)
    if username is not None:
        payload += _str(username)
    if password is not None:
        payload += _str(password)
    body = var + payload
    return b"\x10" + encode_remaining_length(len(body)) + body


def encode_publish(
    topic: bytes, payload: bytes, qos: int, packet_id: int = 0, *, dup: bool = False, version: int = 4
) -> bytes:
    """A PUBLISH packet; ``topic`` is the topic already length-prefixed (see :func:`topic_field`)."""
    var = topic
    if qos:
        var += _U16.pack(packet_id)
    if version == 5:
        var += b"\x00"  # no properties
    rl = len(var) + len(payload)
    return (
        _FIRST[(0x08 if dup else 0) | (qos << 1)]
        + (_RL[rl] if rl < 16384 else encode_remaining_length(rl))
        + var
        + payload
    )


_FIRST = [bytes([0x30 | i]) for i in range(16)]


def topic_field(topic: str) -> bytes:
    """The length-prefixed UTF-8 topic as it appears inside PUBLISH."""
    return _str(topic)


class MqttConnection(asyncio.Protocol):
    """One MQTT client connection that publishes.

    ``on_ack(token)`` is called once per message when it counts as published.
    The in-flight window (``max_inflight`` unacknowledged QoS 1 messages) and
    the transport's own write buffer bound the memory a slow broker can cost:
    :meth:`can_publish` turns false and the caller moves on.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        on_ack: Callable[[Any], None],
        version: int = 4,
        keepalive: int = 30,
        clean: bool = True,
        session_expiry_s: int = 0,
        will: Will | None = None,
        max_inflight: int = 64,
        connect_timeout_s: float = 5.0,
        write_buffer_bytes: int = 16384,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.on_ack = on_ack
        self.version = version
        self.keepalive = keepalive
        self.clean = clean
        self.session_expiry_s = session_expiry_s
        self.will = will
        self.max_inflight = max_inflight
        self.connect_timeout_s = connect_timeout_s
        self.write_buffer_bytes = write_buffer_bytes
        self.username = username
        self.password = password
        self.ssl_context = ssl_context
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.paused = False
        # packet id -> (topic field, payload, token); insertion order is send order.
        self.inflight: dict[int, tuple[bytes, bytes, Any]] = {}
        self._next_pid = 1
        self._out: list[bytes] = []
        self._acked_qos0: list[Any] = []
        self._buf = b""
        self._connack: asyncio.Future[int] | None = None
        self._closed: asyncio.Future[None] | None = None
        self.last_write = 0.0
        self.acks = 0
        self.refused = 0  # PUBACKs with a refusal (MQTT 5 reason >= 0x80: not authorized, quota...)
        self.reconnects = 0
        self.lost_error: str | None = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # A small write buffer: a QoS 0 message "written" should be close to
        # the wire, and a slow broker should push back early.
        transport.set_write_buffer_limits(high=self.write_buffer_bytes)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        self.transport = None
        self.paused = False
        self.lost_error = str(exc) if exc else None
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(MqttError(f"{self.client_id}: connection closed before CONNACK"))
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        n = len(buf)
        i = 0
        inflight = self.inflight
        while i + 2 <= n:
            h = buf[i]
            # Fast path: a 3.1.1 PUBACK (or a v5 one without reason) is exactly 4 bytes.
            if h == 0x40 and buf[i + 1] == 2:
                if i + 4 > n:
                    break
                pid = (buf[i + 2] << 8) | buf[i + 3]
                i += 4
                entry = inflight.pop(pid, None)
                if entry is not None:
                    self.acks += 1
                    self.on_ack(entry[2])
                continue
            # General path: decode the remaining length.
            rl = 0
            mult = 1
            j = i + 1
            while True:
                if j >= n:
                    self._buf = buf[i:]
                    return
                b = buf[j]
                rl += (b & 0x7F) * mult
                mult <<= 7
                j += 1
                if not b & 0x80:
                    break
                if mult > 1 << 21:
                    self._protocol_error("malformed remaining length")
                    return
            if j + rl > n:
                break
            body = buf[j : j + rl]
            i = j + rl
            self._packet(h, body)
        self._buf = buf[i:] if i < n else b""

    def _packet(self, h: int, body: bytes) -> None:
        kind = h >> 4
        if kind == 2:  # CONNACK
            rc = body[1] if len(body) >= 2 else 255
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(rc)
        elif kind == 4:  # PUBACK with a reason code (MQTT 5)
            pid = _U16.unpack_from(body)[0]
            entry = self.inflight.pop(pid, None)
            # A reason code >= 0x80 is a refusal; it still ends the exchange,
            # but the message was not accepted, so it is not counted.
            if entry is not None and (len(body) < 3 or body[2] < 0x80):
                self.acks += 1
                self.on_ack(entry[2])
            elif entry is not None:
                self.refused += 1
        elif kind == 14:  # DISCONNECT from the server (MQTT 5)
            self._protocol_error("server sent DISCONNECT")
        # PINGRESP (13) and anything else need no action.

    def _protocol_error(self, why: str) -> None:
        self.lost_error = why
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ connecting

    async def connect(self) -> None:
        """Open the socket, CONNECT, await CONNACK, and resend what was unacknowledged."""
        loop = asyncio.get_running_loop()
        self._buf = b""
        self._connack = loop.create_future()
        self._closed = loop.create_future()
        tls = self.ssl_context
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: self, self.host, self.port, ssl=tls,
                    server_hostname=self.host if tls is not None else None,
                    ssl_handshake_timeout=self.connect_timeout_s if tls is not None else None,
                ),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            how = " over TLS" if tls is not None else ""
            raise MqttError(f"{self.client_id}: cannot connect to {self.host}:{self.port}{how}: {exc}") from exc
        assert self.transport is not None
        self.transport.write(
            encode_connect(
                self.client_id,
                version=self.version,
                keepalive=self.keepalive,
                clean=self.clean,
                will=self.will,
                session_expiry_s=self.session_expiry_s,
                username=self.username,
                password=self.password,
            )
        )
        try:
            rc = await asyncio.wait_for(self._connack, self.connect_timeout_s)
        except TimeoutError as exc:
            self.abort()
            raise MqttError(f"{self.client_id}: no CONNACK within {self.connect_timeout_s}s") from exc
        if rc != 0:
            self.abort()
            who = f" for user {self.username!r}" if self.username else ""
            raise MqttError(f"{self.client_id}: connection refused{who}: {CONNACK_CODES.get(rc, rc)}")
        self.connected = True
        self.last_write = time.monotonic()
        if self.inflight:
            # Unacknowledged QoS 1 messages go again, flagged as duplicates.
            self.reconnects += 1
            for pid, (topic, payload, _token) in self.inflight.items():
                self._out.append(encode_publish(topic, payload, 1, pid, dup=True, version=self.version))
            self.flush()

    # ------------------------------------------------------------ publishing

    def can_publish(self) -> bool:
        """True when connected, not pushed back by the socket, and the in-flight window has room."""
        return self.connected and not self.paused and len(self.inflight) < self.max_inflight

    def publish(self, topic: bytes, payload: bytes, qos: int, token: Any) -> None:
        """Queue one PUBLISH; :meth:`flush` writes it. ``topic`` comes from :func:`topic_field`."""
        if qos:
            pid = self._next_pid
            while pid in self.inflight:
                pid = pid % 65535 + 1
            self._next_pid = pid % 65535 + 1
            self.inflight[pid] = (topic, payload, token)
            self._out.append(encode_publish(topic, payload, 1, pid, version=self.version))
        else:
            self._out.append(encode_publish(topic, payload, 0, version=self.version))
            self._acked_qos0.append(token)

    def flush(self) -> None:
        """Write everything queued in one system call; QoS 0 messages count as published now."""
        if not self._out:
            return
        if self.transport is None or self.transport.is_closing():
            # QoS 0 messages queued for a dead socket are gone; QoS 1 stay in flight.
            self._out.clear()
            self._acked_qos0.clear()
            return
        self.transport.write(b"".join(self._out) if len(self._out) > 1 else self._out[0])
        self._out.clear()
        self.last_write = time.monotonic()
        if self._acked_qos0:
            for token in self._acked_qos0:
                self.on_ack(token)
            self._acked_qos0.clear()

    def ping_if_idle(self, now: float) -> None:
        """Send PINGREQ when nothing was written for half the keepalive."""
        if self.connected and self.transport is not None and now - self.last_write > self.keepalive / 2:
            self.transport.write(b"\xc0\x00")
            self.last_write = now

    async def wait_acked(self, timeout_s: float) -> bool:
        """Wait (bounded) until no QoS 1 message is in flight; True when none is."""
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            if not self.connected:
                return False
            await asyncio.sleep(0.01)
        return not self.inflight

    async def disconnect(self, timeout_s: float = 2.0) -> None:
        """Send DISCONNECT (the broker discards the will) and close."""
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\xe0\x00")
            self.transport.close()
        self.connected = False
        if self._closed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), timeout_s)
            except TimeoutError:
                pass

    def abort(self) -> None:
        """Drop the socket without DISCONNECT: the broker publishes the will."""
        self.connected = False
        if self.transport is not None:
            self.transport.abort()
