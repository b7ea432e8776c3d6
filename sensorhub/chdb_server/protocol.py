"""The ClickHouse HTTP interface, as far as the engine does not provide it itself.

Pure functions and small classes, no I/O: which URL parameters are transport
parameters and which are query settings, ClickHouse-style errors and their
HTTP status, the little SQL reading the server needs (where the data of an
``INSERT ... FORMAT X`` starts, which format a result is in, ``SET`` and
``USE`` statements), and request/response body (de)compression.

The engine parses and produces every data format (Native, RowBinary,
TabSeparated, JSON...). Nothing here reads or writes row data.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import lz4.frame
from backports import zstd

from sensorhub.errors import SensorhubError

try:  # brotli is optional for clickhouse-connect too; served when installed
    import brotli as _brotli
except ImportError:  # pragma: no cover - depends on the environment
    _brotli = None

__all__ = [
    "CODES",
    "HTTP_ONLY_PARAMS",
    "ClickHouseError",
    "Decoder",
    "InsertHead",
    "RequestParams",
    "compress_body",
    "error_from_engine",
    "has_infile",
    "insert_from_file",
    "is_read_only",
    "make_decoder",
    "output_format",
    "parse_insert_head",
    "parse_set",
    "parse_use",
    "quote_string",
    "scan_statements",
    "split_params",
    "statement_count",
]

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
    "AUTHENTICATION_FAILED": 516,
    "CANNOT_PARSE_IPV4": 675,
    "CANNOT_PARSE_IPV6": 676,
    "STD_EXCEPTION": 1001,
}

# ClickHouse's own mapping of exception to HTTP status (HTTPHandler.cpp); all others are 500.
# Authentication failures are 401 here so that HTTP tooling recognises them.
_STATUS_NAMES: dict[int, frozenset[str]] = {
    401: frozenset({"REQUIRED_PASSWORD", "AUTHENTICATION_FAILED", "UNKNOWN_USER", "WRONG_PASSWORD"}),
    403: frozenset({"SET_NON_GRANTED_ROLE", "READONLY"}),
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


# URL parameters that shape the HTTP exchange and are never query settings.
HTTP_ONLY_PARAMS = frozenset(
    {
        "query", "database", "query_id", "session_id", "session_timeout", "session_check",
        "default_format", "compress", "decompress", "user", "password", "quota_key", "buffer_size",
        "wait_end_of_query", "client_protocol_version", "role", "send_progress_in_http_headers",
        "http_headers_progress_interval_ms", "enable_http_compression", "http_zlib_compression_level",
        "cancel_http_readonly_queries_on_client_close", "http_response_buffer_size",
        "http_wait_end_of_query", "add_http_cors_header", "stacktrace", "max_result_bytes_http",
        "http_native_compression_disable_checksumming_on_decompress", "readonly",
    }
)
_SETTING_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class RequestParams:
    """The URL parameters of one request, sorted by what they do."""

    query: str = ""
    database: str | None = None
    query_id: str = ""
    session_id: str = ""
    session_timeout: float | None = None
    session_check: bool = False
    default_format: str = "TabSeparated"
    user: str | None = None
    password: str | None = None
    compress_response: bool = False  # enable_http_compression=1
    native_compress: bool = False  # compress=1 (ClickHouse block compression of the response)
    native_decompress: bool = False  # decompress=1 (ClickHouse block compression of the request)
    readonly: int = 0
    settings: dict[str, str] = field(default_factory=dict)  # name -> SQL literal
    query_params: dict[str, str] = field(default_factory=dict)  # {name:Type} placeholders


def _truthy(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


def quote_string(value: str) -> str:
    """A ClickHouse string literal for ``value``."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def split_params(pairs: list[tuple[str, str]]) -> RequestParams:
    """Sort URL parameters into transport parameters, query parameters and settings.

    Setting values are passed as string literals, exactly as the ClickHouse
    HTTP handler applies URL settings (it sets them from their text).
    """
    rp = RequestParams()
    for key, value in pairs:
        if key.startswith("param_"):
            rp.query_params[key[6:]] = value
        elif key == "query":
            rp.query = value
        elif key == "database":
            rp.database = value or None
        elif key == "query_id":
            rp.query_id = value
        elif key == "session_id":
            rp.session_id = value
        elif key == "session_timeout":
            try:
                rp.session_timeout = float(value)
            except ValueError:
                raise ClickHouseError.of("BAD_ARGUMENTS", f"Invalid session timeout: '{value}'")
        elif key == "session_check":
            rp.session_check = _truthy(value)
        elif key == "default_format":
            rp.default_format = value or "TabSeparated"
        elif key == "user":
            rp.user = value
        elif key == "password":
            rp.password = value
        elif key == "enable_http_compression":
            rp.compress_response = _truthy(value)
        elif key == "compress":
            rp.native_compress = _truthy(value)
        elif key == "decompress":
            rp.native_decompress = _truthy(value)
        elif key == "readonly":
            try:
                rp.readonly = int(value)
            except ValueError:
                raise ClickHouseError.of("BAD_ARGUMENTS", f"Invalid value for setting 'readonly': '{value}'")
        elif key in HTTP_ONLY_PARAMS:
            continue
        elif not _SETTING_NAME_RE.match(key):
            raise ClickHouseError.of("UNKNOWN_SETTING", f"Unknown setting '{key}'")
        else:
            rp.settings[key] = quote_string(value)
    return rp


