from typing import Any

class Decoder:
    """Sparkplug B payload decoder (see sensorhub.decoders.sparkplug_py)."""

    metrics_skipped: int
    nulls_skipped: int
    def __init__(self, dictionary: dict[int, str] | None = None) -> None: ...
    def header(self, payload: bytes) -> tuple[int | None, int | None]: ...
    def decode(self, topic_device: str | None, payload: bytes, recv_ns: int, batch: Any) -> int: ...
    def decode_with(
        self,
        device: str | None,
        payload: bytes,
        recv_ns: int,
        batch: Any,
        aliases: dict[int, tuple[str, int]] | None,
        types: dict[str, int] | None,
    ) -> int: ...
