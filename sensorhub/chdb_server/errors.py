"""ClickHouse-style errors of the embedded server: codes, wording and HTTP status.

Every error the server answers with is a :class:`ClickHouseError`, worded as
ClickHouse words it (``Code: 62. DB::Exception: ... (SYNTAX_ERROR)``) and
sent with the status ClickHouse's own HTTP handler uses for it, so that a
client (clickhouse-connect reads the code from the text) cannot tell the
embedded server from a real one. :func:`error_from_engine` turns what the
engine raises into one.
"""

from __future__ import annotations

import re

from sensorhub.errors import SensorhubError

__all__ = ["CODES", "ClickHouseError", "error_from_engine"]

# ClickHouse error codes by name (checked against the engine's errorCodeToName in the tests).
CODES: dict[str, int] = {
    "CANNOT_PARSE_TEXT": 6,
    "THERE_IS_NO_COLUMN": 8,
    "DUPLICATE_COLUMN": 15,
    "CANNOT_PARSE_ESCAPE_SEQUENCE": 25,
    "CANNOT_PARSE_QUOTED_STRING": 26,
    "CANNOT_PARSE_INPUT_ASSERTION_FAILED": 27,
    "BAD_ARGUMENTS": 36,
    "UNKNOWN_ELEMENT_IN_AST": 37,
    "CANNOT_PARSE_DATE": 38,
    "CANNOT_PARSE_DATETIME": 41,
    "ILLEGAL_COLUMN": 44,
    "UNKNOWN_FUNCTION": 46,
    "UNKNOWN_IDENTIFIER": 47,
    "NOT_IMPLEMENTED": 48,
    "UNKNOWN_TYPE": 50,
    "TYPE_MISMATCH": 53,
    "UNKNOWN_STORAGE": 56,
    "UNKNOWN_TABLE": 60,
    "SYNTAX_ERROR": 62,
    "UNKNOWN_AGGREGATE_FUNCTION": 63,
    "CANNOT_PARSE_NUMBER": 72,
    "UNKNOWN_FORMAT": 73,
    "CANNOT_OPEN_FILE": 76,
    "UNKNOWN_TYPE_OF_QUERY": 78,
    "UNKNOWN_DATABASE": 81,
    "UNKNOWN_COMPRESSION_METHOD": 89,
    "UNKNOWN_SETTING": 115,
    "FILE_DOESNT_EXIST": 107,
    "INCORRECT_DATA": 117,
    "UNKNOWN_TYPE_OF_AST_NODE": 123,
    "UNKNOWN_DIRECTION_OF_SORTING": 152,
    "TIMEOUT_EXCEEDED": 159,
    "READONLY": 164,
    "TOO_DEEP_AST": 167,
    "TOO_BIG_AST": 168,
    "UNKNOWN_USER": 192,
    "WRONG_PASSWORD": 193,
    "REQUIRED_PASSWORD": 194,
    "SOCKET_TIMEOUT": 209,
    "UNEXPECTED_AST_STRUCTURE": 223,
    "QUERY_IS_TOO_LARGE": 229,
    "CANNOT_DECOMPRESS": 271,
    "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE": 321,
    "UNKNOWN_DATABASE_ENGINE": 336,
    "SESSION_NOT_FOUND": 372,
    "CANNOT_PARSE_UUID": 376,
    "HTTP_LENGTH_REQUIRED": 381,
    "CANNOT_COMPILE_REGEXP": 427,
    "CANNOT_SCHEDULE_TASK": 439,
    "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING": 441,
    "UNKNOWN_ROLE": 511,
    "SET_NON_GRANTED_ROLE": 512,
    "NOT_ENOUGH_SPACE": 243,
    "TOO_MANY_PARTS": 252,
    "VIOLATED_CONSTRAINT": 469,
    "ACCESS_DENIED": 497,
    "AUTHENTICATION_FAILED": 516,
    "CANNOT_PARSE_IPV4": 675,
    "CANNOT_PARSE_IPV6": 676,
    "STD_EXCEPTION": 1001,
}

