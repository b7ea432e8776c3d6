"""The Sparkplug B host's own MQTT connection (paho-mqtt, clean session).

The Sparkplug specification requires its clients to connect with a clean
session, so the host cannot share the persistent-session connection of the
other formats. This connection is low-rate control traffic: it subscribes
to ``mqtt.sparkplug_group_filter``, publishes the host's ``STATE`` birth (and
leaves its death as the will), and sends the rebirth requests the host state
machine asks for. It connects as the driver does (:func:`make_paho_client`:
TLS, user name and a password read again before every connect).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from sensorhub.config import Settings
from sensorhub.sources.base import Frame
from sensorhub.sources.mqtt.paho import RefusalLog, make_paho_client, paho_connect_props

__all__ = ["SparkplugLink"]


class SparkplugLink:
    """One clean-session connection for the Sparkplug host ``host``."""

    def __init__(self, settings: Settings, client_id: str, host: Any) -> None:
        self.settings = settings
        self.cfg = settings.mqtt
        self.host = host
        self._deliver: Callable[[Frame], None] | None = None
        self._refusals = RefusalLog(self.cfg)
        c = make_paho_client(settings, client_id, persistent=False)
        ts = int(time.time() * 1000)
        c.will_set(host.state_topic, host.death_state_payload(ts), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self._client = c

    def start(self, deliver: Callable[[Frame], None]) -> None:
        """Connect in the background; the host's frames go to ``deliver``."""
        self._deliver = deliver
        v5 = self.cfg.protocol == "5"
        self._client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive_s,
            clean_start=True if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=paho_connect_props(self.cfg, False),
        )
        self._client.loop_start()

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, rc: Any, _props: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            self._refusals.refused(rc)
            return
        self._refusals.connected()
        client.subscribe(self.cfg.sparkplug_group_filter, qos=1)
        client.publish(self.host.state_topic, self.host.birth_state_payload(int(time.time() * 1000)), qos=1, retain=True)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self._deliver is not None:
            self._deliver(Frame(msg.topic, bytes(msg.payload), time.time_ns(), None))

    def flush(self) -> None:
        """Publish what the host asked for (rebirth requests) since the last call."""
        for topic, payload in self.host.take_outgoing():
            self._client.publish(topic, payload, qos=0)

    def stop(self) -> None:
        """Publish the host's death state and disconnect."""
        self._client.publish(
            self.host.state_topic, self.host.death_state_payload(int(time.time() * 1000)), qos=1, retain=True
        )
        self._client.disconnect()
        self._client.loop_stop()
