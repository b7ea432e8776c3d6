"""MQTT source on paho-mqtt 2.x: QoS 1, persistent session, manual acknowledgements.

The fallback driver behind ``mqtt.client = "paho"`` (registered as
``mqtt-paho``); the default is the native driver
(:mod:`sensorhub.sources.mqtt.native`), with the same behaviour at a fraction
of the CPU per message.

A message is PUBACKed only after the ingest loop has its readings in Redis
(``ack`` is called with the message ids). The session is persistent (fixed
client id, clean start off, a session expiry), so messages that arrive while
the process is down, or that were delivered but not acknowledged when it
died, are redelivered by the broker. The broker never has more than
``receive_maximum`` unacknowledged messages in flight to us, which bounds our
memory; its own queue (see the project's mosquitto configuration) holds the
rest. paho's own network thread does the socket work.

With ``mqtt.tls`` the connection uses the project's one TLS client context
(:func:`sensorhub.security.tlsctx.client_context`, through
``tls_set_context``). The user name and password are set again before every
(re)connect (paho's ``on_pre_connect``), so a rotated ``mqtt.password_file``
is picked up; a refusal is logged as one error line naming the user.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from sensorhub.config import MqttSettings, Settings
from sensorhub.security.tlsctx import client_context
from sensorhub.sources.base import (
    DELIVERY_DUP,
    DELIVERY_PACKET_ID_SHIFT,
    DELIVERY_REPLAY,
    DELIVERY_RETAIN,
    Frame,
    FrameQueue,
    register,
)
from sensorhub.sources.mqtt.routing import MqttSourceBase

__all__ = ["MqttSource", "RefusalLog", "make_paho_client", "paho_connect_props"]

log = logging.getLogger(__name__)

REFUSAL_LOG_S = 60.0  # the same refusal again is logged once a minute, not at every retry


class RefusalLog:
    """One error line naming the user for a refused CONNECT; the same refusal again only once a minute."""

    def __init__(self, cfg: MqttSettings) -> None:
        self.cfg = cfg
        self._last = ("", 0.0)
        self.count = 0  # refusals so far

    def refused(self, rc: Any) -> str:
        """Log the refusal ``rc`` (unless just logged) and return what it says."""
        cfg = self.cfg
        self.count += 1
        user = cfg.secret("username")
        who = f"user {user!r}" if user else "anonymous (no mqtt.username)"
        why = f"refused the connection of {who}: {rc} (check mqtt.username and mqtt.password_file)"
        now = time.monotonic()
        last, at = self._last
        if why != last or now - at >= REFUSAL_LOG_S:
            self._last = (why, now)
            log.error("MQTT %s:%s: %s; retrying with backoff", cfg.host, cfg.port, why)
        return why

    def connected(self) -> None:
        self._last = ("", 0.0)


def _set_credentials(client: mqtt.Client, cfg: MqttSettings) -> None:
    """User name and password for the next CONNECT (the password file is read now)."""
    try:
        password = cfg.secret("password")
    except OSError as exc:
        log.error("MQTT: cannot read mqtt.password_file (%s); retrying", exc.__class__.__name__)
        raise
    user = cfg.secret("username")
    if user or password is not None:
        client.username_pw_set(user or "", password)


def make_paho_client(settings: Settings, client_id: str, persistent: bool) -> mqtt.Client:
    """A paho client configured from ``settings.mqtt``: persistent (manual acks) or clean session."""
    cfg = settings.mqtt
    v5 = cfg.protocol == "5"
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else (not persistent),
        manual_ack=persistent,
    )
    if cfg.tls:
        c.tls_set_context(client_context(cfg.ca_file, cfg.cert_file, cfg.key_file))
    # before every connect and reconnect: a rotated password file is read again
    c.on_pre_connect = lambda client, _userdata: _set_credentials(client, cfg)
    b = settings.ingest.backoff
    c.reconnect_delay_set(max(1, int(b.initial_s)), max(1, int(b.max_s)))
    c.max_inflight_messages_set(cfg.receive_maximum)
    c.max_queued_messages_set(0)
    return c


def paho_connect_props(cfg: MqttSettings, persistent: bool) -> Properties | None:
    """MQTT 5 CONNECT properties: session expiry (0 for a clean session) and receive maximum."""
    if cfg.protocol != "5":
        return None
    p = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    p.SessionExpiryInterval = cfg.session_expiry_s if persistent else 0
    p.ReceiveMaximum = cfg.receive_maximum
    return p


@register("mqtt-paho")
class MqttSource(MqttSourceBase):
    """Readings from line devices over MQTT, through paho-mqtt."""

    def __init__(self, name: str, settings: Settings, **_: Any) -> None:
        super().__init__(name, settings)
        self.queue = FrameQueue(settings.ingest.max_inflight_frames)
        self._client = make_paho_client(settings, self.client_id, persistent=True)
        self._new_session = False
        self._replayed: set[str] = set()
        self.refusals = RefusalLog(self.cfg)
        self._unsubacked: set[int] = set()  # mids of UNSUBACKs, until the barrier takes its own
        self._unsub_cond = threading.Condition()

    def start(self) -> None:
        c = self._client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        c.on_unsubscribe = self._on_unsubscribe
        v5 = self.cfg.protocol == "5"
        c.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive_s,
            clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=paho_connect_props(self.cfg, True),
        )
        c.loop_start()
        self.routing.start_sparkplug(self._deliver)

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, rc: Any, _props: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            self.health.detail = self.refusals.refused(rc)
            return
        self.refusals.connected()
        self.health.detail = ""
        session = bool(getattr(_flags, "session_present", False))
        self._new_session = not session
        self._replayed = set()
        log.info("MQTT connected to %s:%s (session present: %s)", self.cfg.host, self.cfg.port, session)
        # Subscribing again is harmless with a present session and needed without one;
        # in MQTT 5, retain handling 1 sends a retained message only to a new subscription,
        # and Retain As Published shows which live messages were published retained.
        subs = self.routing.subscriptions()
        if self.cfg.protocol == "5":
            client.subscribe([
                (f, SubscribeOptions(qos=q, retainAsPublished=True,
                                     retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
                for f, q in subs
            ])
        else:
            client.subscribe(subs)
        self.health.connected = True

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        # paho says no more: a refused TCP connect, a failed TLS handshake (untrusted certificate), ...
        log.warning("MQTT %s:%s: cannot connect%s; retrying", self.cfg.host, self.cfg.port,
                    " (TCP or TLS handshake)" if self.cfg.tls else "")
        self.health.detail = "cannot connect"

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _flags: Any, rc: Any, _props: Any = None) -> None:
        if self.health.connected:
            self.health.reconnects += 1
            log.warning("MQTT disconnected (%s); reconnecting", rc)
        self.health.connected = False

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            token = msg.mid
            delivery = msg.mid << DELIVERY_PACKET_ID_SHIFT | (DELIVERY_DUP if msg.dup else 0)
        else:
            token, delivery = None, 0
        if msg.retain:
            delivery |= DELIVERY_RETAIN
            # the first retained message per topic after a CONNACK without a session is the
            # replay a new subscription gets (3.1.1 marks nothing else as retained)
            if self.cfg.protocol != "5" or (self._new_session and msg.topic not in self._replayed):
                delivery |= DELIVERY_REPLAY
                if self.cfg.protocol == "5":
                    self._replayed.add(msg.topic)
        self._deliver(Frame(msg.topic, bytes(msg.payload), time.time_ns(), token, delivery))

    def _deliver(self, frame: Frame) -> None:
        # Blocking here (queue full) stops reading the socket: back-pressure to the broker.
        while not self.queue.put(frame, timeout=1.0):
            if self._stopping.is_set():
                return
        self.health.frames += 1
        self.health.last_frame_ns = frame.recv_ns

    # ---- ingest interface ----
    def get(self, max_n: int, timeout_s: float) -> list[Frame]:
        return self.queue.get_many(max_n, timeout_s)

    def ack(self, tokens: Sequence[Any]) -> None:
        c = self._client
        for mid in tokens:
            if mid is not None:
                c.ack(mid, 1)
        self.routing.flush_sparkplug()

    def _on_unsubscribe(self, _c: mqtt.Client, _u: Any, mid: int, *_rest: Any) -> None:
        # kept by mid: the UNSUBACK may come in before unsubscribe() has returned the mid
        with self._unsub_cond:
            self._unsubacked.add(mid)
            self._unsub_cond.notify_all()

    def _barrier(self, timeout_s: float = 2.0) -> None:
        """Wait until the broker has processed every acknowledgement sent so far.

        paho closes the socket the moment its DISCONNECT is written; acknowledgements the broker
        had not read by then were seen lost (it reset the connection and redelivered them on the
        next one). The broker handles a client's packets in order, so its UNSUBACK to an
        UNSUBSCRIBE sent after the acks (from a filter this client never used) proves them read.
        """
        if not self.health.connected:
            return
        rc, mid = self._client.unsubscribe(f"$sensorhub/barrier/{self.client_id}")
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return
        with self._unsub_cond:
            acked = self._unsub_cond.wait_for(lambda: mid in self._unsubacked, timeout_s)
            self._unsubacked.clear()
        if not acked:
            log.warning("MQTT: no UNSUBACK within %.0f s before disconnecting; the broker may "
                        "redeliver the last acknowledged messages", timeout_s)

    def stop(self) -> None:
        self._stopping.set()
        self.routing.stop_sparkplug()
        self._barrier()
        self._client.disconnect()
        self._client.loop_stop()
        self.health.connected = False
