"""Credentials and certificates: the private CA of a stack, the broker's password and ACL files,
Redis ACL users, the chdb-server's users, and how every process reads its secrets from files.

Nothing here puts a secret in a command line or a log line: secrets live in files of mode 0600
(or systemd credentials), and their paths are what processes are given.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_private"]


def write_private(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then rename), mode 0600 from the
    start: a secret is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)
