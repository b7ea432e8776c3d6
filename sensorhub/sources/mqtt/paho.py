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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from sensorhub.config import MqttSettings, Settings
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

__all__ = ["MqttSource", "make_paho_client", "paho_connect_props"]

log = logging.getLogger(__name__)


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
    if cfg.username:
        c.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
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

    def start(self) -> None:
        c = self._client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
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
            log.error("MQTT %s:%s refused the connection: %s", self.cfg.host, self.cfg.port, rc)
            return
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

    def stop(self) -> None:
        self._stopping.set()
        self.routing.stop_sparkplug()
        self._client.disconnect()
        self._client.loop_stop()
        self.health.connected = False
