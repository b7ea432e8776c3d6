"""Request and response bodies of the embedded server, short of their row data.

Decompression of request bodies fed in pieces (``Content-Encoding``: lz4,
zstd, gzip, deflate, and br when brotli is installed), bounded in output;
compression of responses with the client's first accepted encoding; and the
fields of a ``multipart/form-data`` body. The engine parses and produces
every data format (Native, RowBinary, TabSeparated, JSON...): nothing here
reads or writes row data.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import lz4.frame
from backports import zstd

from sensorhub.chdb_server.errors import ClickHouseError

try:  # brotli is optional for clickhouse-connect too; served when installed
    import brotli as _brotli
except ImportError:  # pragma: no cover - depends on the environment
    _brotli = None

__all__ = ["Decoder", "compress_body", "form_fields", "make_decoder"]


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
