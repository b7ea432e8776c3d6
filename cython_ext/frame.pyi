from collections.abc import Mapping
from typing import Any

from sensorhub._ext.metricdict import MetricDict

MAX_COUNT: int
MAX_ID_LEN: int

class Decoder:
    """Decodes firmware frames (version 1) into a ReadingBatch."""

    metrics: MetricDict
    def __init__(self, dictionary: Mapping[int, str] | None = None) -> None: ...
    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int: ...
