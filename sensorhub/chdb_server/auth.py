"""Who may use the embedded server, and as what: users, their roles, the hashes of their passwords.

One of three, chosen on the command line (:mod:`sensorhub.chdb_server.cli`):

- no authentication: every request is the user ``default``, role ``admin``;
- one user (``--user``, ``--password-file``): the first line of the file is
  its password; role ``admin``;
- a users file (``--users-file``)::

      {"users": {"writer": {"password_sha256_hex": "<64 hex digits>", "role": "writer"}, ...}}

  ``password_sha256_hex`` is the SHA-256 of the password, as in ClickHouse's
  own ``users.xml``; ``role`` is ``admin``, ``writer`` or ``reader``
  (:func:`sensorhub.chdb_server.sql.statement_role` says what each may run).

Passwords are compared as SHA-256 digests with :func:`hmac.compare_digest`,
also for a user that does not exist, so the answer takes as long either way.
The file is read again when it changes (a ``stat`` per request: device,
inode, size, mtime, ctime) and on SIGHUP, so a rotated password needs no
restart. A file that is unreadable or malformed at start is a
:class:`~sensorhub.errors.ConfigError` naming it and the expected form; one
that turns bad later leaves the users read before in force, with a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sensorhub.chdb_server.errors import ClickHouseError
from sensorhub.errors import ConfigError

__all__ = ["ANONYMOUS", "ROLES", "USERS_FILE_FORM", "Accounts", "User", "parse_users", "read_password"]

log = logging.getLogger(__name__)

ROLES = ("admin", "writer", "reader")
USERS_FILE_FORM = (
    'a JSON file {"users": {"NAME": {"password_sha256_hex": "<SHA-256 of the password, 64 hex digits>", '
    '"role": "admin" | "writer" | "reader"}}}'
)
# Bounds on what is read: both files are small.
MAX_USERS_FILE_BYTES = 1 << 20
MAX_PASSWORD_FILE_BYTES = 64 << 10
_PASSWORD_FILE_FORM = "a file whose first line is the password"

_HEX64_RE = re.compile(r"[0-9A-Fa-f]{64}")
_DUMMY_DIGEST = hashlib.sha256(b"no such user").digest()


@dataclass(frozen=True)
class User:
    """An authenticated user: its ``name`` and ``role`` (one of :data:`ROLES`)."""

    name: str
    role: str
    password_sha256: bytes = field(default=b"", repr=False, compare=False)


ANONYMOUS = User("default", "admin")


def parse_users(text: str) -> dict[str, User]:
    """The users of a users file's text; raises ValueError saying what is wrong (never a hash)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})")
    if not isinstance(doc, dict) or set(doc) != {"users"} or not isinstance(doc["users"], dict):
        raise ValueError('the top level must be {"users": {...}} and nothing else')
    users: dict[str, User] = {}
    for name, entry in doc["users"].items():
        if not name or any(ord(c) < 32 for c in name):
            raise ValueError(f"user name {name!r}: empty or with control characters")
        if not isinstance(entry, dict):
            raise ValueError(f"user {name}: must be an object with password_sha256_hex and role")
        if "password" in entry:
            raise ValueError(f"user {name}: a plain password is not accepted; give its password_sha256_hex")
        unknown = sorted(set(entry) - {"password_sha256_hex", "role"})
        if unknown:
            raise ValueError(f"user {name}: unknown keys {', '.join(unknown)}")
        digest = entry.get("password_sha256_hex")
        if not isinstance(digest, str) or not _HEX64_RE.fullmatch(digest):
            raise ValueError(f"user {name}: password_sha256_hex must be 64 hex digits")
        role = entry.get("role")
        if role not in ROLES:
            raise ValueError(f"user {name}: role must be one of {', '.join(ROLES)}")
        users[name] = User(name, role, bytes.fromhex(digest))
    if not users:
        raise ValueError("no users: nobody could connect")
    return users


