"""Threshold alerts on live readings: rules, the evaluator, the WebSocket gateway.

- :mod:`sensorhub.alerts.engine`: rule evaluation over reading blocks, per
  (rule, device, metric) state, deterministic events.
- :mod:`sensorhub.alerts.evaluator`: ``sensorhub alerts evaluate``, a consumer
  of the reading streams with its own group; emits each event exactly once
  (Redis events stream, pub/sub, open alerts and counts) and stores alerts in
  ClickHouse.
- :mod:`sensorhub.alerts.gateway`: ``sensorhub alerts serve``, the WebSocket
  fan-out and the page at ``/``.

docs/alerts.md describes the rules, the message format and the guarantees.
"""

from __future__ import annotations

__all__: list[str] = []
