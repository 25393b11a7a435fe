"""Shared fixtures: a real local backend process per test that needs one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stella_devbackend.control import DevBackend


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[DevBackend]:
    """A running ``materializer dev-backend`` with its own data folder and fast jobs: only the real queries."""
    with DevBackend.start(tmp_path / "backend", extra_args=["--job-delay", "0.01"]) as running:
        yield running


@pytest.fixture
def paging_backend(tmp_path: Path) -> Iterator[DevBackend]:
    """The same, plus the gap-free page query the real backend lacks (``--extension page-query``)."""
    with DevBackend.start(tmp_path / "paging", extra_args=["--job-delay", "0.01"], extensions=["page-query"]) as b:
        yield b


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test (nor a process it starts) reads the developer's own settings or Stella folder."""
    for name in list(os.environ):
        if name.startswith("MATERIALIZER_") or name in ("STELLA_DATA_DIR", "STELLA_TOKEN"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
