"""The daemon as a real process, for the tests and the benchmarks alike (one harness, one clean environment).

:class:`DaemonProcess` runs ``python -m materializer run --root R
--convex-url URL --token-file F`` against a backend (a :class:`DevBackend`
or anything with ``url`` and ``token``), logging to a file beside the root.
It always starts the daemon with :func:`clean_env`: none of the caller's
``MATERIALIZER_*`` settings, ``STELLA_TOKEN`` or ``STELLA_DATA_DIR``, and a
configuration home of its own, so that a developer's settings or Stella
folder never reach a test or skew a measurement. What a caller wants the
daemon to see goes in ``env`` (and ``extra_args``).

(Not to be confused with ``bench/harness.py``, the benchmarks' floor processes.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from materializer.layout import STATE_DIR_ENV

__all__ = ["CALLER_SETTINGS", "DaemonProcess", "Endpoint", "catches", "clean_env"]

#: Variables of the caller's that a harnessed process never inherits (besides ``MATERIALIZER_*``).
CALLER_SETTINGS = ("STELLA_TOKEN", STATE_DIR_ENV)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the materializer settings, token or Stella folder; plus ``extra``."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MATERIALIZER_") and key not in CALLER_SETTINGS}
    return {**env, **extra}


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (its ``SigCgt`` mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(mask, 16) >> (signum - 1) & 1)


class Endpoint(Protocol):
    """What the daemon is pointed at: a backend's URL and a token for it (read-only, so frozen dataclasses fit)."""

    @property
    def url(self) -> str: ...

    @property
    def token(self) -> str: ...


class DaemonProcess:
    """``python -m materializer run`` as a real process, with a clean environment and its own config home.

    The token file (``<root>.token``, mode 0600) is written at construction,
    so a test may replace it before :meth:`start`; the log is ``<root>.log``;
    ``XDG_CONFIG_HOME`` is ``<root>.config`` (not created: no configuration
    file unless a caller puts one there or passes ``--config``).
    """

    def __init__(self, root: Path, backend: Endpoint, extra_args: list[str] | None = None, *,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.backend = backend
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.token_file = root.parent / f"{root.name}.token"
        self.log = root.parent / f"{root.name}.log"
        self.config_home = root.parent / f"{root.name}.config"
        self.process: subprocess.Popen[bytes] | None = None
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as token:
            token.write(backend.token)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def poll(self) -> int | None:
        """The exit code, or None while the process runs."""
        assert self.process is not None
        return self.process.poll()

    def start(self) -> DaemonProcess:
        command = [sys.executable, "-m", "materializer", "run", "--root", str(self.root),
                   "--convex-url", self.backend.url, "--token-file", str(self.token_file), *self.extra_args]
        env = clean_env(XDG_CONFIG_HOME=str(self.config_home), **self.env)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        return self

    def signal(self, signum: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        """Send ``signum`` and wait for the exit; return the exit code."""
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)

    def signal_no_wait(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit code, None if it was never started."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.wait_catching(signal.SIGTERM, timeout)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def wait_catching(self, signum: int, timeout: float = 30.0) -> bool:
        """Wait until the process has its own handler for ``signum`` (``SigCgt`` in /proc), or it exits.

        A signal sent before the interpreter got that far would kill it with the default
        action, which says nothing about how the daemon stops.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            if catches(self.process.pid, signum):
                return True
            time.sleep(0.005)
        return False

    def check_alive(self) -> None:
        """Raise, with the log's tail, if the daemon has exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"the daemon exited with code {self.process.returncode}:\n{tail}")

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop(timeout=15.0)
