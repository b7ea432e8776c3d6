from collections.abc import Callable, Sequence
from typing import Any

CONNACK: int
PUBLISH: int
SUBACK: int
PINGRESP: int
DISCONNECT: int
MAX_REMAINING_LENGTH: int
FLAG_DUP: int
FLAG_RETAIN: int
FLAG_REPLAY: int
PACKET_ID_SHIFT: int
SUBSCRIBE_OPTIONS_V5: int

def token_base(generation: int) -> int: ...

class PacketReader:
    """Incremental parser of the server side of one MQTT connection."""

    protocol: int
    max_packet: int
    dups: int
    retained: int
    packets: int
    new_session: bool
    def __init__(
        self,
        protocol: int = 5,
        max_packet: int = ...,
        frame: Callable[[str, bytes, int, int | None, int], Any] | None = None,
    ) -> None: ...
    def pending(self) -> int: ...
    def feed(
        self, data: bytes, recv_ns: int = 0, token_base: int = 0
    ) -> tuple[list[Any], list[tuple[Any, ...]]]: ...

def encode_connect(
    client_id: str,
    *,
    protocol: int = 5,
    clean: bool = False,
    keepalive: int = 30,
    session_expiry: int = 0,
    receive_maximum: int = 65535,
    maximum_packet_size: int = 0,
    username: str | None = None,
    password: bytes | None = None,
) -> bytes: ...
def encode_subscribe(packet_id: int, filters: Sequence[tuple[str, int]], protocol: int = 5) -> bytes: ...
def encode_pingreq() -> bytes: ...
def encode_disconnect(protocol: int = 5, reason: int = 0) -> bytes: ...
def encode_pubacks(tokens: Sequence[int | None], generation: int) -> tuple[bytes, int, int]: ...
