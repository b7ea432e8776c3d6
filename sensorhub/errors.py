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
    ├── StreamError                Redis refused a read or write, or is unreachable (operator commands)
    └── SinkError                  ClickHouse refused or is unreachable

Callers catch what they can handle. Decoders raise only ``DecodeError``
subclasses for bad input; anything else escaping a decoder is a bug. A
command that ends with one exits with its ``exit_status`` (78, EX_CONFIG, for
a configuration error; 1 otherwise).

``StreamError`` is raised where a command an operator runs reads Redis and
cannot go on without it: ``sensorhub audit`` turns redis-py's errors into one
(:meth:`StreamError.from_redis`), so the command fails in one line naming
Redis and what to check. Inside the pipeline redis-py's errors stay what they
are: the ingest and writer loops catch ``redis.RedisError`` and retry forever
(a full Redis makes ingest stop acknowledging, and the broker keeps the
messages), and the monitor and the metrics exporter show Redis as down and
keep reading.
"""

from __future__ import annotations

import re

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
    """Redis refused a read or a write (out of memory, no permission) or cannot be reached."""

    @classmethod
    def from_redis(cls, exc: BaseException, url: str = "") -> StreamError:
        """The error for redis-py's ``exc``: what Redis said, where (no credentials), what to check."""
        names = {c.__name__ for c in type(exc).__mro__}
        where = re.sub(r"//[^@/]*@", "//", url)  # a password in the URL stays out of logs
        if "AuthenticationError" in names:
            check = "check the user and password of redis.url"
        elif names & {"AuthorizationError", "NoPermissionError"}:
            check = "the user of redis.url lacks a permission: check its Redis ACL"
        elif names & {"ConnectionError", "TimeoutError"}:
            check = "is Redis running and reachable? check redis.url or --redis"
        else:
            check = "check redis.url or --redis"
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        said = lines[0] if lines else type(exc).__name__
        return cls(f"Redis: {said[:300]} ({where + ': ' if where else ''}{check})")


class SinkError(SensorhubError):
    """ClickHouse refused an insert or is unreachable."""
