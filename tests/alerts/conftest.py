"""Fixtures of the alert tests: a stack with alert rules shared by a module (each test has devices of its own)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from alertkit import RULES, AlertStack, stack_down, start


@pytest.fixture(scope="module")
def alert_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertStack]:
    d = tmp_path_factory.mktemp("alert-stack")
    info = start(d, RULES)
    try:
        s = AlertStack(info)
        yield s
        s.close()
    finally:
        stack_down(info)


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    def _wait(fn: Callable[[], Any], timeout: float = 30.0, what: str = "the condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = fn()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not met within {timeout} s")
            time.sleep(0.05)

    return _wait
