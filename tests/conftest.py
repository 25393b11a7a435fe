"""Shared fixtures: a real local backend process per test that needs one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from materializer.devbackend.control import DevBackend


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[DevBackend]:
    """A running ``materializer dev-backend`` with its own data folder and fast jobs."""
    with DevBackend.start(tmp_path / "backend", extra_args=["--job-delay", "0.01"]) as running:
        yield running
