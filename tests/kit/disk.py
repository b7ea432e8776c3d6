"""Filling a (small, test-made) filesystem, for the full-disk tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["fill"]


def fill(path: Path, to_the_last_byte: bool = False) -> None:
    """Write zeros to ``path`` until the filesystem refuses more (ENOSPC).

    MiB by MiB, so up to a MiB may stay free; with ``to_the_last_byte`` then 4 KiB and single
    bytes too, unbuffered, until not one byte is left."""
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
