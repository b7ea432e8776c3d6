"""Both implementations of a codec, for the tests that run them side by side.

Every Cython module has a pure-Python twin with the same behaviour. The twin
always runs. The Cython module is part of every build (``make test`` builds it
first), so when it is missing its cases fail with the reason instead of being
skipped: a skipped comparison would let the two drift apart unnoticed.
``SENSORHUB_PURE_PYTHON=1`` chooses what sensorhub itself loads
(``sensorhub.IMPLEMENTATION``); it does not change what these tests compare.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

#: parameter values for tests that run once per implementation
IMPLEMENTATIONS = ("python", "cython")


def load(impl: str, twin: str, ext: str) -> ModuleType:
    """The twin module ``twin`` for ``"python"``, ``sensorhub._ext.<ext>`` for ``"cython"``.

    A Cython module that is not built fails the calling test, naming the fix.
    """
    if impl == "python":
        return importlib.import_module(twin)
    if impl != "cython":
        raise ValueError(f"unknown implementation {impl!r}")
    name = f"sensorhub._ext.{ext}"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        why = str(exc)
    import sensorhub

    pytest.fail(
        f"{name} is not built ({why}; sensorhub.IMPLEMENTATION is {sensorhub.IMPLEMENTATION!r}): "
        "`make build` compiles the Cython extensions, and `make test` does so first",
        pytrace=False,
    )


def pair(impl: str, twin: str, ext: str) -> tuple[ModuleType, ModuleType]:
    """``(decoder module, batch module)`` of one implementation: the twin ``twin`` with
    ``batch_py``, or ``sensorhub._ext.<ext>`` with ``sensorhub._ext.batch``."""
    return load(impl, twin, ext), load(impl, "sensorhub.decoders.batch_py", "batch")
