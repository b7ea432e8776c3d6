"""The ClickHouse HTTP interface over the chdb engine: a threading HTTP/1.1 server.

Each connection has its own thread (bounded by ``max_connections``); the
engine runs one statement at a time (:class:`~sensorhub.chdb_server.engine.Engine`).
``/ping`` never touches the engine, so it answers while a long INSERT runs.

Who may do what (:mod:`sensorhub.chdb_server.auth`): a request authenticates
(unless the server runs without users) before its body is read; its user's
role bounds the statements it may run (:func:`~sensorhub.chdb_server.sql.statement_role`),
a reader's run with the engine's ``readonly`` setting too, and nobody reaches
the server's files or the network through the engine
(:func:`~sensorhub.chdb_server.sql.outside_access`) unless the server was
started with ``--allow-file-functions``. With a certificate the port speaks
HTTPS only (TLS 1.2 or later), the handshake done in the connection's thread.
Passwords, ``Authorization`` headers and ``password=`` parameters never reach
the log.

A request body is read completely (de-chunked, decompressed, bounded by
``max_body_bytes``) into a spooled temporary file before the engine is
asked for, so a slow client never holds the engine. Spooled files are
anonymous: nothing is left behind, not even after kill -9.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from sensorhub.chdb_server.auth import ANONYMOUS, Accounts, User
from sensorhub.chdb_server.codecs import compress_body, form_fields, make_decoder
from sensorhub.chdb_server.engine import Engine, Outcome
from sensorhub.chdb_server.errors import ClickHouseError
from sensorhub.chdb_server.params import RequestParams, split_params
from sensorhub.chdb_server.sql import (
    OUTSIDE_HINT_OVERLAP,
    OUTSIDE_SETTINGS,
    has_infile,
    is_read_only,
    may_reach_outside,
    outside_access,
    parse_insert_head,
    parse_set,
    parse_use,
    scan_statements,
    statement_role,
    with_readonly,
)

__all__ = ["ChdbHTTPServer", "QueryRunner", "ServerConfig", "SessionStore"]

log = logging.getLogger(__name__)

MiB = 1 << 20

# How much of a body is read to find where the data of an ``INSERT ... FORMAT X`` starts.
HEAD_PEEK_BYTES = 1 * MiB
# Insert data is handed to the engine in pieces of this size.
INSERT_CHUNK_BYTES = 4 * MiB


@dataclass(frozen=True)
class ServerConfig:
    """Everything that bounds or configures the server; every bound has a name and a default."""

    host: str = "127.0.0.1"
    port: int = 8123
    data_dir: Path = Path("chdb-data")
    user: str = "default"  # the one user of password_file
    password_file: Path | None = None  # its first line is the password of user (role admin)
    users_file: Path | None = None  # users and roles (auth.USERS_FILE_FORM); neither: no authentication
    tls_cert: Path | None = None  # with tls_key: HTTPS only, TLS 1.2 or later
    tls_key: Path | None = None
    allow_file_functions: bool = False  # let statements reach the server's files and the network
    max_body_bytes: int = 512 * MiB  # raw and decompressed request bodies, each
    spool_bytes: int = 16 * MiB  # bodies above this go to a temporary file
    tmp_dir: Path | None = None  # None: the system's temporary directory
    insert_spool_dir: Path | None = None  # INSERT data for the engine; None: /dev/shm if writable, else system temp
    max_connections: int = 128
    max_sessions: int = 1000
    default_session_timeout_s: float = 60.0
    max_session_timeout_s: float = 3600.0
    idle_timeout_s: float = 60.0  # an idle keep-alive connection is closed after this
    lock_timeout_s: float = 300.0  # a statement waits at most this long for the engine
    background_nice: int = 10  # nice value of the engine's merge threads (0: unchanged)
    verify_inserts_below: int = 1 << 30  # bytes free on the data disk under which INSERTs' parts are checked
    fault_break_insert_parts: tuple[str, ...] = ()  # fault injection: tables whose next INSERT's part is broken


@dataclass
class _Session:
    settings: dict[str, str] = field(default_factory=dict)
    database: str | None = None
    readonly: int = 0  # SET readonly = N in this session: kept here, never applied to the shared engine
    timeout_s: float = 60.0
    last_used: float = 0.0


class SessionStore:
    """HTTP sessions (``session_id``): the settings and database set in them with ``SET``/``USE``.

    Bounded: at most ``max_sessions``, the least recently used goes first;
    a session unused for its timeout is gone, as on ClickHouse.
    """

    def __init__(self, max_sessions: int, default_timeout_s: float, max_timeout_s: float) -> None:
        self.max_sessions = max_sessions
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def get(self, rp: RequestParams, owner: str = "default") -> _Session | None:
        """The request's session (created unless ``session_check=1``); None without ``session_id``.

        A session belongs to the user ``owner`` it was made by, as on ClickHouse:
        another user naming the same ``session_id`` gets a session of its own.
        """
        if not rp.session_id:
            return None
        key = f"{owner}\x00{rp.session_id}"
        timeout = self.default_timeout_s if rp.session_timeout is None else rp.session_timeout
        if not 0 <= timeout <= self.max_timeout_s:
            raise ClickHouseError.of(
                "BAD_ARGUMENTS", f"Session timeout {timeout:g} is out of range 0..{self.max_timeout_s:g}"
            )
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            s = self._sessions.get(key)
            if s is None:
                if rp.session_check:
                    raise ClickHouseError.of("SESSION_NOT_FOUND", f"Session {rp.session_id} not found")
                s = self._sessions[key] = _Session()
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end(key)
            s.timeout_s = timeout
            s.last_used = now
            return s

    def _expire(self, now: float) -> None:
        dead = [k for k, s in self._sessions.items() if now - s.last_used > s.timeout_s]
        for k in dead:
            del self._sessions[k]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


class QueryRunner:
    """Turns one parsed request into engine calls: inserts with data, SET/USE, other statements.

    What the request's :class:`~sensorhub.chdb_server.auth.User` may run is
    checked here, before the engine is asked: its role
    (:func:`~sensorhub.chdb_server.sql.statement_role`; a reader is refused
    with 164 READONLY, a writer with 497 ACCESS_DENIED) and, unless
    ``allow_file_functions``, whatever reaches the server's files or the
    network (497 ACCESS_DENIED, for every role).
    """

    def __init__(self, engine: Engine, sessions: SessionStore, allow_file_functions: bool = False) -> None:
        self.engine = engine
        self.sessions = sessions
        self.allow_file_functions = allow_file_functions

    def run(
        self, rp: RequestParams, body: IO[bytes], body_size: int, user: User = ANONYMOUS
    ) -> tuple[Outcome, str]:
        """Execute the request as ``user``; returns the outcome and the format of its body."""
        session = self.sessions.get(rp, user.name)
        if session is not None and session.readonly:
            rp.readonly = max(rp.readonly, session.readonly)
        self._check_setting_names(rp.settings, user)
        settings = {**session.settings, **rp.settings} if session else dict(rp.settings)
        database = rp.database or (session.database if session else None)

        if rp.query:
            # ClickHouse reads the URL query, a line break, then the body as one text
            head_text = rp.query + "\n"
            ins = parse_insert_head(head_text)
            if ins is not None:
                first = head_text[ins.data_offset :].encode()
                return self._insert(rp, user, ins.statement, ins.fmt, first, body, settings, database)
            text = head_text + _decode(body.read()) if body_size else rp.query
        else:
            peek = body.read(HEAD_PEEK_BYTES)
            # latin-1 keeps byte offsets: the data after the head may be any bytes
            ins = parse_insert_head(peek.decode("latin-1"))
            if ins is not None:
                statement = _decode(ins.statement.encode("latin-1"))
                return self._insert(rp, user, statement, ins.fmt, peek[ins.data_offset :], body, settings, database)
            text = _decode(peek + body.read())

        if not text.strip():
            raise ClickHouseError.of("SYNTAX_ERROR", "Empty query")
        if has_infile(text):
            raise _infile_refused()
        statements, fmt = scan_statements(text, rp.default_format)
        if statements > 1:
            raise ClickHouseError.of("SYNTAX_ERROR", "Multi-statements are not allowed")
        self._check_outside(text, user)
        assignments = parse_set(text)
        if assignments is not None:
            self._set(session, assignments)
            return Outcome(body=b""), rp.default_format
        use_db = parse_use(text)
        if use_db is not None:
            self._check_database(use_db)
            if session is not None:
                session.database = use_db
            return Outcome(body=b""), rp.default_format
        needed = statement_role(text)
        if user.role == "reader" and needed != "reader":
            raise _readonly_refused(user)
        if user.role == "writer" and needed == "admin":
            raise ClickHouseError.of(
                "ACCESS_DENIED",
                f"{user.name}: Not enough privileges. The role writer may read, insert and manage tables "
                "and views; this statement needs the role admin",
            )
        if rp.readonly and not is_read_only(text):
            raise ClickHouseError.of("READONLY", "Cannot execute query in readonly mode")
        if user.role == "reader":
            text = with_readonly(text)  # the engine refuses a write too, whatever got past the check above
        outcome = self.engine.query(
            text, settings=settings, database=database, params=rp.query_params, default_format=rp.default_format
        )
        return outcome, fmt

    def _set(self, session: _Session | None, assignments: dict[str, str]) -> None:
        # readonly stays with the session: set on the one engine context it could not be undone
        level = assignments.pop("readonly", None)
        if level is not None:
            try:
                value = int(level.strip("'\""))
            except ValueError:
                raise ClickHouseError.of("BAD_ARGUMENTS", f"Invalid value for setting 'readonly': {level}")
            if session is not None:
                if session.readonly and value != session.readonly:
                    raise ClickHouseError.of("READONLY", "Cannot modify 'readonly' setting in readonly mode")
                session.readonly = value
        if assignments:
            self.engine.check_settings(assignments)
            if session is not None:
                session.settings.update(assignments)

    def _check_outside(self, text: str, user: User) -> None:
        if self.allow_file_functions:
            return
        what = outside_access(text)
        if what is not None:
            raise _outside_refused(user, what)

    def _check_setting_names(self, settings: dict[str, str], user: User) -> None:
        if self.allow_file_functions:
            return
        for name in settings:
            if name.lower() in OUTSIDE_SETTINGS:
                raise _outside_refused(user, f"the setting {name}")

    def _insert(
        self,
        rp: RequestParams,
        user: User,
        statement: str,
        fmt: str,
        first: bytes,
        body: IO[bytes],
        settings: dict[str, str],
        database: str | None,
    ) -> tuple[Outcome, str]:
        if user.role == "reader":
            raise _readonly_refused(user)
        if rp.readonly:
            raise ClickHouseError.of("READONLY", "Cannot execute query in readonly mode")
        if has_infile(statement):
            raise _infile_refused()
        self._check_outside(statement, user)
        if fmt.lower() == "values" and not self.allow_file_functions and _values_may_reach_outside(first, body):
            # the engine evaluates expressions in VALUES data: file('/etc/passwd') would be read
            first += body.read()
            self._check_outside(first.decode("utf-8", "replace"), user)

        def chunks() -> Iterator[bytes]:
            if first:
                yield first
            while piece := body.read(INSERT_CHUNK_BYTES):
                yield piece

        outcome = self.engine.insert(statement, fmt, chunks(), settings=settings, database=database)
        return outcome, rp.default_format

    def _check_database(self, name: str) -> None:
        out = self.engine.query(
            "SELECT count() FROM system.databases WHERE name = {db:String}",
            settings={},
            database=None,
            params={"db": name},
            default_format="TSV",
        )
        if out.body.strip() != b"1":
            raise ClickHouseError.of("UNKNOWN_DATABASE", f"Database {name} does not exist")


def _values_may_reach_outside(first: bytes, body: IO[bytes]) -> bool:
    """A quick scan of ``first`` and the rest of ``body`` (left where it was) for what
    :func:`~sensorhub.chdb_server.sql.outside_access` looks for; only then is the data decoded."""
    start = body.tell()
    tail = b""
    try:
        piece = first
        while piece:
            if may_reach_outside(tail + piece):
                return True
            tail = piece[-OUTSIDE_HINT_OVERLAP:]
            piece = body.read(INSERT_CHUNK_BYTES)
        return False
    finally:
        body.seek(start)


def _readonly_refused(user: User) -> ClickHouseError:
    # as ClickHouse words it for a user whose profile is readonly
    return ClickHouseError.of("READONLY", f"{user.name}: Cannot execute query in readonly mode")


def _outside_refused(user: User, what: str) -> ClickHouseError:
    return ClickHouseError.of(
        "ACCESS_DENIED",
        f"{user.name}: Not enough privileges. {what} reads or writes the server's files or reaches the "
        "network, which this server refuses (start it with --allow-file-functions to allow it)",
    )


def _infile_refused() -> ClickHouseError:
    # as ClickHouse words it: FROM INFILE is read by clickhouse-client, never by a server
    return ClickHouseError.of("UNKNOWN_TYPE_OF_QUERY", "Query has infile and was send directly to server")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClickHouseError.of("BAD_ARGUMENTS", f"The query is not valid UTF-8 (at byte {exc.start})")


_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "Native": "application/octet-stream",
    "RowBinary": "application/octet-stream",
    "Arrow": "application/octet-stream",
    "ArrowStream": "application/octet-stream",
    "Parquet": "application/octet-stream",
}


def _content_type(fmt: str) -> str:
    if fmt in _CONTENT_TYPES:
        return _CONTENT_TYPES[fmt]
    if fmt.startswith("JSON"):
        return "application/json; charset=UTF-8"
    if fmt.startswith("RowBinary"):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


class _BodyTooLarge(ClickHouseError):
    """The request body exceeds ``max_body_bytes`` (raw or decompressed)."""


class Handler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection; requests on it are handled one after another."""

    protocol_version = "HTTP/1.1"
    server_version = "sensorhub-chdb-server"
    # Headers and body go out in two writes; with Nagle's algorithm the body
    # waits for the client's delayed ACK of the headers: 40 ms on every query.
    disable_nagle_algorithm = True
    server: ChdbHTTPServer

    # -- routing

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        if url.path == "/ping" or (url.path == "/" and method != "POST" and not url.query):
            self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"}, head=method == "HEAD")
            return
        if url.path not in ("/", "/query"):
            self._discard_body()
            text = f"There is no handle {url.path}\n\nUse / or /ping for health checks.\n".encode()
            self._send(404, text, {"Content-Type": "text/plain; charset=UTF-8"})
            return
        self._query(url.query, method)

    # -- queries

    def _query(self, url_query: str, method: str) -> None:
        cfg = self.server.config
        engine = self.server.runner.engine
        query_id = ""
        started = time.monotonic()
        body_read = False
        try:
            try:
                pairs = parse_qsl(url_query, keep_blank_values=True, max_num_fields=10_000, strict_parsing=False)
            except ValueError as exc:
                raise ClickHouseError.of("BAD_ARGUMENTS", f"Malformed URL parameters: {exc}")
            rp = split_params(pairs)
            query_id = rp.query_id or str(uuid.uuid4())
            user = self._authenticate(rp)
            if rp.native_decompress or rp.native_compress:
                raise ClickHouseError.of(
                    "NOT_IMPLEMENTED",
                    "ClickHouse block compression (compress=1/decompress=1) is not served here; "
                    "use Content-Encoding and enable_http_compression=1",
                )
            content_type = self.headers.get("Content-Type", "")
            if method == "GET" and not rp.readonly:
                rp.readonly = 2  # as on ClickHouse: GET requests only read
            tmp_dir = str(cfg.tmp_dir) if cfg.tmp_dir else None
            with tempfile.SpooledTemporaryFile(max_size=cfg.spool_bytes, dir=tmp_dir) as body:
                size = self._read_body(body)
                body_read = True
                body.seek(0)
                if content_type.startswith("multipart/form-data"):
                    # clickhouse-connect sends long queries with bound parameters as form fields
                    readonly = rp.readonly
                    pairs = pairs + form_fields(content_type, body.read(size))
                    rp = split_params(pairs)
                    rp.readonly = readonly or rp.readonly
                    body.seek(0)
                    body.truncate()
                    size = 0
                outcome, fmt = self.server.runner.run(rp, body, size, user)
        except ClickHouseError as err:
            if not body_read:
                self._discard_body()  # an unread body would be taken for the next request
            log.info("query %s failed (%d): %s", query_id or "-", err.http_status, redact(str(err))[:500])
            self._send_error(err, query_id)
            return
        except (ConnectionError, TimeoutError) as exc:
            log.info("query %s: client went away while sending: %s", query_id or "-", exc)
            self.close_connection = True
            return
        headers = {
            "Content-Type": _content_type(fmt),
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Timezone": engine.timezone,
            "X-ClickHouse-Server-Display-Name": engine.display_name,
            "X-ClickHouse-Summary": json.dumps(outcome.summary(), separators=(",", ":")),
        }
        payload = outcome.body
        if rp.compress_response and payload:
            payload, encoding = compress_body(payload, self.headers.get("Accept-Encoding", ""))
            if encoding:
                headers["Content-Encoding"] = encoding
        self._send(200, payload, headers, head=method == "HEAD")
        log.debug("query %s ok in %.1f ms", query_id, (time.monotonic() - started) * 1e3)

    def _authenticate(self, rp: RequestParams) -> User:
        accounts = self.server.accounts
        if not accounts.required:
            return ANONYMOUS
        user = self.headers.get("X-ClickHouse-User")
        password = self.headers.get("X-ClickHouse-Key")
        auth = self.headers.get("Authorization", "")
        if user is None and auth.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise ClickHouseError.of("AUTHENTICATION_FAILED", "Malformed Basic authorization header")
        if user is None:
            user, password = rp.user, rp.password
        return accounts.authenticate(user, password)

    # -- request bodies

    def _raw_pieces(self) -> Iterator[bytes]:
        cfg = self.server.config
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._chunked_pieces()
            return
        length_text = self.headers.get("Content-Length")
        if not length_text:
            return
        try:
            remaining = int(length_text)
        except ValueError:
            raise ClickHouseError.of("BAD_ARGUMENTS", f"Invalid Content-Length: {length_text!r}")
        if remaining > cfg.max_body_bytes:
            raise _BodyTooLarge.of(
                "QUERY_IS_TOO_LARGE",
                f"Request body of {remaining} bytes is larger than max_body_bytes ({cfg.max_body_bytes})",
            )
        while remaining > 0:
            piece = self.rfile.read(min(remaining, MiB))
            if not piece:
                raise ConnectionError("request body ended early")
            remaining -= len(piece)
            yield piece

    def _chunked_pieces(self) -> Iterator[bytes]:
        for _ in range(1 << 30):  # bounded by max_body_bytes in _read_body long before this
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise ConnectionError("bad or missing chunk size line")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ClickHouseError.of("BAD_ARGUMENTS", "Malformed chunked request body")
            if size == 0:
                for _ in range(100):  # trailers, then the empty line
                    if self.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                        return
                raise ClickHouseError.of("BAD_ARGUMENTS", "Too many trailer lines in chunked request body")
            while size > 0:
                piece = self.rfile.read(min(size, MiB))
                if not piece:
                    raise ConnectionError("chunked request body ended early")
                size -= len(piece)
                yield piece
            self.rfile.readline(8)  # CRLF after the chunk data

    def _read_body(self, out: IO[bytes]) -> int:
        """Copy the (decompressed) request body into ``out``; returns its size."""
        limit = self.server.config.max_body_bytes
        decoder = make_decoder(self.headers.get("Content-Encoding", ""))
        raw_total = total = 0
        for piece in self._raw_pieces():
            raw_total += len(piece)
            if raw_total > limit:
                raise _BodyTooLarge.of(
                    "QUERY_IS_TOO_LARGE", f"Request body is larger than max_body_bytes ({limit})"
                )
            if decoder is not None:
                try:
                    piece = decoder.feed(piece, limit - total)
                except ClickHouseError as err:
                    if err.name != "QUERY_IS_TOO_LARGE":
                        raise
                    raise _BodyTooLarge.of(
                        "QUERY_IS_TOO_LARGE", f"Decompressed request body is larger than max_body_bytes ({limit})"
                    )
            total += len(piece)
            if total > limit:
                raise _BodyTooLarge.of(
                    "QUERY_IS_TOO_LARGE", f"Decompressed request body is larger than max_body_bytes ({limit})"
                )
            out.write(piece)
        if decoder is not None:
            decoder.finish()
        return total

    def _discard_body(self) -> None:
        """Close the connection after this response if the request's body was not read."""
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    # -- responses

    def _send_error(self, err: ClickHouseError, query_id: str) -> None:
        engine = self.server.runner.engine
        headers = {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Exception-Code": str(err.code),
            "X-ClickHouse-Server-Display-Name": engine.display_name,
            "X-ClickHouse-Timezone": engine.timezone,
        }
        if query_id:
            headers["X-ClickHouse-Query-Id"] = query_id
        if err.http_status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="ClickHouse server"'
        self._send(err.http_status, err.body(engine.version), headers)

    def _send(self, status: int, payload: bytes, headers: dict[str, str], head: bool = False) -> None:
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            if self.close_connection:
                self.send_header("Connection", "close")
            else:
                self.send_header("Keep-Alive", f"timeout={int(self.server.config.idle_timeout_s)}")
            self.end_headers()
            if not head and payload:
                self.wfile.write(payload)
        except (ConnectionError, TimeoutError) as exc:
            log.info("client went away before the response was sent: %s", exc)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        # the request line carries the URL parameters: password= among them
        log.debug("%s %s", self.address_string(), redact(format % args))


