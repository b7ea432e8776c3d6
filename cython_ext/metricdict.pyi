from collections.abc import Mapping

class MetricDict:
    """metric_id -> metric name; ids the dictionary does not name are ``m<id>``."""

    mapping: dict[int, str]
    def __init__(self, dictionary: Mapping[int, str] | None = None) -> None: ...
    def name(self, metric_id: int) -> str: ...
