"""The one way sensorhub opens Redis: the URL, the ACL user and its password, TLS.

A URL that carries ``USER:PASSWORD@`` (a ``--redis`` argument, ``stack status``) is used as it
is; otherwise ``redis.username`` and ``redis.password`` (or ``redis.password_file``, read at each
call so a rotated secret is used on the next connect) are the credentials. ``rediss://`` connects with TLS, checking the server against ``redis.ca_file`` (or the
system's CAs).

Redis Cluster (``redis.cluster = true``, or a URL with ``?cluster=true``, or one naming several
nodes, ``redis://HOST:PORT,HOST:PORT/0``) gives redis-py's cluster client, with the same
credentials and TLS: the nodes named are where it learns the cluster's slots from; it follows
failovers and slot moves by itself. A cluster has only database 0.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.credentials import CredentialProvider

from sensorhub.config import RedisSettings, read_secret_file
from sensorhub.errors import ConfigError

__all__ = ["cluster_target", "is_cluster", "redis_client", "redis_kwargs"]


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


_TRUE = ("1", "true", "yes", "on")


def cluster_target(cfg: RedisSettings, url: str | None = None) -> tuple[bool, str, list[tuple[str, int]]]:
    """``(cluster?, the URL of the first node, the other nodes named)`` of ``url`` (default ``cfg.url``).

    The URL given back has no ``cluster`` query parameter and names one host, as redis-py expects.
    """
    url = url or cfg.url
    if not cfg.cluster and "," not in url and "cluster=" not in url:
        return False, url, []  # a single Redis: the URL as it is
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    cluster = cfg.cluster or any(k == "cluster" and v.lower() in _TRUE for k, v in query)
    query = [(k, v) for k, v in query if k != "cluster"]
    userinfo, at, hosts = parts.netloc.rpartition("@")
    others: list[tuple[str, int]] = []
    if "," in hosts:
        cluster = True
        first, *rest = hosts.split(",")
        for h in rest:
            host, _, port = h.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError("redis.url", "cluster nodes as HOST:PORT,HOST:PORT", h)
            others.append((host, int(port)))
        hosts = first
    netloc = f"{userinfo}{at}{hosts}"
    return cluster, urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment)), others


def is_cluster(client: Any) -> bool:
    """True for redis-py's cluster clients (sync or asyncio)."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster | AsyncRedisCluster)


def redis_client(cfg: RedisSettings, url: str | None = None, *, asyncio: bool = False, **kw: Any) -> Any:
    """A redis-py client (``redis.asyncio`` with ``asyncio``) for ``url`` (default ``cfg.url``);
    a cluster client when the settings or the URL say Redis Cluster."""
    url = url or cfg.url
    cluster, first, others = cluster_target(cfg, url)
    kwargs = {**redis_kwargs(cfg, url), **kw}
    if cluster:
        if url.startswith("unix://"):
            raise ConfigError("redis.url", "a redis:// or rediss:// URL for Redis Cluster (reached over TCP)", url)
        kwargs.pop("single_connection_client", None)
        if asyncio:
            from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
            from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

            nodes = [AsyncClusterNode(h, p) for h, p in others]
            return AsyncRedisCluster.from_url(first, startup_nodes=nodes or None, **kwargs)
        from redis.cluster import ClusterNode, RedisCluster

        seeds = [ClusterNode(h, p) for h, p in others]  # type: ignore[no-untyped-call]
        return RedisCluster.from_url(first, startup_nodes=seeds or None, **kwargs)
    if asyncio:
        from redis import asyncio as aioredis

        return aioredis.Redis.from_url(first, **kwargs)
    import redis

    return redis.Redis.from_url(first, **kwargs)