def _read_bounded(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def read_password(path: Path) -> str:
    """The first line of ``path`` (without its line break); raises OSError or ValueError."""
    text = _read_bounded(path, MAX_PASSWORD_FILE_BYTES).decode("utf-8")
    password = text.split("\n", 1)[0].removesuffix("\r")
    if not password:
        raise ValueError("its first line is empty")
    return password


def _problem(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(exc)


def _signature(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Accounts:
    """The users the server accepts, kept in step with the file they come from.

    :meth:`authenticate` is called by every request thread; :meth:`reload_soon`
    may be called from a signal handler (it only sets a flag).
    """

    def __init__(self, users: dict[str, User], path: Path | None = None,
                 load: Callable[[Path], dict[str, User]] | None = None, what: str = "", form: str = "") -> None:
        self._users = users
        self.path = path
        self._load = load
        self.what = what or "no authentication"
        self._form = form
        self._lock = threading.Lock()
        self._hup = False
        self._seen = _signature(path) if path is not None else None

    @classmethod
    def anonymous(cls) -> Accounts:
        """No authentication: every request is :data:`ANONYMOUS`."""
        return cls({})

    @classmethod
    def from_users_file(cls, path: Path) -> Accounts:
        """The users of a users file; raises :class:`ConfigError` when it is unreadable or malformed."""
        def load(p: Path) -> dict[str, User]:
            return parse_users(_read_bounded(p, MAX_USERS_FILE_BYTES).decode("utf-8"))

        try:
            users = load(path)
        except (OSError, ValueError) as exc:
            raise ConfigError("--users-file", USERS_FILE_FORM, f"{path}: {_problem(exc)}")
        return cls(users, path, load, f"users file {path}", USERS_FILE_FORM)

    @classmethod
    def from_password_file(cls, user: str, path: Path) -> Accounts:
        """One admin ``user`` whose password is the first line of ``path``; raises :class:`ConfigError`."""
        def load(p: Path) -> dict[str, User]:
            return {user: User(user, "admin", hashlib.sha256(read_password(p).encode()).digest())}

        try:
            users = load(path)
        except (OSError, ValueError) as exc:
            raise ConfigError("--password-file", _PASSWORD_FILE_FORM, f"{path}: {_problem(exc)}")
        _warn_if_readable_by_others(path)
        return cls(users, path, load, f"user {user}, password file {path}", _PASSWORD_FILE_FORM)

    @property
    def required(self) -> bool:
        """Whether requests must authenticate."""
        return self.path is not None

    def __len__(self) -> int:
        return len(self._users)

    def reload_soon(self) -> None:
        """Read the file again before the next request (SIGHUP)."""
        self._hup = True

    def refresh(self) -> None:
        """Read the file again if it changed or :meth:`reload_soon` asked for it."""
        if self.path is None or self._load is None:
            return
        sig = _signature(self.path)
        if sig == self._seen and not self._hup:
            return
        with self._lock:
            if _signature(self.path) == self._seen and not self._hup:
                return  # another thread reloaded it meanwhile
            self._hup = False
            try:
                users = self._load(self.path)
            except (OSError, ValueError) as exc:
                log.warning("%s: %s; the %d users read before stay in force (expected %s)",
                            self.path, _problem(exc), len(self._users), self._form)
            else:
                self._users = users
                log.info("%s read again: %d users", self.path, len(users))
            # a file still being written is read again once it has changed
            after = _signature(self.path)
            self._seen = after if after == sig else None

    def authenticate(self, name: str | None, password: str | None) -> User:
        """The user ``name`` if ``password`` is its password; raises AUTHENTICATION_FAILED otherwise."""
        if not self.required:
            return ANONYMOUS
        self.refresh()
        name = name or "default"
        user = self._users.get(name)
        digest = hashlib.sha256((password or "").encode()).digest()
        ok = hmac.compare_digest(digest, user.password_sha256 if user is not None else _DUMMY_DIGEST)
        if user is None or not ok:
            raise ClickHouseError.of(
                "AUTHENTICATION_FAILED",
                f"{name}: Authentication failed: password is incorrect, or there is no user with such name",
            )
        return user


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("%s holds a password and may be read by others (mode %o); chmod 600 it", path, mode & 0o777)
