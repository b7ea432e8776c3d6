"""The little SQL the embedded server reads itself; the engine parses the rest.

A tokenizer (strings, heredocs, quoted identifiers, comments and bracket
depth, so that a keyword inside a literal is never taken for one) and what
the server needs from it: where the data of an ``INSERT ... FORMAT X``
starts, whether an INSERT reads a file (``INFILE``), which format a result
is in, how many statements a body holds, ``SET`` and ``USE`` statements,
which role a statement needs (:func:`statement_role`), whether it reaches
the server's files or the network (:func:`outside_access`), and a reader's
statement with the engine's own ``readonly`` setting (:func:`with_readonly`).
No I/O; errors are :class:`~sensorhub.chdb_server.errors.ClickHouseError`.

Where this tokenizer and the engine's lexer could disagree, the access
checks err towards seeing code: a comment ends at the first ``*/`` (the
engine nests them), non-ASCII characters count as spaces (the engine takes
U+200B and U+FEFF for spaces, Python does not), so a call the engine would
run is never hidden from them; the price is a rare refusal of a statement
that only looked like one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sensorhub.chdb_server.errors import ClickHouseError

__all__ = [
    "OUTSIDE_HINT_OVERLAP",
    "OUTSIDE_SETTINGS",
    "InsertHead",
    "has_infile",
    "insert_from_file",
    "is_insert",
    "is_read_only",
    "may_reach_outside",
    "output_format",
    "outside_access",
    "parse_insert_head",
    "parse_set",
    "parse_use",
    "quote_string",
    "scan_statements",
    "statement_count",
    "statement_role",
    "with_readonly",
]


def quote_string(value: str) -> str:
    """A ClickHouse string literal for ``value``."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


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


# A heredoc opens with $tag$ (tag: word characters, maybe none) and runs to the next $tag$,
# as the engine's lexer reads it: its text is a string literal.
_HEREDOC_OPEN_RE = re.compile(r"\$[A-Za-z0-9_]*\$")
# Unmatched heredoc openers with distinct tags each cost a search to the end of the text;
# past this many the statement is refused rather than searched quadratically.
MAX_UNMATCHED_HEREDOCS = 256


def _tokens(text: str, start: int = 0) -> Iterator[_Tok]:
    """Lazy tokens of ``text`` without whitespace and comments, with bracket depth."""
    pos, depth = start, 0
    n = len(text)
    unmatched: set[str] = set()  # heredoc tags with no closing tag after their first opener
    while pos < n:
        if text[pos] == "$":
            h = _HEREDOC_OPEN_RE.match(text, pos)
            if h is not None and h.group() not in unmatched:
                close = text.find(h.group(), h.end())
                if close >= 0:
                    end = close + len(h.group())
                    yield _Tok("string", text[pos:end], pos, end, depth)
                    pos = end
                    continue
                unmatched.add(h.group())
                if len(unmatched) > MAX_UNMATCHED_HEREDOCS:
                    raise ClickHouseError.of(
                        "SYNTAX_ERROR", f"More than {MAX_UNMATCHED_HEREDOCS} unmatched heredoc openers ($tag$)"
                    )
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



# ---------------------------------------------------------------- access


def _significant(statement: str) -> Iterator[_Tok]:
    """Tokens as the access checks read them: non-ASCII characters outside literals are spaces."""
    for tok in _tokens(statement):
        if tok.kind == "punct" and tok.text[0] >= "\x80":
            continue
        yield tok


_READ_ONLY_WORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK"})
# what a writer may CREATE, ALTER, DROP...: the objects rows live in
_TABLE_OBJECTS = frozenset({"TABLE", "VIEW", "INDEX"})


