"""MQTT source: paho-mqtt 2.x, QoS 1, persistent session, manual acknowledgements.

A message is PUBACKed only after the ingest loop has its readings in Redis
(``ack`` is called with the message ids). The session is persistent (fixed
client id, clean start off, a session expiry), so messages that arrive while
the process is down, or that were delivered but not acknowledged when it
died, are redelivered by the broker. The broker never has more than
``receive_maximum`` unacknowledged messages in flight to us, which bounds our
memory; its own queue (see the project's mosquitto configuration) holds the
rest.

Topic filters map to decoders by configuration (``mqtt.routes``); the device
id is taken from a configurable topic level. Sparkplug B runs on a second,
clean-session connection as the specification requires (see
``sensorhub.decoders.sparkplug_host``). The routing and the Sparkplug
connection live in :class:`MqttRouting`, which both MQTT drivers use.

``mqtt.client`` chooses the driver behind the ``mqtt`` source: ``"native"``
(the default; ``sensorhub.sources.mqtt_native``, a lean receive path with
Cython framing and coalesced acknowledgements) or ``"paho"`` (this module,
the fallback). Both are
also registered under their own names, ``mqtt-paho`` and ``mqtt-native``.

paho's own network thread does the socket work; measured against asyncio
(aiomqtt) on this class of machine the threaded client costs less CPU per
message, and the ingest loop runs on the main thread without an event loop.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from sensorhub.config import MqttSettings, Settings, TopicRoute
from sensorhub.sources.base import (
    DELIVERY_DUP,
    DELIVERY_PACKET_ID_SHIFT,
    DELIVERY_REPLAY,
    DELIVERY_RETAIN,
    Decoder,
    Frame,
    FrameQueue,
    Source,
    register,
)

__all__ = ["MqttRouting", "MqttSource", "make_paho_client", "route_topic"]

log = logging.getLogger(__name__)

_ROUTE_CACHE_MAX = 200_000


def route_topic(routes: Sequence[TopicRoute], topic: str) -> tuple[TopicRoute, str | None] | None:
    """The first route whose filter matches ``topic`` and the device the topic names."""
    for r in routes:
        if mqtt.topic_matches_sub(r.filter, topic):
            device = None
            if r.device_level >= 0:
                levels = topic.split("/")
                if r.device_level < len(levels) and levels[r.device_level]:
                    device = levels[r.device_level]
            return r, device
    return None


class _SparkplugDecoder:
    """Adapts the Sparkplug host state machine to the decoder interface (device = topic)."""

    def __init__(self, host: Any) -> None:
        self.host = host

    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int:
        assert topic_device is not None
        return int(self.host.on_message(topic_device, payload, recv_ns, batch))


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


class MqttRouting:
    """Topic → decoder routing and the Sparkplug B host, shared by the MQTT drivers.

    Routes map topic filters to decoders (one decoder per format); results are
    cached per topic (bounded). When ``mqtt.sparkplug`` is on, the Sparkplug
    host runs on its own clean-session paho connection, which is low-rate
    control traffic; its messages reach the ingest loop through ``deliver``
    with no ack token.
    """

    def __init__(self, settings: Settings, client_id: str) -> None:
        from sensorhub.decoders import make_decoder

        self.settings = settings
        self.cfg = settings.mqtt
        self._decoders: dict[str, Decoder] = {}
        for r in self.cfg.routes:
            if r.format not in self._decoders:
                self._decoders[r.format] = make_decoder(r.format, dict(settings.dictionary))
        self._route_cache: dict[str, tuple[Decoder, str | None] | None] = {}
        self._sp_client: mqtt.Client | None = None
        self._deliver: Callable[[Frame], None] | None = None
        self.sparkplug: Any = None
        if self.cfg.sparkplug:
            self._init_sparkplug(f"{client_id}-spb")

    def _init_sparkplug(self, client_id: str) -> None:
        try:
            from sensorhub.decoders.sparkplug_host import SparkplugHost
        except ImportError:  # decoder not built into this installation
            log.warning("Sparkplug B host not available; %s is not subscribed", self.cfg.sparkplug_group_filter)
            return
        self.sparkplug = SparkplugHost(self.cfg.sparkplug_host_id)
        self._sp_decoder = _SparkplugDecoder(self.sparkplug)
        c = make_paho_client(self.settings, client_id, persistent=False)
        ts = int(time.time() * 1000)
        c.will_set(self.sparkplug.state_topic, self.sparkplug.death_state_payload(ts), qos=1, retain=True)
        c.on_connect = self._on_sp_connect
        c.on_message = self._on_sp_message
        self._sp_client = c

    def start_sparkplug(self, deliver: Callable[[Frame], None]) -> None:
        """Connect the Sparkplug host's connection; its frames go to ``deliver``."""
        if self._sp_client is None:
            return
        self._deliver = deliver
        v5 = self.cfg.protocol == "5"
        self._sp_client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive_s,
            clean_start=True if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=paho_connect_props(self.cfg, False),
        )
        self._sp_client.loop_start()

    def _on_sp_connect(self, client: mqtt.Client, _u: Any, _flags: Any, rc: Any, _props: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            return
        sp = self.sparkplug
        client.subscribe(self.cfg.sparkplug_group_filter, qos=1)
        client.publish(sp.state_topic, sp.birth_state_payload(int(time.time() * 1000)), qos=1, retain=True)

    def _on_sp_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self._deliver is not None:
            self._deliver(Frame(msg.topic, bytes(msg.payload), time.time_ns(), None))

    def flush_sparkplug(self) -> None:
        """Publish what the Sparkplug host asked for (rebirth requests) since the last call."""
        if self.sparkplug is not None and self._sp_client is not None:
            for topic, payload in self.sparkplug.take_outgoing():
                self._sp_client.publish(topic, payload, qos=0)

    def stop_sparkplug(self) -> None:
        """Publish the host's death state and disconnect its connection."""
        c = self._sp_client
        if c is None:
            return
        if self.sparkplug is not None:
            c.publish(
                self.sparkplug.state_topic,
                self.sparkplug.death_state_payload(int(time.time() * 1000)),
                qos=1,
                retain=True,
            )
        c.disconnect()
        c.loop_stop()

    def decoder_for(self, topic: str) -> tuple[Decoder, str | None] | None:
        """The decoder for ``topic`` and the device it names, or None (cached per topic)."""
        hit = self._route_cache.get(topic, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        result: tuple[Decoder, str | None] | None
        if topic.startswith("spBv1.0/") and self.sparkplug is not None:
            result = (self._sp_decoder, topic)
        else:
            r = route_topic(self.cfg.routes, topic)
            result = None if r is None else (self._decoders[r[0].format], r[1])
        if len(self._route_cache) >= _ROUTE_CACHE_MAX:
            self._route_cache.clear()
        self._route_cache[topic] = result
        return result

    def subscriptions(self) -> list[tuple[str, int]]:
        """(filter, qos) of every route, under ``$share/<group>/`` when a shared group is set."""
        g = self.cfg.shared_group
        return [(f"$share/{g}/{r.filter}" if g else r.filter, int(self.cfg.qos)) for r in self.cfg.routes]


def default_client_id(name: str, cfg: MqttSettings) -> str:
    """The fixed client id the persistent session is kept under."""
    return cfg.client_id or f"sensorhub-{name}-{socket.gethostname()}"


@register("mqtt")
def _mqtt_source(name: str, settings: Settings, **kwargs: Any) -> Source:
    """The ``mqtt`` source: the driver ``mqtt.client`` names (native unless set to paho)."""
    if settings.mqtt.client == "native":
        from sensorhub.sources.mqtt_native import MqttNativeSource

        return MqttNativeSource(name=name, settings=settings, **kwargs)
    return MqttSource(name=name, settings=settings, **kwargs)


class MqttSourceBase(Source):
    """What both MQTT drivers share: settings, the fixed client id, routing, the Sparkplug host."""

    kind = "reading"

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name)
        self.settings = settings
        self.cfg: MqttSettings = settings.mqtt
        # stable across restarts: the broker keeps the persistent session under this id
        self.client_id = default_client_id(name, self.cfg)
        # packet ids of redeliveries belong to this session (see Frame.delivery)
        self.session_id = self.client_id
        self.inflight_bound = self.cfg.receive_maximum
        self.routing = MqttRouting(settings, self.client_id)
        self.sparkplug: Any = self.routing.sparkplug
        self._stopping = threading.Event()

    def decoder_for(self, topic: str) -> tuple[Decoder, str | None] | None:
        return self.routing.decoder_for(topic)


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


# the native driver registers itself as "mqtt-native" on import
from sensorhub.sources import mqtt_native as _mqtt_native  # noqa: E402,F401
