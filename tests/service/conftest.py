"""Fixtures for the service-layer tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from svc_helpers import NotifyListener


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    """A notify socket in the abstract namespace, receiving with sender credentials."""
    lst = NotifyListener()
    yield lst
    lst.close()