# ---------------------------------------------------------------- SQL reading

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*|\#[^\n]*|/\*.*?\*/)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<quoted>`(?:[^`\\]|\\.|``)*`|"(?:[^"\\]|\\.|"")*")
  | (?P<string>'(?:[^'\\]|\\.|'')*')
  | (?P<number>[0-9][0-9A-Za-z_.]*(?:[eE][+-]?[0-9]+)?)
  | (?P<punct>\S)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    start: int
    end: int
    depth: int

    @property
    def word(self) -> str:
        return self.text.upper() if self.kind == "ident" else ""


def _tokens(text: str, start: int = 0) -> Iterator[_Tok]:
    """Lazy tokens of ``text`` without whitespace and comments, with bracket depth."""
    pos, depth = start, 0
    n = len(text)
    while pos < n:
        m = _TOKEN_RE.match(text, pos)
        if m is None:  # an unterminated quote or comment: the rest is one token
            yield _Tok("punct", text[pos:], pos, n, depth)
            return
        kind = m.lastgroup or "punct"
        pos = m.end()
        if kind in ("ws", "comment"):
            continue
        tok_text = m.group()
        if kind == "punct" and tok_text in ")]}":
            depth = max(0, depth - 1)
        yield _Tok(kind, tok_text, m.start(), m.end(), depth)
        if kind == "punct" and tok_text in "([{":
            depth += 1


@dataclass(frozen=True)
class InsertHead:
    """An ``INSERT`` whose data follows the statement: the statement without the
    ``FORMAT`` clause, the input format, and where the data starts in the text."""

    statement: str
    fmt: str
    data_offset: int


# An INSERT's data starts after the format name, spaces and at most one line break
# (ClickHouse's ParserInsertQuery does the same).
_DATA_START_RE = re.compile(r"[ \t\f]*(?:\r?\n)?")


def parse_insert_head(text: str) -> InsertHead | None:
    """If ``text`` is ``INSERT ... FORMAT X <data>`` or ``INSERT ... VALUES <data>``, where its data starts.

    Returns None for any other statement, including ``INSERT ... SELECT``.
    Reading stops at the format name, so ``text`` may be a prefix that ends
    anywhere inside the data.
    """
    toks = _tokens(text)
    first = next(toks, None)
    if first is None or first.word != "INSERT":
        return None
    prev: _Tok = first
    for tok in toks:
        if tok.depth == 0 and tok.kind == "ident":
            word = tok.word
            if word in ("SELECT", "WITH"):
                return None
            if word == "VALUES" and prev.word not in ("INTO", "TABLE") and prev.text != ".":
                return InsertHead(text[: prev.end].strip(), "Values", tok.end)
            if word == "FORMAT" and prev.word not in ("INTO", "TABLE") and prev.text != ".":
                name = next(toks, None)
                if name is None or name.kind not in ("ident", "quoted"):
                    return None
                fmt = name.text.strip('`"') if name.kind == "quoted" else name.text
                m = _DATA_START_RE.match(text, name.end)
                offset = m.end() if m else name.end
                return InsertHead(text[: prev.end].strip(), fmt, offset)
        prev = tok
    return None


