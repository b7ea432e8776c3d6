from typing import Any

class Decoder:
    """Influx line protocol decoder (see sensorhub.decoders.lineproto_py)."""

    strings_skipped: int
    def __init__(self, dictionary: dict[int, str] | None = None) -> None: ...
    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int: ...
