"""The ClickHouse client sensorhub uses: clickhouse-connect over HTTP, from settings.

Every client sends :data:`INSERT_SETTINGS` with each statement (where the
account may change them): ``readings`` feeds the rollups' materialized views,
and an INSERT repeated with the same ``insert_deduplication_token`` (a writer
replaying its intent after a crash) must be deduplicated in those views too,
not only in ``readings``. Without it, once an attempt has reached
``readings`` but not every view, each repeat of that INSERT adds its block to
the views again (measured on ClickHouse 26.9).
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from sensorhub.config import ClickHouseSettings
from sensorhub.errors import SinkError

__all__ = ["INSERT_SETTINGS", "connect", "reason", "settings_of"]

INSERT_SETTINGS: dict[str, int] = {"deduplicate_blocks_in_dependent_materialized_views": 1}

# the settings each client was made from, for what needs more of them than the URL (the schema's retention)
_CONNECTED: weakref.WeakKeyDictionary[Any, ClickHouseSettings] = weakref.WeakKeyDictionary()


def connect(settings: ClickHouseSettings, database: str | None = None, **kwargs: Any) -> Any:
    """A clickhouse-connect client; raises :class:`SinkError` when ClickHouse is unreachable."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import (
        ClickHouseError,
        DatabaseError,
        OperationalError,
    )

    # clickhouse-connect takes host and credentials from an https DSN but needs secure=True to use TLS
    tls: dict[str, Any] = {"secure": True} if settings.secure else {}
    if settings.secure and settings.ca_file:
        tls["ca_cert"] = str(settings.ca_file)
    try:
        client = clickhouse_connect.get_client(
            dsn=settings.url,
            username=settings.user,
            password=settings.secret("password") or "",
            database=database or "default",
            connect_timeout=settings.connect_timeout_s,
            send_receive_timeout=settings.send_receive_timeout_s,
            autogenerate_session_id=False,
            **tls,
            **kwargs,
        )
    except DatabaseError as exc:
        if not isinstance(exc, OperationalError):  # it answered, and said no
            raise SinkError(f"ClickHouse at {settings.url} refused the connection: {reason(exc)}") from exc
        raise SinkError(
            f"ClickHouse at {settings.url} unreachable: {reason(exc)} (is it running? check clickhouse.url)"
        ) from exc
    except (ClickHouseError, OSError) as exc:
        raise SinkError(
            f"ClickHouse at {settings.url} unreachable: {reason(exc)} (is it running? check clickhouse.url)"
        ) from exc
    for key, value in INSERT_SETTINGS.items():
        known = client.server_settings.get(key)
        if known is not None and not known.readonly:  # a read-only account inserts nothing anyway
            client.set_client_setting(key, value)
    _CONNECTED[client] = settings
    return client


def settings_of(client: Any) -> ClickHouseSettings | None:
    """The settings :func:`connect` made ``client`` from (None for a client made elsewhere)."""
    return _CONNECTED.get(client)


def reason(exc: BaseException) -> str:
    """The gist of a clickhouse-connect error in one line: the server's ``Code: N. DB::Exception: ...``
    without the version and URL it appends, or the socket error (``Connection refused``)."""
    text = str(exc)
    m = re.search(r"Code: \d+\. .*", text)
    if m:
        return re.sub(r"\s*\((version [^)]*|for url [^)]*)\)", "", m.group(0)).strip()
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
