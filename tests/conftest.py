"""Shared fixtures: the local backend as a real process, and a hermetic environment for every test.

``backend`` and ``paging_backend`` are one backend process per test module,
emptied before each test through ``POST /_dev/reset`` (no jobs, files, faults
or sync sockets, a zero connection count and a fresh token: what a test sees
of a just-started backend). A test that needs a process of its own (other
flags, a token lifetime of its own, or a backend it may break) asks for
``own_backend`` or starts one with ``DevBackend.start``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend, DevBackendError
from stella_devbackend.harness import CALLER_SETTINGS, compile_packages

#: What every test backend runs with: jobs that finish in a few hundredths of a second.
FAST_JOBS = ["--job-delay", "0.01"]


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile the project's own packages once per run, before any worker or process starts.

    The suite starts a few hundred Python processes (backends, daemons, commands), each importing
    ``materializer`` or ``stella_devbackend`` (see :func:`stella_devbackend.harness.compile_packages`).

    For the same reason every test process keeps pytest's assertion-rewritten test modules (in
    ``tests/__pycache__``): otherwise each of the four workers rewrites and compiles all of them on every
    run, about 5 s of CPU apiece.
    """
    sys.dont_write_bytecode = False
    if not hasattr(config, "workerinput"):  # not an xdist worker: the controller does it once
        compile_packages()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-fork-server", action="store_true",
                     help="start every daemon, backend and command with a fresh interpreter (see "
                          "stella_devbackend/forkserver.py), not forked from a warm one")


@pytest.fixture(scope="session", autouse=True)
def _fork_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """The processes this test process starts come from a warm interpreter (``--no-fork-server``: they do not)."""
    if request.config.getoption("--no-fork-server") or not forkserver.enable():
        yield
        return
    try:
        yield
    finally:
        forkserver.disable()


def _emptied(running: DevBackend) -> DevBackend:
    """``running`` reset for the next test; relaunched first if a test stopped it or left it unable to reset."""
    if running.process is None or running.process.poll() is not None:
        running.stop()
        running.launch()
    try:
        running.reset()
    except DevBackendError:
        running.restart()
        running.reset()
    return running


@pytest.fixture(scope="module")
def _module_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBackend]:
    with DevBackend.start(tmp_path_factory.mktemp("backend"), extra_args=FAST_JOBS) as running:
        yield running


@pytest.fixture(scope="module")
def _module_paging_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBackend]:
    with DevBackend.start(tmp_path_factory.mktemp("paging"), extra_args=FAST_JOBS, extensions=["page-query"]) as b:
        yield b


@pytest.fixture
def backend(_module_backend: DevBackend) -> DevBackend:
    """The module's ``materializer dev-backend`` with fast jobs, emptied for this test: only the real queries."""
    return _emptied(_module_backend)


@pytest.fixture
def paging_backend(_module_paging_backend: DevBackend) -> DevBackend:
    """The same, plus the gap-free page query the real backend lacks (``--extension page-query``)."""
    return _emptied(_module_paging_backend)


@pytest.fixture
def own_backend(tmp_path: Path) -> Iterator[DevBackend]:
    """A backend process for this test alone (in ``tmp_path / "backend"``), as ``backend`` is configured."""
    with DevBackend.start(tmp_path / "backend", extra_args=FAST_JOBS) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test (nor a process it starts) reads the developer's own settings or Stella folder."""
    for name in list(os.environ):
        if name.startswith("MATERIALIZER_") or name in CALLER_SETTINGS:
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
