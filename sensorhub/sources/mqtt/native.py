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
  alive PINGREQ, and the broker's server keep alive honoured;
- ``mqtt.tls``: TLS 1.2+ with the broker's certificate checked against
  ``mqtt.ca_file`` and ``mqtt.host`` (:func:`sensorhub.security.tlsctx.client_context`,
  built again at each connect so that renewed files are picked up), and the
  user name and password (``mqtt.password_file`` read again at each connect,
  so a rotated password is picked up); a broker that refuses them is retried
  with backoff, and the refusal is logged as one error line naming the user.

One thread owns the socket (blocking, polled with a timeout) and parses every
read with :class:`PacketReader` (``cython_ext/mqttwire.pyx``, or its twin);
with TLS the records go through an :class:`ssl.SSLObject` over memory BIOs
(:class:`_TlsChannel`): the socket stays an ordinary socket, read
``RECV_BYTES`` at a time (an ``SSLSocket`` reads each record with two system
calls, header and body, and mosquitto writes every packet as a record of its
own), so ``poll`` sees exactly what is left to read and nothing decrypted
waits unseen inside the SSL object;
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
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from sensorhub._impl import load
from sensorhub.config import MqttSettings, Settings
from sensorhub.errors import DecodeError, SourceError
from sensorhub.security.tlsctx import client_context
from sensorhub.sources.base import Frame, register
from sensorhub.sources.mqtt.routing import MqttSourceBase

__all__ = ["FrameBatchQueue", "MqttNativeSource"]

log = logging.getLogger(__name__)

wire = load("mqttwire", "sensorhub.sources.mqtt.wire_py")

RECV_BYTES = 256 * 1024  # one read; many messages at full rate
TLS_RECORD_BYTES = 16 * 1024  # the most plaintext one TLS record carries: one SSLObject.read takes a whole record
CONNECT_TIMEOUT_S = 10.0  # TCP connect, TLS handshake, and CONNACK (each)
REFUSAL_LOG_S = 60.0  # the same refusal again is logged once a minute, not at every retry
SEND_TIMEOUT_S = 10.0  # a broker that takes no bytes for this long is dropped
_POLL_S = 0.25  # longest wait before the thread looks at stop and keep alive again

_CONNACK_CODES = {
    1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
    4: "bad user name or password", 5: "not authorized", 0x80: "unspecified error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid",
    0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
    0x89: "server busy", 0x8A: "banned", 0x95: "packet too large", 0x97: "quota exceeded",
}


class AuthenticationFailed(SourceError):
    """One side refused the other: the broker our CONNECT (bad user name or password, not
    authorized, ...), or we the broker's certificate. Retried like any failure, but logged as an
    error: it lasts until an operator changes a file (the password file, the CA file)."""


class _PlainChannel:
    """The connection's bytes as they are on the socket."""

    tls_version = ""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self) -> bytes | None:
        """What one read gives (the socket is readable); None when the broker closed the connection."""
        return self.sock.recv(RECV_BYTES) or None

    def write(self, data: bytes) -> None:
        """Send ``data`` whole; the caller holds the driver's send lock."""
        self.sock.sendall(data)


