"""The one place where the writer tells ClickHouse's errors from its own bugs.

Every call the writer makes into ClickHouse runs inside :func:`sink_boundary`.
What comes out of it is one of three things:

- **retryable**: ClickHouse could not take the call now, and the same call
  later can succeed: unreachable, 503, a timeout, ``NOT_ENOUGH_SPACE``, too
  many parts (merges behind), or any other error ClickHouse answers with.
  Raised as :class:`ClickHouseFailed` with ``row_caused`` false; a
  :class:`~sensorhub.errors.SinkError` (``connect`` names the URL) and an
  ``OSError`` (the socket's) pass as they are and are retryable too. The
  writer waits these out with the same batch and never dead-letters for them.
- **row-caused**: ClickHouse refused an INSERT for the data of some of its
  rows (the codes of :data:`ROW_CAUSED_ERRORS`, and 252 when it says "too
  many partitions for single insert block"). Raised as
  :class:`ClickHouseFailed` with ``row_caused`` true; only then can splitting
  the batch help.
- **anything else** is a bug of ours and propagates unchanged: it is never
  waited out as if ClickHouse were down.

``except SINK_FAILURES`` catches the first two kinds and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sensorhub.errors import SinkError
from sensorhub.sinks.clickhouse import reason

__all__ = ["AUTHENTICATION_FAILED", "ROW_CAUSED_ERRORS", "SINK_FAILURES", "ClickHouseFailed", "refused_for_rows", "sink_boundary"]

# ClickHouse refuses an INSERT with these for the data of some of its rows
# (names as in ClickHouse's ErrorCodes.cpp; a test holds them against the engine).
ROW_CAUSED_ERRORS: dict[str, int] = {
    "CANNOT_PARSE_TEXT": 6,
    "CANNOT_PARSE_ESCAPE_SEQUENCE": 25,
    "CANNOT_PARSE_QUOTED_STRING": 26,
    "CANNOT_PARSE_INPUT_ASSERTION_FAILED": 27,
    "CANNOT_PARSE_DATE": 38,
    "CANNOT_PARSE_DATETIME": 41,
    "ARGUMENT_OUT_OF_BOUND": 69,
    "CANNOT_CONVERT_TYPE": 70,
    "CANNOT_PARSE_NUMBER": 72,
    "INCORRECT_DATA": 117,
    "TOO_LARGE_STRING_SIZE": 131,
    "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE": 321,
    "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO": 395,
    "DECIMAL_OVERFLOW": 407,
    "VIOLATED_CONSTRAINT": 469,
    "UNKNOWN_ELEMENT_OF_ENUM": 691,
}
_ROW_CAUSED_CODES = frozenset(ROW_CAUSED_ERRORS.values())
_TOO_MANY_PARTS = 252  # also "Too many parts" (merges behind): that one is waited out
AUTHENTICATION_FAILED = 516  # a rotated password: reconnect with the password file's new one


def refused_for_rows(exc: BaseException) -> bool:
    """Whether ClickHouse refused an INSERT because of the data of some of its rows.

    Only then can splitting the batch help; every other error (unreachable,
    503, timeouts, ``NOT_ENOUGH_SPACE``, too many parts) is retried as it is.
    """
    code = getattr(exc, "code", None)
    if code == _TOO_MANY_PARTS:
        return "too many partitions for single insert block" in str(exc).lower()
    return code in _ROW_CAUSED_CODES


class ClickHouseFailed(SinkError):
    """A call into ClickHouse failed for ClickHouse's reasons (raised by :func:`sink_boundary`).

    ``row_caused`` says whether the data of some rows caused it (splitting
    helps) or not (retry the same call); ``why`` is ClickHouse's reason in
    one line. The text is that of clickhouse-connect's error.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.code: int | None = getattr(cause, "code", None)
        self.row_caused = refused_for_rows(cause)
        self.why = reason(cause)


#: what a call into ClickHouse raises when ClickHouse (or the way to it) fails
SINK_FAILURES: tuple[type[BaseException], ...] = (SinkError, OSError)


@contextmanager
def sink_boundary() -> Iterator[None]:
    """Run a call into ClickHouse: its failures come out classified (see the module), our bugs unchanged."""
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        yield
    except SINK_FAILURES:
        raise  # ours already, or the socket's: retryable as they are
    except ClickHouseError as exc:
        raise ClickHouseFailed(exc) from exc
