"""Filling a (small, test-made) filesystem, for the full-disk tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["fill"]


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem refuses more (ENOSPC)."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
