"""firmware_sim: simulated line devices that load and fault-test sensorhub.

Devices publish over MQTT in the four device formats (``frame``, ``json``,
``ilp``, ``sparkplug``) at a controlled rate, with faults on demand, and record
what they published (the ground truth) so :mod:`firmware_sim.verify` can check
ClickHouse. The encoders are written from the wire specs, independently of
``sensorhub.decoders``. See ``docs/simulator.md``.
"""

from __future__ import annotations

from firmware_sim.devices import FORMATS, Device, Message, make_devices, parse_mix
from firmware_sim.mqtt import MqttConnection, MqttError, Will
from firmware_sim.sim import FaultConfig, RunStats, SimConfig, Simulator
from firmware_sim.truth import TruthWriter, read_summary, read_truth

__all__ = [
    "FORMATS",
    "Device",
    "FaultConfig",
    "Message",
    "MqttConnection",
    "MqttError",
    "RunStats",
    "SimConfig",
    "Simulator",
    "TruthWriter",
    "Will",
    "make_devices",
    "parse_mix",
    "read_summary",
    "read_truth",
]