def _insert_clause_tokens(statement: str) -> Iterator[tuple[_Tok, _Tok | None]]:
    """Top-level tokens of an INSERT up to its data, SELECT or FORMAT, with the token before each."""
    prev: _Tok | None = None
    for tok in _tokens(statement):
        if tok.depth == 0 and tok.word in ("SELECT", "WITH", "VALUES", "FORMAT") and prev is not None and (
            prev.word not in ("INTO", "TABLE") and prev.text != "."
        ):
            return
        yield tok, prev
        prev = tok


def has_infile(statement: str) -> bool:
    """Whether ``statement`` is an ``INSERT ... FROM INFILE``: a client-side clause that a
    server refuses (it would read the server's own files)."""
    if _first_word(statement) != "INSERT":
        return False
    for tok, prev in _insert_clause_tokens(statement):
        if tok.word == "INFILE" and prev is not None and prev.word == "FROM":
            return True
    return False


def insert_from_file(statement: str, path: str, fmt: str) -> str:
    """``statement`` (an INSERT without its FORMAT clause, as :func:`parse_insert_head` gives
    it) reading its data from the file ``path`` in ``fmt``.

    ``FROM INFILE`` goes where ClickHouse's grammar has it: after the table and
    columns, before a ``SETTINGS`` clause.
    """
    cut = len(statement)
    for tok, prev in _insert_clause_tokens(statement):
        if tok.depth == 0 and tok.word == "SETTINGS" and prev is not None and (
            prev.word not in ("INTO", "TABLE") and prev.text != "."
        ):
            cut = tok.start
            break
    head, tail = statement[:cut].rstrip(), statement[cut:].strip()
    name = fmt if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", fmt) else "`" + fmt.replace("`", "``") + "`"
    clause = f"FROM INFILE {quote_string(path)} COMPRESSION 'none'"
    return f"{head} {clause}{' ' + tail if tail else ''} FORMAT {name}"


# A coarser tokenizer for whole statements, which may be megabytes (long IN lists):
# runs of characters that can be neither keyword, quote, comment nor bracket are one token.
_SCAN_RE = re.compile(
    r"""
    (?P<skip>[^'"`;()\[\]{}\#/\-A-Za-z_]+)
  | (?P<comment>--[^\n]*|\#[^\n]*|/\*.*?\*/)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<quoted>`(?:[^`\\]|\\.|``)*`|"(?:[^"\\]|\\.|"")*")
  | (?P<string>'(?:[^'\\]|\\.|'')*')
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def scan_statements(text: str, default_format: str) -> tuple[int, str]:
    """How many statements ``text`` holds, and the format the last one's result is written in.

    Statements are separated by ``;`` at the top level. The format is the
    trailing ``FORMAT name`` clause (optionally followed by ``SETTINGS``),
    else ``default_format``.
    """
    count, pending, depth = 0, False, 0
    fmt = default_format
    prev_format = False  # the previous top-level token was the keyword FORMAT
    candidate = ""  # "FORMAT name" just seen; kept if the statement ends or SETTINGS follows
    for m in _SCAN_RE.finditer(text):
        kind = m.lastgroup
        if kind == "comment" or (kind == "skip" and m.group().isspace()):
            continue
        tok = m.group()
        if kind == "other" and tok in "([{":
            depth += 1
            pending, prev_format, candidate = True, False, ""
            continue
        if kind == "other" and tok in ")]}":
            depth = max(0, depth - 1)
            pending, prev_format, candidate = True, False, ""
            continue
        if depth:
            continue
        if tok == ";":
            if candidate:
                fmt = candidate
            count += pending
            pending, prev_format, candidate = False, False, ""
            continue
        pending = True
        if candidate and kind == "ident" and tok.upper() == "SETTINGS":
            fmt, candidate = candidate, ""
        elif prev_format and kind in ("ident", "quoted"):
            candidate = tok.strip('`"')
        else:
            candidate = ""
        prev_format = kind == "ident" and tok.upper() == "FORMAT"
    if candidate:
        fmt = candidate
    return count + pending, fmt


