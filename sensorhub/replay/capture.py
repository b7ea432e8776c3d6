"""Reader of recorded exchange traffic (``*.jsonl.zst``, layout version 2).

A capture is zstd-compressed JSON Lines: a header line, then records of kind
``connect``, ``send``, ``recv`` and ``http``, grouped by connection. Text
frames and REST bodies are stored as one JSON string holding the exact text
(parsed a second time here only where needed); binary frames as ``b64``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zstandard

from sensorhub.errors import ConfigError, InvalidValue, SyntaxError_

__all__ = ["Capture", "CaptureConnection", "CaptureRecord", "HttpExchange", "read_capture"]

#: Bound on the decompressed size of a capture, against a corrupt or hostile file.
MAX_CAPTURE_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """One frame: ``kind`` is ``"send"`` (client to venue) or ``"recv"`` (venue to client)."""

    kind: str
    ts: float
    data: str | bytes  # str: a text frame; bytes: a binary frame


@dataclass
class CaptureConnection:
    """One recorded WebSocket connection, its frames in order."""

    conn_id: str
    addr: str
    records: list[CaptureRecord] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The URL path of ``addr`` (``/`` when empty)."""
        return urlsplit(self.addr).path or "/"

    @property
    def target(self) -> str:
        """Path and query of ``addr``, as a client would request it."""
        parts = urlsplit(self.addr)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def frames(self) -> list[str | bytes]:
        """The frames the venue sent, in order."""
        return [r.data for r in self.records if r.kind == "recv"]

    def sends(self) -> list[str | bytes]:
        """The frames the recording client sent, in order."""
        return [r.data for r in self.records if r.kind == "send"]


@dataclass(frozen=True, slots=True)
class HttpExchange:
    """One recorded REST request (URL) and its response body."""

    url: str
    ts: float
    body: str


@dataclass
class Capture:
    """A whole recording: header, WebSocket connections in file order, REST exchanges."""

    exchange: str
    header: dict[str, Any]
    connections: list[CaptureConnection]
    http: list[HttpExchange]

    def frames(self) -> list[str | bytes]:
        """Every frame the venue sent, connection after connection."""
        return [f for c in self.connections for f in c.frames()]


def _text(path: Path) -> str:
    with path.open("rb") as fh:
        raw = fh.read(8)
        fh.seek(0)
        if raw.startswith(b"\x28\xb5\x2f\xfd"):  # zstd magic
            reader = zstandard.ZstdDecompressor().stream_reader(fh)
            data = reader.read(MAX_CAPTURE_BYTES + 1)
        else:
            data = fh.read(MAX_CAPTURE_BYTES + 1)
    if len(data) > MAX_CAPTURE_BYTES:
        raise InvalidValue(f"{path}: larger than {MAX_CAPTURE_BYTES} bytes decompressed")
    return data.decode("utf-8")


def read_capture(path: str | Path) -> Capture:
    """Read a capture file (zstd-compressed or plain JSON Lines).

    Raises ``SyntaxError_``/``InvalidValue`` naming the line for a file that
    does not follow the layout.
    """
    path = Path(path)
    try:
        text = _text(path)
    except zstandard.ZstdError as exc:
        raise InvalidValue(f"{path}: not a zstd stream ({exc})") from None
    except UnicodeDecodeError as exc:
        raise SyntaxError_(f"{path}: not UTF-8 text ({exc})") from None
    header: dict[str, Any] | None = None
    conns: dict[str, CaptureConnection] = {}
    http: list[HttpExchange] = []
    for lineno, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise SyntaxError_(f"{path}:{lineno}: {exc}") from None
        if not isinstance(rec, dict):
            raise InvalidValue(f"{path}:{lineno}: a record must be a JSON object")
        kind = rec.get("t")
        try:
            if kind == "header":
                header = rec
            elif kind == "connect":
                conns[rec["conn"]] = CaptureConnection(rec["conn"], rec["addr"])
            elif kind in ("send", "recv"):
                conn = conns.get(rec["conn"])
                if conn is None:
                    raise InvalidValue(f"{path}:{lineno}: {kind} before connect of {rec['conn']}")
                data: str | bytes = base64.b64decode(rec["b64"], validate=True) if "b64" in rec else rec["data"]
                conn.records.append(CaptureRecord(kind, float(rec["ts"]), data))
            elif kind == "http":
                http.append(HttpExchange(rec["url"], float(rec["ts"]), rec.get("data") or ""))
            else:
                raise InvalidValue(f"{path}:{lineno}: unknown record kind {kind!r}")
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise InvalidValue(f"{path}:{lineno}: {type(exc).__name__}: {exc}") from None
    if header is None:
        raise InvalidValue(f"{path}: no header line")
    return Capture(str(header.get("exchange", "")), header, list(conns.values()), http)


def default_capture_dir() -> Path:
    """Where the recorded exchange captures are: ``SENSORHUB_CAPTURES``, else the
    ``shared/captures`` folder beside the project checkout.

    Raises :class:`ConfigError` naming ``SENSORHUB_CAPTURES`` when neither exists.
    """
    env = os.environ.get("SENSORHUB_CAPTURES")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "captures"
        if (parent / "pyproject.toml").exists() and cand.is_dir():
            return cand
    raise ConfigError(
        "SENSORHUB_CAPTURES",
        "a folder of recorded exchange captures (found by default at shared/captures beside the checkout)",
        "not set, and no shared/captures beside the checkout",
    )