# password=VALUE in a URL (request lines), password = 'VALUE' and IDENTIFIED ... BY 'VALUE' in SQL
_URL_TARGET_RE = re.compile(r"(\S*\?)(\S+)")
_SQL_SECRET_RE = re.compile(r"(?i)(\bIDENTIFIED\b[^']{0,80}?\bBY\s*|\bpassword\s*=\s*)'(?:[^'\\]|\\.)*'")
_SECRET_PARAMS = frozenset({"password", "quota_key"})


def _redact_query_string(m: re.Match[str]) -> str:
    try:
        pairs = parse_qsl(m.group(2), keep_blank_values=True, max_num_fields=10_000)
    except ValueError:
        return m.group(1) + "[unparsed parameters]"
    if not any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
        return m.group()
    shown = [(k, "[HIDDEN]" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs]
    return m.group(1) + urlencode(shown, safe="[]")


def redact(text: str) -> str:
    """``text`` for the log: the values of ``password`` URL parameters (also percent-encoded
    ones) and of passwords in SQL replaced by ``[HIDDEN]``."""
    if "?" in text:
        text = _URL_TARGET_RE.sub(_redact_query_string, text)
    return _SQL_SECRET_RE.sub(r"\1'[HIDDEN]'", text)


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server side of HTTPS: TLS 1.2 or later, ``cert`` (PEM, with its chain) and ``key``.

    Raises :class:`OSError` or :class:`ssl.SSLError` for unreadable or mismatched files.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class ChdbHTTPServer(ThreadingHTTPServer):
    """Threading HTTP server over one engine; at most ``max_connections`` connections at a time.

    With ``tls`` every connection is HTTPS: the handshake runs in the
    connection's own thread, bounded by ``idle_timeout_s``, so a client that
    never finishes it holds one slot for that long and never the listener.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(
        self,
        config: ServerConfig,
        runner: QueryRunner,
        accounts: Accounts | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.accounts = accounts or Accounts.anonymous()
        self.tls = tls
        self._slots = threading.BoundedSemaphore(config.max_connections)
        # the socket timeout closes idle keep-alive connections
        handler = type("Handler", (Handler,), {"timeout": config.idle_timeout_s})
        super().__init__((config.host, config.port), handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.config.idle_timeout_s)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)  # the handshake; closes itself on failure
        except (OSError, ValueError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(conn, client_address)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            log.info("TLS connection with %s ended: %s", client_address[0], exc)
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if self.tls is not None:  # no plain answer to a TLS client: close
                self.shutdown_request(request)
                return
            # over the bound: say so and close, rather than queue without limit
            body = b"Code: 202. DB::Exception: Too many simultaneous connections. (TOO_MANY_SIMULTANEOUS_QUERIES)\n"
            try:
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nX-ClickHouse-Exception-Code: 202\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        super().server_bind()
