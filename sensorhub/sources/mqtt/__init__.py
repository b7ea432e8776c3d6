"""The MQTT source: routing, the native driver (default), the paho driver, the wire codec's twin.

- :mod:`.routing`: topic → decoder routes, MQTT topic matching, the fixed
  client id, and :class:`~.routing.MqttSourceBase`, which both drivers extend;
- :mod:`.native`: the lean driver (Cython framing in ``cython_ext/mqttwire.pyx``,
  coalesced acknowledgements), registered as ``mqtt-native``;
- :mod:`.paho`: the paho-mqtt driver, registered as ``mqtt-paho``;
- :mod:`.sparkplug_link`: the Sparkplug B host's clean-session connection;
- :mod:`.wire_py`: the pure-Python twin of the wire codec.

``mqtt.client`` chooses the driver behind the ``mqtt`` source. Dependencies
point one way: the drivers import the routing, never this package or each
other.
"""

from __future__ import annotations

from typing import Any

from sensorhub.config import Settings
from sensorhub.sources.base import Source, register
from sensorhub.sources.mqtt.native import MqttNativeSource
from sensorhub.sources.mqtt.paho import MqttSource
from sensorhub.sources.mqtt.routing import (
    MqttRouting,
    MqttSourceBase,
    default_client_id,
    route_topic,
    topic_matches,
)

__all__ = [
    "MqttNativeSource",
    "MqttRouting",
    "MqttSource",
    "MqttSourceBase",
    "default_client_id",
    "route_topic",
    "topic_matches",
]


@register("mqtt")
def _mqtt_source(name: str, settings: Settings, **kwargs: Any) -> Source:
    """The ``mqtt`` source: the driver ``mqtt.client`` names (native unless set to paho)."""
    if settings.mqtt.client == "native":
        return MqttNativeSource(name=name, settings=settings, **kwargs)
    return MqttSource(name=name, settings=settings, **kwargs)
