"""The ClickHouse client sensorhub uses: clickhouse-connect over HTTP, from settings."""

from __future__ import annotations

import re
from typing import Any

from sensorhub.config import ClickHouseSettings
from sensorhub.errors import SinkError

__all__ = ["connect", "reason"]


def connect(settings: ClickHouseSettings, database: str | None = None, **kwargs: Any) -> Any:
    """A clickhouse-connect client; raises :class:`SinkError` when ClickHouse is unreachable."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import (
        ClickHouseError,
        DatabaseError,
        OperationalError,
    )

    try:
        return clickhouse_connect.get_client(
            dsn=settings.url,
            username=settings.user,
            password=settings.password.get_secret_value(),
            database=database or "default",
            connect_timeout=settings.connect_timeout_s,
            send_receive_timeout=settings.send_receive_timeout_s,
            autogenerate_session_id=False,
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