def statement_role(statement: str) -> str:
    """The least role that may run ``statement``: ``"reader"``, ``"writer"`` or ``"admin"``.

    - reader: ``SELECT``, ``WITH``, ``SHOW``, ``DESCRIBE``/``DESC``, ``EXISTS``,
      ``EXPLAIN``, ``CHECK`` (leading parentheses and comments skipped);
    - writer: ``INSERT``, ``DELETE``, ``UPDATE``, ``OPTIMIZE``; ``CREATE`` (also
      ``OR REPLACE``, ``TEMPORARY``), ``ALTER``, ``DROP``, ``TRUNCATE`` of a
      ``TABLE``, ``VIEW`` (also ``MATERIALIZED``, ``LIVE``, ``WINDOW``) or
      ``INDEX``; ``RENAME TABLE``, ``EXCHANGE TABLES``, ``CREATE DATABASE``;
    - admin: everything else, and every statement this does not know: ``DROP``,
      ``RENAME`` or ``TRUNCATE`` of a database, ``ATTACH``/``DETACH``,
      dictionaries, functions, users, roles, quotas, grants, ``SYSTEM``,
      ``KILL``, ``BACKUP``/``RESTORE``, ``SET ROLE``...

    ``SET name = value`` and ``USE db`` are not statements of the engine here
    (:func:`parse_set`, :func:`parse_use`); every role may run them.
    """
    words: list[str] = []
    for tok in _significant(statement):
        if not words and tok.text == "(":
            continue
        if tok.kind != "ident" or len(words) == 6:
            break
        words.append(tok.word)
    if not words:
        return "admin"
    head, rest = words[0], words[1:]
    if head in _READ_ONLY_WORDS:
        return "reader"
    if head in ("INSERT", "DELETE", "UPDATE", "OPTIMIZE"):
        return "writer"
    if head == "CREATE" and rest[:2] == ["OR", "REPLACE"]:
        rest = rest[2:]
    if rest[:1] == ["TEMPORARY"]:
        rest = rest[1:]
    obj = rest[0] if rest else ""
    if head in ("CREATE", "REPLACE", "ALTER", "DROP", "TRUNCATE") and (
        obj in _TABLE_OBJECTS or (obj in ("MATERIALIZED", "LIVE", "WINDOW") and rest[1:2] == ["VIEW"])
    ):
        return "writer"
    if head == "CREATE" and obj == "DATABASE":
        return "writer"
    if head == "TRUNCATE" and obj not in ("DATABASE", "ALL"):
        return "writer"  # TRUNCATE name: a table
    if (head, obj) in (("RENAME", "TABLE"), ("EXCHANGE", "TABLES")):
        return "writer"
    return "admin"


def is_insert(statement: str) -> bool:
    """Whether ``statement`` is an INSERT (leading comments and parentheses skipped)."""
    for tok in _significant(statement):
        if tok.text == "(":
            continue
        return tok.kind == "ident" and tok.word == "INSERT"
    return False


def is_read_only(statement: str) -> bool:
    """Whether ``statement`` only reads (what ``readonly=1`` allows)."""
    return statement_role(statement) == "reader"


# Table functions, table and database engines, dictionary sources and functions that read or
# write the server's files, reach the network, or run programs or Python code in the server
# (chdb's python/arrowstream read the server process's own objects; eval runs a query it builds).
_OUTSIDE_NAMES = frozenset(
    name.lower()
    for name in (
        "file", "fileCluster", "fileLog", "filesystem", "url", "urlCluster", "http",
        "s3", "s3Cluster", "s3Queue", "gcs", "oss", "cosn", "hdfs", "hdfsCluster",
        "remote", "remoteSecure", "cluster", "clusterAllReplicas", "clickhouse",
        "mysql", "materializedMySQL", "postgresql", "materializedPostgreSQL", "sqlite", "mongodb",
        "redis", "cassandra", "jdbc", "odbc", "executable", "executablePool", "kafka", "rabbitmq",
        "nats", "hive", "bigquery", "ytsaurus", "dataLakeCatalog", "backup", "disk",
        "python", "arrowstream", "eval", "catboostEvaluate", "yamlRegExpTree",
    )
)
_OUTSIDE_PREFIXES = ("azureblobstorage", "azurequeue", "deltalake", "hudi", "iceberg", "paimon")
# Settings that name a server file (format schemas and templates, error and schema output
# files) or a network endpoint.
OUTSIDE_SETTINGS = frozenset(
    {
        "format_schema", "format_template_resultset", "format_template_row", "output_format_schema",
        "input_format_record_errors_file_path", "format_avro_schema_registry_url",
    }
)
# A text none of whose words is one of these needs no tokenizing: a quoted identifier spells a
# name either as it is or with a \xHH escape. Words of the lower-cased text, found by a regex
# and looked up in a set: fast also for a text of megabytes.
_WORD_RE = re.compile(r"[a-z_][a-z0-9_$]*")
_WORD_BYTES_RE = re.compile(rb"[a-z_][a-z0-9_$]*")
# how far a hint may reach back across two pieces of a text read piece by piece
OUTSIDE_HINT_OVERLAP = max(len(w) for w in (*_OUTSIDE_NAMES, *OUTSIDE_SETTINGS, *_OUTSIDE_PREFIXES, "outfile"))


def _hinted(words: Iterable[str]) -> bool:
    return any(
        w in _OUTSIDE_NAMES or w in OUTSIDE_SETTINGS or w == "outfile" or w.startswith(_OUTSIDE_PREFIXES)
        for w in words
    )


def _may_reach_outside_text(text: str) -> bool:
    return "\\x" in text or "\\X" in text or _hinted(set(_WORD_RE.findall(text.lower())))


def may_reach_outside(data: bytes) -> bool:
    """False when ``data`` (UTF-8 text, or a piece of it) surely holds nothing
    :func:`outside_access` would find: a quick scan that needs no decoding."""
    if b"\\x" in data or b"\\X" in data:
        return True
    return _hinted(w.decode() for w in set(_WORD_BYTES_RE.findall(data.lower())))


