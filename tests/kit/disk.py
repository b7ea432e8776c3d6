"""Filling a (small, test-made) filesystem, for the full-disk tests."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fill", "free_bytes"]


def free_bytes(path: Path) -> int:
    """Bytes free for an unprivileged writer on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, to_the_last_byte: bool = False, leave_bytes: int | None = None) -> None:
    """Write zeros to ``path`` until the filesystem refuses more (ENOSPC).

    MiB by MiB, so up to a MiB may stay free; with ``to_the_last_byte`` then 4 KiB and single
    bytes too, unbuffered, until not one byte is left. With ``leave_bytes``, stop once no more
    than that is free (and at least that, to within a page)."""
    if leave_bytes is not None:
        with open(path, "wb") as f:
            while (room := free_bytes(path.parent) - leave_bytes) > 0:
                f.write(b"\0" * min(room, 1 << 20))
                f.flush()
        return
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    if to_the_last_byte:
        with open(path, "ab", buffering=0) as raw:
            for size in (4096, 1):
                try:
                    while raw.write(b"\0" * size):
                        pass
                except OSError:
                    pass
