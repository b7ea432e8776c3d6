"""The one exception tree of sensorhub.

::

    SensorhubError                 base of everything sensorhub raises on purpose
    ├── ConfigError                a setting is missing or malformed; names the key and the expected form
    ├── DecodeError                a payload does not decode; ``reason`` and ``offset`` say where
    │   ├── Truncated              the payload ends before a field it must hold
    │   ├── BadMagic               frame does not start with "SH"
    │   ├── UnsupportedVersion     frame version other than 1
    │   ├── ReservedBits           a reserved flag bit is set
    │   ├── BadDeviceId            device id empty, too long or with characters outside [A-Za-z0-9._-]
    │   ├── CountTooLarge          more readings than the format allows
    │   ├── BadQuality             quality outside 0..2
    │   ├── ChecksumMismatch       CRC-32 does not match
    │   ├── TrailingBytes          bytes left after the end of the payload
    │   ├── DeviceMismatch         payload names another device than its topic
    │   ├── InvalidValue           a field has the wrong type or is out of range
    │   ├── UnknownAlias           a Sparkplug metric names only an alias no birth defined
    │   ├── SyntaxError_           the text payload does not parse (JSON, line protocol)
    │   └── UnknownFormat          no decoder serves this topic or format
    ├── SourceError                a source cannot connect or lost its peer
    ├── StreamError                Redis Streams refused or lost a write/read
    └── SinkError                  ClickHouse refused or is unreachable

Callers catch what they can handle. Decoders raise only ``DecodeError``
subclasses for bad input; anything else escaping a decoder is a bug. A
command that ends with one exits with its ``exit_status`` (78, EX_CONFIG, for
a configuration error; 1 otherwise).
"""

from __future__ import annotations

__all__ = [
    "BadDeviceId",
    "BadMagic",
    "BadQuality",
    "ChecksumMismatch",
    "ConfigError",
    "CountTooLarge",
    "DecodeError",
    "DeviceMismatch",
    "InvalidValue",
    "ReservedBits",
    "SensorhubError",
    "SinkError",
    "SourceError",
    "StreamError",
    "SyntaxError_",
    "TrailingBytes",
    "Truncated",
    "UnknownAlias",
    "UnknownFormat",
    "UnsupportedVersion",
]


class SensorhubError(Exception):
    """Base of every error sensorhub raises on purpose."""

    #: the exit status of a command this error ends
    exit_status: int = 1


class ConfigError(SensorhubError):
    """A configuration value is missing or malformed.

    ``key`` is the dotted setting name (``redis.url``), ``expected`` the form it must have.
    """

    exit_status = 78  # EX_CONFIG: restarting will not help

    def __init__(self, key: str, expected: str, got: object = None) -> None:
        self.key = key
        self.expected = expected
        self.got = got
        msg = f"{key}: expected {expected}"
        if got is not None:
            msg += f", got {got!r}"
        super().__init__(msg)


class DecodeError(SensorhubError):
    """A payload does not decode.

    ``reason`` is a short stable code (``"truncated"``, ``"crc mismatch"``...),
    ``offset`` the byte offset the rule applies to (or -1 when it has none).
    """

    reason = "invalid payload"

    def __init__(self, detail: str = "", offset: int = -1) -> None:
        self.offset = offset
        self.detail = detail
        text = self.reason
        if detail:
            text += f": {detail}"
        if offset >= 0:
            text += f" (at offset {offset})"
        super().__init__(text)


class Truncated(DecodeError):
    reason = "truncated"


class BadMagic(DecodeError):
    reason = "bad magic"


class UnsupportedVersion(DecodeError):
    reason = "unsupported version"


class ReservedBits(DecodeError):
    reason = "reserved flags"


class BadDeviceId(DecodeError):
    reason = "bad device id"


class CountTooLarge(DecodeError):
    reason = "count too large"


class BadQuality(DecodeError):
    reason = "bad quality"


class ChecksumMismatch(DecodeError):
    reason = "crc mismatch"


class TrailingBytes(DecodeError):
    reason = "trailing bytes"


class DeviceMismatch(DecodeError):
    reason = "device mismatch"


class InvalidValue(DecodeError):
    reason = "invalid value"


class UnknownAlias(DecodeError):
    """A Sparkplug metric carries only an alias that no birth seen so far defines.

    The host's state for that edge node is lost; it asks the node for a rebirth.
    """

    reason = "unknown alias"


class SyntaxError_(DecodeError):
    reason = "syntax error"


class UnknownFormat(DecodeError):
    reason = "unknown format"


class SourceError(SensorhubError):
    """A source cannot reach its peer or lost it."""


class StreamError(SensorhubError):
    """Redis refused a write or a read (down, out of memory)."""


class SinkError(SensorhubError):
    """ClickHouse refused an insert or is unreachable."""