def output_format(statement: str, default: str) -> str:
    """The format a statement's result is written in: its trailing ``FORMAT`` clause, else ``default``."""
    return scan_statements(statement, default)[1]


def statement_count(text: str) -> int:
    """How many statements ``text`` holds (``;`` at the top level separates them)."""
    return scan_statements(text, "")[0]


def _first_word(statement: str) -> str:
    first = next(_tokens(statement), None)
    return first.word if first is not None else ""


def _statement_tokens(statement: str) -> list[_Tok]:
    toks = list(_tokens(statement))
    while toks and toks[-1].text == ";":
        toks.pop()
    return toks


def parse_set(statement: str) -> dict[str, str] | None:
    """``SET a = 1, b = 'x'`` as ``{name: SQL literal}``; None when ``statement`` is no plain SET.

    ``SET ROLE`` and ``SET DEFAULT ROLE`` are not settings and return None.
    Raises :class:`ClickHouseError` (SYNTAX_ERROR) on a malformed assignment list.
    """
    if _first_word(statement) != "SET":  # before tokenizing what may be a long statement
        return None
    toks = _statement_tokens(statement)
    if len(toks) > 1 and toks[1].word in ("ROLE", "DEFAULT", "TRANSACTION"):
        return None
    out: dict[str, str] = {}
    i = 1
    while i < len(toks):
        name = toks[i]
        if name.kind != "ident" or i + 2 >= len(toks) or toks[i + 1].text != "=":
            raise ClickHouseError.of("SYNTAX_ERROR", f"Syntax error: failed at position {name.start + 1} ('{name.text}'): {statement}")
        j = i + 2
        value_start = toks[j].start
        # a value runs to the next comma at the assignment's own depth
        while j < len(toks) and not (toks[j].text == "," and toks[j].depth == name.depth):
            j += 1
        value = statement[value_start : toks[j - 1].end].strip()
        out[name.text] = value
        i = j + 1
    if not out:
        raise ClickHouseError.of("SYNTAX_ERROR", f"Syntax error: SET without assignments: {statement}")
    return out


def parse_use(statement: str) -> str | None:
    """The database of ``USE db``; None when ``statement`` is not a USE statement."""
    if _first_word(statement) != "USE":
        return None
    toks = _statement_tokens(statement)
    if len(toks) == 2 and toks[0].word == "USE" and toks[1].kind in ("ident", "quoted"):
        return toks[1].text.strip('`"') if toks[1].kind == "quoted" else toks[1].text
    if len(toks) == 3 and toks[0].word == "USE" and toks[1].word == "DATABASE":
        return toks[2].text.strip('`"')
    return None


_READ_ONLY_WORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK"})


def is_read_only(statement: str) -> bool:
    """Whether ``statement`` only reads (what ``readonly=1`` allows)."""
    first = next((t for t in _tokens(statement) if t.text != "("), None)
    return first is not None and first.word in _READ_ONLY_WORDS


# ---------------------------------------------------------------- compression


class Decoder(Protocol):
    """Decompresses a request body fed in pieces; concatenated frames/members are one stream."""

    def feed(self, data: bytes, max_out: int) -> bytes:
        """Decompress ``data``; raises ``ClickHouseError`` beyond ``max_out`` bytes of output."""
        ...

    def finish(self) -> None:
        """Raise ``ClickHouseError`` when the stream ended inside a frame."""
        ...


