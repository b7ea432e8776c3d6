"""The little SQL the embedded server reads itself; the engine parses the rest.

A tokenizer (strings, quoted identifiers, comments and bracket depth, so
that a keyword inside a literal is never taken for one) and what the server
needs from it: where the data of an ``INSERT ... FORMAT X`` starts, whether
an INSERT reads a file (``INFILE``), which format a result is in, how many
statements a body holds, ``SET`` and ``USE`` statements, and whether a
statement only reads. No I/O; errors are :class:`~sensorhub.chdb_server.errors.ClickHouseError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from sensorhub.chdb_server.errors import ClickHouseError

__all__ = [
    "InsertHead",
    "has_infile",
    "insert_from_file",
    "is_read_only",
    "output_format",
    "parse_insert_head",
    "parse_set",
    "parse_use",
    "quote_string",
    "scan_statements",
    "statement_count",
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
