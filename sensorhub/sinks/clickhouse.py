"""The ClickHouse client sensorhub uses: clickhouse-connect over HTTP, from settings."""

from __future__ import annotations

from typing import Any

from sensorhub.config import ClickHouseSettings
from sensorhub.errors import SinkError

__all__ = ["connect"]


def connect(settings: ClickHouseSettings, database: str | None = None, **kwargs: Any) -> Any:
    """A clickhouse-connect client; raises :class:`SinkError` when ClickHouse is unreachable."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ClickHouseError

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
    except (ClickHouseError, OSError) as exc:
        raise SinkError(f"ClickHouse at {settings.url} unreachable: {exc}") from exc
