"""Topic → decoder routing, the fixed client id and the base both MQTT drivers share.

Topic filters map to decoders by configuration (``mqtt.routes``); the device
id is taken from a configurable topic level. Results are cached per topic
(bounded). Topic matching is MQTT's own (:func:`topic_matches`), so the
native driver needs no MQTT client library for it. When ``mqtt.sparkplug``
is on, the Sparkplug B host runs on its own clean-session connection
(:mod:`sensorhub.sources.mqtt.sparkplug_link`), as the specification
requires; its messages reach the ingest loop with no ack token.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sensorhub.config import MqttSettings, Settings, TopicRoute
from sensorhub.sources.base import Decoder, Frame, Source

__all__ = ["MqttRouting", "MqttSourceBase", "default_client_id", "route_topic", "topic_matches"]

log = logging.getLogger(__name__)

_ROUTE_CACHE_MAX = 200_000


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (MQTT 5 section 4.7).

    ``+`` matches one level, a trailing ``#`` the rest including the parent
    level (``a/#`` matches ``a``); a filter starting with a wildcard does not
    match topics starting with ``$``.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return i == len(f) - 1
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(t) == len(f)


def route_topic(routes: Sequence[TopicRoute], topic: str) -> tuple[TopicRoute, str | None] | None:
    """The first route whose filter matches ``topic`` and the device the topic names."""
    for r in routes:
        if topic_matches(r.filter, topic):
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


class MqttRouting:
    """Topic → decoder routing and the Sparkplug B host, shared by the MQTT drivers.

    Routes map topic filters to decoders (one decoder per format); results are
    cached per topic (bounded). When ``mqtt.sparkplug`` is on, the Sparkplug
    host runs on its own clean-session connection, which is low-rate control
    traffic; its messages reach the ingest loop through ``deliver`` with no
    ack token.
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
        self.sparkplug: Any = None
        self._sp_link: Any = None
        if self.cfg.sparkplug:
            self._init_sparkplug(f"{client_id}-spb")

    def _init_sparkplug(self, client_id: str) -> None:
        try:
            from sensorhub.decoders.sparkplug_host import SparkplugHost
        except ImportError:  # decoder not built into this installation
            log.warning("Sparkplug B host not available; %s is not subscribed", self.cfg.sparkplug_group_filter)
            return
        from sensorhub.sources.mqtt.sparkplug_link import SparkplugLink

        self.sparkplug = SparkplugHost(self.cfg.sparkplug_host_id)
        self._sp_decoder = _SparkplugDecoder(self.sparkplug)
        self._sp_link = SparkplugLink(self.settings, client_id, self.sparkplug)

    def start_sparkplug(self, deliver: Callable[[Frame], None]) -> None:
        """Connect the Sparkplug host's connection; its frames go to ``deliver``."""
        if self._sp_link is not None:
            self._sp_link.start(deliver)

    def flush_sparkplug(self) -> None:
        """Publish what the Sparkplug host asked for (rebirth requests) since the last call."""
        if self._sp_link is not None:
            self._sp_link.flush()

    def stop_sparkplug(self) -> None:
        """Publish the host's death state and disconnect its connection."""
        if self._sp_link is not None:
            self._sp_link.stop()

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
        self.max_payload_bytes = self.cfg.max_payload_bytes
        self.max_payload_setting = "mqtt.max_payload_bytes"
        self.routing = MqttRouting(settings, self.client_id)
        self.sparkplug: Any = self.routing.sparkplug
        self._stopping = threading.Event()

    def decoder_for(self, topic: str) -> tuple[Decoder, str | None] | None:
        return self.routing.decoder_for(topic)
