"""The credentials of one stack directory: who each service is, and where its secret lives.

``ensure_credentials(DIR)`` makes, once, and keeps afterwards:

- ``DIR/secrets/<account>`` (directory 0700, files 0600): one random password per account, read by
  the services through their ``*_password_file`` settings, never passed in argv or the environment;
- ``DIR/tls/``: the private CA and the server certificate (:mod:`sensorhub.security.pki`);
- ``DIR/mosquitto/passwd`` and ``DIR/mosquitto/acl``: the broker's accounts and ACL
  (:mod:`sensorhub.security.broker`);
- ``DIR/redis/users.acl``: Redis ACL users, one per role, the default user off (:func:`redis_acl_text`);
- ``DIR/chdb/users.json``: the chdb-server's users and roles.

Restarting a stack on the same directory keeps every password, so nothing outside has to change;
rotating one is :func:`rotate`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sensorhub.config import TopicRoute, read_secret_file
from sensorhub.security import broker, pki, write_private

__all__ = ["CLICKHOUSE_USERS", "MQTT_ACCOUNTS", "REDIS_USERS", "Credentials", "ensure_credentials", "redis_acl_text"]

MQTT_ACCOUNTS = (broker.INGEST_ACCOUNT, broker.TOOLS_ACCOUNT)  # the accounts `stack rotate` knows
# Redis ACL users and what they may do (``ACL SETUSER`` rules after ``on`` and the password).
# The ingest and writer run Lua (EVALSHA) and MULTI over the stream keys; the monitor only reads;
# nobody but admin may run CONFIG, FLUSHALL, DEBUG, KEYS, SHUTDOWN and the rest of @dangerous
# (INFO and CLIENT SETNAME/ID are let through explicitly). A cluster client learns the slots
# (CLUSTER SLOTS, or SHARDS) and the commands' key positions (COMMAND) when it connects: the roles
# on +@all have them; the monitor gets just those three.
REDIS_USERS: dict[str, str] = {
    "admin": "~* &* +@all",
    "ingest": "~{prefix}:* &{prefix}:* +@all -@dangerous +info +client|setname +client|id",
    "writer": "~{prefix}:* &{prefix}:* +@all -@dangerous +info +client|setname +client|id",
    "alerts": "~{prefix}:* &{prefix}:* +@all -@dangerous +info +client|setname +client|id",
    "monitor": "~{prefix}:* resetchannels &{prefix}:* -@all +@read +@connection +info "
               "+client|setname +subscribe +psubscribe +unsubscribe +punsubscribe -@write -@dangerous +info "
               "+cluster|slots +cluster|shards +command",
}
# chdb-server users and roles (sensorhub/chdb_server: admin everything, writer inserts and keeps
# the schema, reader only reads)
CLICKHOUSE_USERS: dict[str, str] = {"admin": "admin", "writer": "writer", "monitor": "reader"}


def redis_acl_text(passwords: dict[str, str], prefix: str = "sh") -> str:
    """The Redis ACL file: the default user off, and one user per role, passwords as SHA-256 hashes.

    The default user is off and has no password, so no client can act as it; new connections
    must AUTH as a named user. It keeps every right all the same: Redis 7.0 replays the AOF as
    the default user, and a transaction in it (a Lua script's effects, a MULTI) that the default
    user may not run is dropped on restart with "NOPERM ACLs rules changed" (found by the fault
    test that kills Redis and restarts it from its AOF).
    """
    lines = ["user default off resetpass ~* &* +@all"]
    for name, rules in REDIS_USERS.items():
        digest = hashlib.sha256(passwords[name].encode()).hexdigest()
        lines.append(f"user {name} on #{digest} resetchannels {rules.format(prefix=prefix)}")
    return "\n".join(lines) + "\n"


def chdb_users_text(passwords: dict[str, str]) -> str:
    users = {
        name: {"password_sha256_hex": hashlib.sha256(passwords[name].encode()).hexdigest(), "role": role}
        for name, role in CLICKHOUSE_USERS.items()
    }
    return json.dumps({"users": users}, indent=1) + "\n"


@dataclass(frozen=True)
class Credentials:
    """Where one stack directory keeps its secrets; the passwords themselves stay in the files."""

    dir: Path

    @property
    def secrets(self) -> Path:
        return self.dir / "secrets"

    def password_file(self, service: str, account: str) -> Path:
        """``secrets/<service>-<account>``: e.g. ``mqtt-sensorhub-ingest``, ``redis-writer``."""
        return self.secrets / f"{service}-{account}"

    def password(self, service: str, account: str) -> str:
        return read_secret_file(self.password_file(service, account))

    @property
    def alerts_token_file(self) -> Path:
        """The alert gateway's token (its page and WebSocket want it): ``alerts.token_file``."""
        return self.secrets / "alerts-token"

    def alerts_token(self) -> str:
        return read_secret_file(self.alerts_token_file)

    @property
    def ingest_user_file(self) -> Path:
        """The account the ingest logs in with now (``sensorhub-ingest`` or ``sensorhub-ingest-alt``)."""
        return self.secrets / "mqtt-ingest-user"

    @property
    def ingest_password_file(self) -> Path:
        """That account's password: the ingest's ``mqtt.password_file``."""
        return self.secrets / "mqtt-ingest-password"

    def ingest_user(self) -> str:
        return read_secret_file(self.ingest_user_file)

    def rotate_ingest_begin(self) -> tuple[str, str]:
        """Step 1 of rotating the ingest's MQTT password: the other ingest account gets a new password
        (the broker then knows both). Returns ``(old, new)`` account names."""
        old = self.ingest_user()
        new = broker.INGEST_ALT_ACCOUNT if old == broker.INGEST_ACCOUNT else broker.INGEST_ACCOUNT
        write_private(self.password_file("mqtt", new), broker.new_password() + "\n")
        self._write_server_files()
        return old, new

    def rotate_ingest_switch(self, new: str) -> None:
        """Step 2: the ingest's files name the new account; it uses them from its next connect."""
        write_private(self.ingest_password_file, self.password("mqtt", new) + "\n")
        write_private(self.ingest_user_file, new + "\n")

    def rotate_ingest_end(self, old: str) -> None:
        """Step 3, once the ingest runs as the new account: the old one is deleted."""
        self.password_file("mqtt", old).unlink(missing_ok=True)
        self._write_server_files()

    @property
    def tls(self) -> Path:
        return self.dir / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls / "ca.crt"

    @property
    def server_cert(self) -> pki.CertPair:
        return pki.CertPair(self.tls / "server.crt", self.tls / "server.key")

    @property
    def mqtt_password_file(self) -> Path:
        return self.dir / "mosquitto" / "passwd"

    @property
    def mqtt_acl_file(self) -> Path:
        return self.dir / "mosquitto" / "acl"

    @property
    def redis_acl_file(self) -> Path:
        return self.dir / "redis" / "users.acl"

    @property
    def chdb_users_file(self) -> Path:
        return self.dir / "chdb" / "users.json"

    def devices(self) -> list[str]:
        return broker.list_devices(self.mqtt_password_file)

    def add_device(self, name: str) -> str:
        """A new password for device ``name`` (replacing an earlier one); only its hash is kept."""
        return broker.add_device(self.mqtt_password_file, name)

    def remove_device(self, name: str) -> bool:
        return broker.remove_device(self.mqtt_password_file, name)

    def rotate(self, service: str, account: str) -> str:
        """A new password for a service account, written to its secret file and to the server's file.

        Not for the ingest's MQTT account (:meth:`rotate_ingest_begin`: the broker would drop its
        session's subscriptions).

        The server must then reload (mosquitto: SIGHUP; Redis: ``ACL LOAD``; chdb-server: reads its
        users file again when it changes); clients read the secret file again when they reconnect.
        """
        password = broker.new_password()
        write_private(self.password_file(service, account), password + "\n")
        self._write_server_files()
        return password

    def _passwords(self, service: str, names: Iterable[str]) -> dict[str, str]:
        return {n: self.password(service, n) for n in names}

    def _write_server_files(self, routes: Iterable[TopicRoute] | None = None, prefix: str | None = None) -> None:
        accounts = broker.read_password_file(self.mqtt_password_file)
        for name in broker.SERVICE_ACCOUNTS:
            if not self.password_file("mqtt", name).exists():
                accounts.pop(name, None)  # an ingest account not in use
                continue
            hashed = accounts.get(name)
            password = self.password("mqtt", name)
            if hashed is None or not broker.verify_password(password, hashed):
                accounts[name] = broker.hash_password(password)
        broker.write_password_file(self.mqtt_password_file, accounts)
        if routes is not None:
            write_private(self.mqtt_acl_file, broker.acl_text(routes))
        meta = self.dir / "secrets" / "redis-prefix"
        if prefix is not None:
            write_private(meta, prefix + "\n")
        prefix = read_secret_file(meta) if meta.exists() else "sh"
        write_private(self.redis_acl_file, redis_acl_text(self._passwords("redis", REDIS_USERS), prefix))
        write_private(self.chdb_users_file, chdb_users_text(self._passwords("clickhouse", CLICKHOUSE_USERS)))


def ensure_credentials(d: Path, routes: Iterable[TopicRoute], redis_prefix: str = "sh") -> Credentials:
    """Make what is missing under ``d`` (passwords, CA, certificates, server files); keep the rest."""
    creds = Credentials(d)
    creds.secrets.mkdir(parents=True, exist_ok=True)
    os.chmod(creds.secrets, 0o700)
    for service, names in (("mqtt", (broker.TOOLS_ACCOUNT,)), ("redis", REDIS_USERS), ("clickhouse", CLICKHOUSE_USERS)):
        for name in names:
            path = creds.password_file(service, name)
            if not path.exists():
                write_private(path, broker.new_password() + "\n")
    if not creds.alerts_token_file.exists():
        write_private(creds.alerts_token_file, broker.new_password() + "\n")
    if not creds.ingest_user_file.exists():
        write_private(creds.password_file("mqtt", broker.INGEST_ACCOUNT), broker.new_password() + "\n")
        creds.rotate_ingest_switch(broker.INGEST_ACCOUNT)
    pki.ensure_pki(creds.tls)
    creds._write_server_files(routes, redis_prefix)
    return creds
