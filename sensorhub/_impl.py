"""Chooses the Cython extensions or their pure-Python twins, once, at import.

``SENSORHUB_PURE_PYTHON=1`` forces the twins; otherwise the Cython modules are
used when they are built, and a missing build falls back to the twins with
``IMPLEMENTATION == "python"`` so that the choice is always visible.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

FORCE_PURE = os.environ.get("SENSORHUB_PURE_PYTHON", "") not in ("", "0")


def _cython_available() -> bool:
    if FORCE_PURE:
        return False
    try:
        importlib.import_module("sensorhub._ext.batch")
    except ImportError:
        return False
    return True


IMPLEMENTATION = "cython" if _cython_available() else "python"


def load(ext_name: str, twin: str) -> ModuleType:
    """Return ``sensorhub._ext.<ext_name>`` or the twin module ``twin``."""
    if IMPLEMENTATION == "cython":
        return importlib.import_module(f"sensorhub._ext.{ext_name}")
    return importlib.import_module(twin)
