"""The embedded ClickHouse: the chdb engine served over the ClickHouse HTTP interface.

``sensorhub chdb-server --host 127.0.0.1 --port 8123 --data DIR`` runs it;
any ClickHouse HTTP client (clickhouse-connect, curl) talks to it as to a
ClickHouse server. ``--users-file`` makes every query authenticate and gives
each user a role (admin, writer, reader: :mod:`sensorhub.chdb_server.auth`),
``--tls-cert``/``--tls-key`` make it HTTPS; the server's files and the
network are out of reach of every statement unless ``--allow-file-functions``.
See docs/chdb-server.md.
"""

from __future__ import annotations

__all__ = ["ClickHouseError", "ServerConfig"]

from sensorhub.chdb_server.errors import ClickHouseError
from sensorhub.chdb_server.server import ServerConfig
