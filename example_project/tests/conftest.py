"""Fixtures for the example's tests: a small catalogue, and no pool between tests."""

from __future__ import annotations

from collections.abc import Iterator

import asynchrormous
import pytest

from catalogue import latency
from catalogue.generate import generate

#: Small enough to make in a fraction of a second, big enough for every list.
BOOKS = 3_000


@pytest.fixture(autouse=True)
def _stop_pool() -> Iterator[None]:
    """Worker connections never outlive a test (the test database is dropped after)."""
    yield
    asynchrormous.shutdown(timeout=30)
    latency.install(0)


@pytest.fixture
def catalogue(db: None) -> dict[str, int]:
    """The sample catalogue, at test size."""
    return generate(BOOKS, seed=7)
