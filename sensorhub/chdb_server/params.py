"""The URL parameters of a request to the embedded server, sorted by what they do.

Transport parameters (``query``, ``database``, ``session_id``, ``compress``,
credentials...) shape the HTTP exchange; ``param_*`` fill ``{name:Type}``
placeholders; everything else is a query setting, passed as a string
literal, as ClickHouse's HTTP handler applies URL settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sensorhub.chdb_server.errors import ClickHouseError
from sensorhub.chdb_server.sql import quote_string

__all__ = ["HTTP_ONLY_PARAMS", "RequestParams", "split_params"]

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
