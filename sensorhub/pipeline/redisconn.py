"""The one way sensorhub opens Redis: the URL, the ACL user and its password, TLS.

A URL that carries ``USER:PASSWORD@`` (a ``--redis`` argument, ``stack status``) is used as it
is; otherwise ``redis.username`` and ``redis.password`` (or ``redis.password_file``, read at each
call so a rotated secret is used on the next connect) are the credentials. ``rediss://`` connects with TLS, checking the server against ``redis.ca_file`` (or the
system's CAs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from redis.credentials import CredentialProvider

from sensorhub.config import RedisSettings, read_secret_file

__all__ = ["redis_client", "redis_kwargs"]


class _FileCredentials(CredentialProvider):
    """The ACL user and the password of a file, read each time redis-py opens a connection."""

    def __init__(self, username: str | None, path: Path) -> None:
        self.username = username
        self.path = path

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = read_secret_file(self.path)
        return (self.username, password) if self.username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def redis_kwargs(cfg: RedisSettings, url: str | None = None) -> dict[str, Any]:
    """The credentials and TLS options of ``cfg`` as redis-py keyword arguments."""
    kw: dict[str, Any] = {}
    url = url or cfg.url
    if not re.match(r"^rediss?://[^/@]*@", url):
        if cfg.password_file is not None:
            # read at every new connection: a rotated password is used from the next reconnect on
            kw["credential_provider"] = _FileCredentials(cfg.username, cfg.password_file)
        else:
            password = cfg.secret("password")
            if cfg.username:
                kw["username"] = cfg.username
            if password:
                kw["password"] = password
    if url.startswith("rediss://"):
        kw["ssl_cert_reqs"] = "required"
        if cfg.ca_file is not None:
            kw["ssl_ca_certs"] = str(cfg.ca_file)
    return kw


def redis_client(cfg: RedisSettings, url: str | None = None, *, asyncio: bool = False, **kw: Any) -> Any:
    """A redis-py client (``redis.asyncio`` with ``asyncio``) for ``url`` (default ``cfg.url``)."""
    if asyncio:
        from redis import asyncio as aioredis

        return aioredis.Redis.from_url(url or cfg.url, **redis_kwargs(cfg, url), **kw)
    import redis

    return redis.Redis.from_url(url or cfg.url, **redis_kwargs(cfg, url), **kw)