_ESCAPE_RE = re.compile(r"\\(x[0-9A-Fa-f]{2}|.)", re.DOTALL)


def _unquote(text: str) -> str:
    """The name a quoted identifier spells (doubled quotes, backslash escapes)."""
    q, body = text[0], text[1:-1]

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e.startswith("x") and len(e) == 3:
            return chr(int(e[1:], 16))
        return e if e in ("\\", "'", '"', "`") else m.group()

    return _ESCAPE_RE.sub(one, body.replace(q + q, q))


def _name(tok: _Tok) -> str:
    if tok.kind == "ident":
        return tok.text.lower()
    if tok.kind == "quoted" and len(tok.text) >= 2:
        return _unquote(tok.text).lower()
    return ""


def _is_outside_name(name: str) -> bool:
    return name in _OUTSIDE_NAMES or name.startswith(_OUTSIDE_PREFIXES)


# After these words a name followed by "(" is a table and its column list, not a call:
# INSERT INTO file (a, b) ..., CREATE TABLE [IF NOT EXISTS] url (...).
_NAME_BEFORE_COLUMNS = frozenset({"TABLE", "VIEW", "DICTIONARY", "EXISTS"})


def outside_access(text: str) -> str | None:
    """What in ``text`` reads or writes the server's files or reaches the network, or None.

    A call of a table function, table or database engine, dictionary source
    or function of that kind (``file(...)``, ``url (...)``, ``ENGINE = S3(...)``,
    ``` `file`(...) ```, case and spaces as the engine accepts them), ``INTO
    OUTFILE``, or one of :data:`OUTSIDE_SETTINGS`. A column or table named
    ``file`` and a string ``'file('`` are not calls. ``text`` may also be the
    data of an ``INSERT ... VALUES``, whose expressions the engine evaluates.
    """
    if not _may_reach_outside_text(text):
        return None
    first = ""
    prev2: _Tok | None = None
    prev: _Tok | None = None
    pending = ""  # a name of that kind, waiting to see whether "(" follows
    for tok in _significant(text):
        if pending:
            if tok.text == "(":
                return pending
            pending = ""
        if not first and tok.kind == "ident":
            first = tok.word
        name = _name(tok)
        if name:
            if _is_outside_name(name) and not (
                prev is not None
                and (
                    prev.text == "."  # db.file: a table
                    or prev.word == "INTO"
                    or (prev.word in _NAME_BEFORE_COLUMNS and first in ("CREATE", "REPLACE", "INSERT"))
                )
            ):
                pending = (_unquote(tok.text) if tok.kind == "quoted" else tok.text) + "()"
            elif name in OUTSIDE_SETTINGS:
                return f"the setting {name}"
            elif tok.word == "OUTFILE" and prev is not None and prev.word == "INTO" and not (
                prev2 is not None and prev2.word == "INSERT"  # INSERT INTO outfile: a table
            ):
                return "INTO OUTFILE"
        prev2, prev = prev, tok
    return None


def _is_assignment(piece: list[_Tok]) -> bool:
    """Whether top-level tokens ``piece`` are ``name = value`` (value: one literal or name,
    a signed number, a bracketed literal, or a call like ``disk(...)``)."""
    if len(piece) < 3 or piece[0].kind not in ("ident", "quoted") or piece[1].text != "=":
        return False
    value = piece[2:]
    texts = [t.text for t in value]
    if len(value) == 1:
        return value[0].kind != "punct"
    if len(value) == 2:
        return (texts[0] in "+-" and value[1].kind == "number") or texts in (["(", ")"], ["[", "]"], ["{", "}"])
    return len(value) == 3 and value[0].kind == "ident" and texts[1:] == ["(", ")"]


def with_readonly(statement: str, level: int = 2) -> str:
    """``statement`` (a reader's) with the engine's own ``readonly`` setting for it alone.

    Appended to a trailing ``SETTINGS`` clause when the statement ends with
    one, else as a ``SETTINGS`` clause of its own (after ``FORMAT`` too, as
    the engine accepts it); trailing ``;`` and comments are dropped. Level 2
    (what ClickHouse gives GET requests) forbids writes and DDL but lets the
    statement change its settings, as clients such as clickhouse-connect do.
    """
    top: list[_Tok] = [t for t in _significant(statement) if t.depth == 0]
    while top and top[-1].text == ";":
        top.pop()
    if not top:
        return statement
    end = top[-1].end
    for i in range(len(top) - 1, -1, -1):
        tok = top[i]
        if tok.word == "SETTINGS" and i > 0 and top[i - 1].text != ".":
            pieces: list[list[_Tok]] = [[]]
            for t in top[i + 1 :]:
                if t.text == ",":
                    pieces.append([])
                else:
                    pieces[-1].append(t)
            if all(_is_assignment(p) for p in pieces):
                return f"{statement[:end]}, readonly = {level}"
            break
    return f"{statement[:end]}\nSETTINGS readonly = {level}"