class _FrameDecoder:
    """Frame-wise decoder with eof/unused_data semantics (lz4 frame, zstd, gzip, zlib)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._obj = self._new()
        self._started = False

    def _new(self) -> object:
        if self.name == "lz4":
            return lz4.frame.LZ4FrameDecompressor()
        if self.name == "zstd":
            return zstd.ZstdDecompressor()
        if self.name == "gzip":
            return zlib.decompressobj(wbits=31)
        return zlib.decompressobj(wbits=15)  # HTTP "deflate" is the zlib format

    def feed(self, data: bytes, max_out: int) -> bytes:
        out = bytearray()
        try:
            while data:
                self._started = True
                obj = self._obj
                piece = obj.decompress(data)  # type: ignore[attr-defined]
                out += piece
                if len(out) > max_out:
                    raise ClickHouseError.of("QUERY_IS_TOO_LARGE", f"Decompressed request body is larger than {max_out} bytes")
                if getattr(obj, "eof", False):
                    data = obj.unused_data  # type: ignore[attr-defined]
                    self._obj = self._new()
                    self._started = bool(data)
                else:
                    data = b""
        except (RuntimeError, OSError, zlib.error, zstd.ZstdError) as exc:
            raise ClickHouseError.of("CANNOT_DECOMPRESS", f"Cannot decompress {self.name} request body: {exc}")
        return bytes(out)

    def finish(self) -> None:
        if self._started and not getattr(self._obj, "eof", True):
            raise ClickHouseError.of("CANNOT_DECOMPRESS", f"The {self.name} request body ends inside a frame")


class _BrotliDecoder:
    def __init__(self) -> None:
        assert _brotli is not None
        self._obj = _brotli.Decompressor()

    def feed(self, data: bytes, max_out: int) -> bytes:
        try:
            out: bytes = self._obj.process(data)
        except _brotli.error as exc:  # type: ignore[union-attr]
            raise ClickHouseError.of("CANNOT_DECOMPRESS", f"Cannot decompress br request body: {exc}")
        if len(out) > max_out:
            raise ClickHouseError.of("QUERY_IS_TOO_LARGE", f"Decompressed request body is larger than {max_out} bytes")
        return out

    def finish(self) -> None:
        if not self._obj.is_finished():
            raise ClickHouseError.of("CANNOT_DECOMPRESS", "The br request body ends inside a stream")


_DECODERS = ("lz4", "zstd", "gzip", "x-gzip", "deflate")


def make_decoder(content_encoding: str) -> Decoder | None:
    """A decoder for ``Content-Encoding``; None for identity. Unknown encodings raise."""
    enc = content_encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in _DECODERS:
        return _FrameDecoder("gzip" if enc == "x-gzip" else enc)
    if enc == "br" and _brotli is not None:
        return _BrotliDecoder()
    raise ClickHouseError.of("UNKNOWN_COMPRESSION_METHOD", f"Unknown Content-Encoding of the request body: '{content_encoding}'")


def _accepted(accept_encoding: str) -> list[str]:
    """Encodings of an ``Accept-Encoding`` header in the client's order, without those at q=0."""
    out = []
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        key, _, val = params.strip().partition("=")
        if key.strip() == "q":
            try:
                q = float(val)
            except ValueError:
                q = 0.0
        if name and q > 0:
            out.append(name.strip().lower())
    return out


def compress_body(body: bytes, accept_encoding: str) -> tuple[bytes, str | None]:
    """Compress a response with the first encoding in the client's list that is served here."""
    for enc in _accepted(accept_encoding):
        if enc == "lz4":
            return lz4.frame.compress(body), "lz4"
        if enc == "zstd":
            return zstd.compress(body), "zstd"
        if enc in ("gzip", "x-gzip"):
            c = zlib.compressobj(level=3, wbits=31)
            return c.compress(body) + c.flush(), "gzip"
        if enc == "deflate":
            return zlib.compress(body, 3), "deflate"
        if enc == "br" and _brotli is not None:
            return _brotli.compress(body, quality=3), "br"
    return body, None


def form_fields(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """Fields of a ``multipart/form-data`` body (``query``, ``param_*``, settings).

    External data tables (file parts) are not served: they raise NOT_IMPLEMENTED
    with that name, rather than being ignored.
    """
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not msg.is_multipart():
        raise ClickHouseError.of("BAD_ARGUMENTS", "malformed multipart/form-data body")
    out: list[tuple[str, str]] = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise ClickHouseError.of("BAD_ARGUMENTS", "multipart/form-data part without a name")
        if part.get_filename():
            raise ClickHouseError.of(
                "NOT_IMPLEMENTED", f"external data table {name!r} (multipart file part) is not served here"
            )
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        out.append((name, data.decode("utf-8", errors="strict")))
    return out
