"""The broker's accounts: mosquitto's password file, its ACL file, and device credentials.

Accounts (every client authenticates; anonymous access is off):

- ``sensorhub-ingest`` (or ``sensorhub-ingest-alt``, after a rotation): the ingest and its
  Sparkplug host. Reads every topic; writes only the Sparkplug host's STATE topics (its birth and will).
- ``sensorhub-tools``: the simulator and test tools. Reads and writes every topic.
- one account per device, its user name the device id: it may publish only to the topics whose
  device level is its own name (one ACL pattern per route in ``mqtt.routes``, the device level
  replaced by ``%u``, plus the Sparkplug edge-node topics), and read its Sparkplug commands.

The password file holds mosquitto's own PBKDF2-SHA512 hashes (``$7$``, as ``mosquitto_passwd``
writes them), never a password. Both files are rewritten whole (write, then rename) and the broker
is told with SIGHUP: it reloads them and disconnects clients whose account is gone.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from sensorhub.config import TopicRoute
from sensorhub.errors import ConfigError
from sensorhub.security import write_private

__all__ = [
    "INGEST_ACCOUNT",
    "INGEST_ALT_ACCOUNT",
    "TOOLS_ACCOUNT",
    "acl_text",
    "add_device",
    "hash_password",
    "list_devices",
    "new_password",
    "read_password_file",
    "remove_device",
    "verify_password",
    "write_password_file",
]

INGEST_ACCOUNT = "sensorhub-ingest"
# The ingest's second account: a password rotation moves the ingest to the other of the two, so the
# broker never re-checks a connected persistent session against a changed password. (mosquitto drops
# the subscriptions of a session whose password no longer matches when it reloads its password file,
# and the messages published until the client subscribes again are lost.)
INGEST_ALT_ACCOUNT = "sensorhub-ingest-alt"
TOOLS_ACCOUNT = "sensorhub-tools"
SERVICE_ACCOUNTS = (INGEST_ACCOUNT, INGEST_ALT_ACCOUNT, TOOLS_ACCOUNT)
_ITERATIONS = 101  # mosquitto_passwd's default for $7$
# A device id as the decoders accept it (spec/payloads.md): the user name of its account.
DEVICE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def new_password() -> str:
    """A random password: 32 bytes, URL-safe base64 (no character that needs quoting in a URL)."""
    return secrets.token_urlsafe(32)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """mosquitto's ``$7$`` hash of ``password`` (PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt)."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return f"$7${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return secrets.compare_digest(base64.b64encode(got).decode(), digest)


def check_device_name(name: str) -> str:
    if not DEVICE_NAME.match(name) or name in SERVICE_ACCOUNTS:
        raise ConfigError("device name", "1 to 64 characters of A-Z a-z 0-9 . _ -, not a service account", name)
    return name


def read_password_file(path: Path) -> dict[str, str]:
    """``{user: hash}`` from a mosquitto password file (missing file: no accounts)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        user, sep, hashed = line.partition(":")
        if sep and user and not user.startswith("#"):
            out[user] = hashed
    return out


def write_password_file(path: Path, accounts: Mapping[str, str]) -> None:
    """Write ``{user: hash}`` atomically, mode 0600."""
    write_private(path, "".join(f"{user}:{hashed}\n" for user, hashed in sorted(accounts.items())))


def add_device(path: Path, name: str) -> str:
    """A new password for device ``name`` in the password file ``path`` (replacing an earlier one);
    returns it: only its hash is kept."""
    check_device_name(name)
    password = new_password()
    accounts = read_password_file(path)
    accounts[name] = hash_password(password)
    write_password_file(path, accounts)
    return password


def remove_device(path: Path, name: str) -> bool:
    """Delete device ``name`` from the password file ``path``; False if it had no account."""
    accounts = read_password_file(path)
    if name in SERVICE_ACCOUNTS or accounts.pop(name, None) is None:
        return False
    write_password_file(path, accounts)
    return True


def list_devices(path: Path) -> list[str]:
    return sorted(u for u in read_password_file(path) if u not in SERVICE_ACCOUNTS)


def _device_pattern(route: TopicRoute) -> str | None:
    """The route's filter with its device level as ``%u``: what a device may publish to."""
    if route.device_level < 0:
        return None
    levels = route.filter.split("/")
    if route.device_level >= len(levels) or levels[route.device_level] not in ("+", "#"):
        return None
    if levels[route.device_level] == "#":
        levels = [*levels[: route.device_level], "%u", "#"]
    else:
        levels[route.device_level] = "%u"
    return "/".join(levels)


def acl_text(routes: Iterable[TopicRoute], sparkplug_group_filter: str = "spBv1.0/#") -> str:
    """The ACL file: service accounts by name, devices by pattern."""
    lines = ["# sensorhub broker ACL: written by sensorhub, rewritten on change"]
    for ingest in (INGEST_ACCOUNT, INGEST_ALT_ACCOUNT):
        lines += [f"user {ingest}", "topic read #", "topic write spBv1.0/STATE/#", "topic write STATE/#", ""]
    lines += [
        f"user {TOOLS_ACCOUNT}",
        "topic readwrite #",
        "",
        "# every other account is a device; its user name is its device id",
    ]
    for route in routes:
        pattern = _device_pattern(route)
        if pattern:
            lines.append(f"pattern write {pattern}")
    if sparkplug_group_filter.startswith("spBv1.0"):
        # spBv1.0/<group>/<N|D><BIRTH|DATA|DEATH>/<edge node>[/<device>]: the edge node is the account
        lines += [
            "pattern write spBv1.0/+/+/%u",
            "pattern write spBv1.0/+/+/%u/#",
            "pattern read spBv1.0/+/NCMD/%u",
            "pattern read spBv1.0/+/DCMD/%u/#",
            "pattern read spBv1.0/STATE/#",
            "pattern read STATE/#",
        ]
    return "\n".join(lines) + "\n"