class _TlsChannel:
    """TLS through an :class:`ssl.SSLObject` over memory BIOs, on an ordinary socket.

    The SSL object is used from two threads (the network thread decrypts, the
    ingest loop's ``ack`` encrypts), so every call on it holds ``_lock``,
    which is never held across a blocking system call. Encrypted bytes leave
    in the order they were produced: whoever takes them from the outgoing BIO
    holds the driver's send lock (``send_lock``) until they are on the socket.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str,
                 send_lock: threading.Lock) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=False, server_hostname=server_hostname)
        self._lock = threading.Lock()
        self._send_lock = send_lock
        self.tls_version = ""

    def handshake(self, deadline: float, stopping: threading.Event) -> None:
        """The TLS handshake, within ``deadline`` (monotonic); SourceError if it fails."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                raise AuthenticationFailed(
                    f"TLS: the broker's certificate is not trusted ({exc.verify_message}); check mqtt.ca_file"
                ) from exc
            except ssl.SSLError as exc:
                raise SourceError(f"TLS handshake failed: {exc.reason or exc}") from exc
            self.sock.sendall(self._out.read())
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or stopping.is_set():
                    raise SourceError(f"no TLS handshake within {CONNECT_TIMEOUT_S:.0f} s")
                if poller.poll(int(min(left, _POLL_S) * 1000)):
                    break
            data = self.sock.recv(RECV_BYTES)
            if not data:
                raise SourceError("the broker closed the connection during the TLS handshake")
            self._in.write(data)
        if self._out.pending:
            self.sock.sendall(self._out.read())
        self.tls_version = self._tls.version() or "TLS"

    def read(self) -> bytes | None:
        """The plaintext of every whole record one socket read completes (b"" if none);
        None when the broker closed the connection (end of stream or TLS close_notify)."""
        data = self.sock.recv(RECV_BYTES)
        if not data:
            return None
        chunks: list[bytes] = []
        closed = False
        with self._lock:
            self._in.write(data)
            rd = self._tls.read
            try:
                while True:
                    chunk = rd(TLS_RECORD_BYTES)
                    if not chunk:  # the broker's close_notify: every later read says so again
                        closed = True
                        break
                    chunks.append(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                closed = True
        if self._out.pending:  # rare: what reading made TLS send (a TLS 1.3 key update)
            with self._send_lock, self._lock:
                out = self._out.read()
                if out:
                    self.sock.sendall(out)
        if closed and not chunks:
            return None
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def write(self, data: bytes) -> None:
        """Encrypt and send ``data`` whole; the caller holds the driver's send lock."""
        with self._lock:
            self._tls.write(data)
            out = self._out.read()
        self.sock.sendall(out)


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
        self._chan: _PlainChannel | _TlsChannel | None = None
        self._last_refusal = ("", 0.0)  # the last AuthenticationFailed, and when it was logged
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
        #: connections refused for credentials or trust (:class:`AuthenticationFailed`), every one retried
        self.refusals = 0
        self.health.extra["client"] = "native"
        self.health.extra["tls"] = self.cfg.tls

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
            except AuthenticationFailed as exc:
                self.refusals += 1
                self._log_refusal(f"{exc}")
                self.health.detail = str(exc)
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

    def _log_refusal(self, why: str) -> None:
        """One error line per refusal; the same refusal again only once a minute (retries go on)."""
        now = time.monotonic()
        last, at = self._last_refusal
        if why != last or now - at >= REFUSAL_LOG_S:
            log.error("MQTT %s:%s: %s; retrying with backoff", self.cfg.host, self.cfg.port, why)
            self._last_refusal = (why, now)

    def _close(self) -> None:
        with self._send_lock:
            sock, self._sock = self._sock, None
            self._chan = None
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
        # read at every connect: renewed certificates and a rotated password are picked up
        ctx = client_context(cfg.ca_file, cfg.cert_file, cfg.key_file) if cfg.tls else None
        secret = cfg.secret("password")
        user = cfg.secret("username")  # both read now: a rotated account is used from this connect on
        pw = secret.encode() if secret is not None else None
        sock = socket.create_connection((cfg.host, cfg.port), timeout=CONNECT_TIMEOUT_S)
        chan: _PlainChannel | _TlsChannel
        try:
            # our writes are whole batches already; Nagle would only hold acks back
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(SEND_TIMEOUT_S)
            if ctx is not None:
                chan = _TlsChannel(sock, ctx, cfg.host, self._send_lock)
                chan.handshake(time.monotonic() + CONNECT_TIMEOUT_S, self._stopping)
            else:
                chan = _PlainChannel(sock)
        except BaseException:
            sock.close()
            raise
        with self._send_lock:
            self._sock = sock
            self._chan = chan
            # from here on, tokens of the previous connection are stale
            self._generation += 1
            generation = self._generation
        base = wire.token_base(generation)
        reader = wire.PacketReader(self.protocol, self.max_packet, Frame)
        self._send(wire.encode_connect(
            self.client_id, protocol=self.protocol, clean=False, keepalive=cfg.keepalive_s,
            session_expiry=cfg.session_expiry_s, receive_maximum=cfg.receive_maximum,
            maximum_packet_size=self.max_packet if self.protocol == 5 else 0,
            username=user, password=pw,
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
            data = chan.read()
            if data is None:
                raise SourceError("the broker closed the connection before CONNACK")
            frames, controls = reader.feed(data, time.time_ns(), base)
        ack = controls[0]
        if ack[0] != wire.CONNACK:
            raise SourceError(f"expected CONNACK, got packet type {ack[0]}")
        if ack[2] != 0:
            who = f"user {user!r}" if user else "anonymous (no mqtt.username)"
            raise AuthenticationFailed(
                f"refused the connection of {who}: {_CONNACK_CODES.get(ack[2], hex(ack[2]))} "
                "(check mqtt.username and mqtt.password_file)"
            )
        if ack[3] >= 0:
            self._keepalive = float(ack[3])  # the broker's server keep alive overrides ours
        self._last_refusal = ("", 0.0)
        log.info("MQTT connected to %s:%s%s (session present: %s, connection %d)",
                 cfg.host, cfg.port, f" over {chan.tls_version}" if chan.tls_version else "", ack[1], generation)
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
                data = chan.read()
                if data is None:
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
            chan = self._chan
            if chan is None:
                raise SourceError("not connected")
            chan.write(data)
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
                sock, chan = self._sock, self._chan
                if data and sock is not None and chan is not None:
                    try:
                        chan.write(data)
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
            chan = self._chan
            if chan is not None:
                try:
                    chan.write(wire.encode_disconnect(self.protocol))
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.routing.stop_sparkplug()
        self.health.connected = False
        h = self.health.extra
        h.update(acks_sent=self.acks_sent, ack_writes=self.ack_writes, stale_acks=self.stale_acks,
                 refusals=self.refusals)
