"""Fixtures for every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from thinkcap.proxy.logs import reset


@pytest.fixture(autouse=True)
def structlog_defaults_after_each_test() -> Iterator[None]:
    """A command run in-process configures structlog to write to the stdout that pytest
    captures for that test and closes after it; the next test starts from the defaults."""
    yield
    reset()
