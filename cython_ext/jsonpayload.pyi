from collections.abc import Mapping
from typing import Any

MAX_DEPTH: int

class Decoder:
    """Decodes JSON reading payloads (three shapes) into a ReadingBatch."""

    def __init__(self, dictionary: Mapping[int, str] | None = None) -> None: ...
    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int: ...
