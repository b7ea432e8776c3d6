"""Fixtures of the fault scenarios (helpers in faultkit.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faultkit import Run


@pytest.fixture
def fault_run(stack_factory: Callable[..., Any], tmp_path: Path) -> Callable[..., Run]:
    def make(config_text: str | None = None, redis_maxmemory: str | None = None, **kw: Any) -> Run:
        stack = stack_factory(config_text, redis_maxmemory=redis_maxmemory)
        return Run(stack, tmp_path, **kw)

    return make