# ClickHouse's own mapping of exception to HTTP status (exceptionCodeToHTTPStatus.cpp); all
# others are 500. Authentication failures are 401 here (ClickHouse: 403, and 401 only for
# REQUIRED_PASSWORD) so that HTTP tooling recognises them; READONLY is 403 here (ClickHouse: 500).
_STATUS_NAMES: dict[int, frozenset[str]] = {
    401: frozenset({"REQUIRED_PASSWORD", "AUTHENTICATION_FAILED", "UNKNOWN_USER", "WRONG_PASSWORD"}),
    403: frozenset({"SET_NON_GRANTED_ROLE", "READONLY", "ACCESS_DENIED"}),
    400: frozenset(
        {
            "BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT", "CANNOT_PARSE_ESCAPE_SEQUENCE",
            "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE", "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER",
            "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING", "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6",
            "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN",
            "UNKNOWN_ELEMENT_IN_AST", "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST",
            "TOO_BIG_AST", "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
            "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE", "CANNOT_DECOMPRESS",
        }
    ),
    404: frozenset(
        {
            "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE", "UNKNOWN_STORAGE",
            "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING",
            "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE",
            "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE", "SESSION_NOT_FOUND",
        }
    ),
    413: frozenset({"QUERY_IS_TOO_LARGE"}),
    501: frozenset({"NOT_IMPLEMENTED", "UNKNOWN_COMPRESSION_METHOD"}),
    503: frozenset({"SOCKET_TIMEOUT", "CANNOT_OPEN_FILE", "CANNOT_SCHEDULE_TASK"}),
    411: frozenset({"HTTP_LENGTH_REQUIRED"}),
    408: frozenset({"TIMEOUT_EXCEEDED"}),
}
_STATUS_BY_NAME = {name: status for status, names in _STATUS_NAMES.items() for name in names}


class ClickHouseError(SensorhubError):
    """A query failed; carries ClickHouse's error ``code``, symbolic ``name`` and message text.

    ``str()`` is the text ClickHouse would send (``Code: 62. DB::Exception: ...
    (SYNTAX_ERROR)``); :attr:`http_status` the status ClickHouse answers with.
    """

    def __init__(self, code: int, name: str, text: str) -> None:
        self.code = code
        self.name = name
        super().__init__(text)

    @classmethod
    def of(cls, name: str, message: str) -> ClickHouseError:
        """An error raised by the server itself, worded as ClickHouse words it."""
        code = CODES[name]
        return cls(code, name, f"Code: {code}. DB::Exception: {message}. ({name})")

    @property
    def http_status(self) -> int:
        return _STATUS_BY_NAME.get(self.name, 500)

    def body(self, version: str) -> bytes:
        """The response body: the text, with the version trailer real servers add."""
        text = str(self)
        if "(version " not in text:
            text += f" (version {version})"
        return (text + "\n").encode("utf-8", "replace")


_CODE_RE = re.compile(r"Code: (\d+)\. DB::Exception")
_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")
_DOUBLE_RE = re.compile(
    r"^(Code: (?P<code>\d+)\. DB::Exception: )Code: (?P=code)\. DB::Exception: (.*) \(version [^()]*\)\. \([A-Z][A-Z0-9_]+\)$",
    re.DOTALL,
)


def error_from_engine(exc: BaseException) -> ClickHouseError:
    """Turn an engine exception (``Code: NN. DB::Exception: ... (NAME)``) into a :class:`ClickHouseError`."""
    text = str(exc).strip()
    m = _CODE_RE.search(text)
    if m is None:
        return ClickHouseError.of("STD_EXCEPTION", text or type(exc).__name__)
    text = text[m.start() :]  # drop wrappers such as "Streaming insert finish failed: "
    # An error of a running pipeline (an INSERT's data) comes wrapped once more, with the
    # inner version trailer: said once, as a server says it.
    text = _DOUBLE_RE.sub(r"\1\3", text)
    names = _NAME_RE.findall(text)
    name = names[-1] if names else ""
    return ClickHouseError(int(m.group(1)), name, text)
