"""The daemon as a real process, for the tests and the benchmarks alike (one harness, one clean environment).

:class:`DaemonProcess` runs ``python -m materializer run --root R
--convex-url URL --token-file F`` against a backend (a :class:`DevBackend`
or anything with ``url`` and ``token``), logging to a file beside the root.
It always starts the daemon with :func:`clean_env`: none of the caller's
``MATERIALIZER_*`` settings, ``STELLA_TOKEN`` or ``STELLA_DATA_DIR``, and a
configuration home of its own, so that a developer's settings or Stella
folder never reach a test or skew a measurement. What a caller wants the
daemon to see goes in ``env`` (and ``extra_args``).

:class:`MemoryCgroup` runs it under a memory limit: a child cgroup of this
process's own, with ``memory.max`` (cgroup v2) or ``memory.limit_in_bytes``
(v1), which the daemon joins before it runs (``DaemonProcess(cgroup=...)``).

(Not to be confused with ``bench/harness.py``, the benchmarks' floor processes.)
"""

from __future__ import annotations

import compileall
import contextlib
import errno
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from materializer.layout import STATE_DIR_ENV
from stella_devbackend import forkserver

__all__ = ["CALLER_SETTINGS", "CgroupUnavailable", "DaemonProcess", "Endpoint", "MemoryCgroup", "catches",
           "clean_env", "compile_packages"]

def compile_packages() -> None:
    """Byte-compile ``materializer`` and ``stella_devbackend`` where their bytecode is missing or stale.

    An installed package has its bytecode from pip; an editable checkout run with
    ``PYTHONDONTWRITEBYTECODE`` set has none, and every process the tests or benchmarks start
    would compile the sources again (about 0.2 s of CPU apiece, and most of a start-up
    benchmark's time). Written into the packages' ``__pycache__``, which git ignores.
    """
    for package in ("materializer", "stella_devbackend"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            compileall.compile_dir(folder, quiet=1)


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
                 env: dict[str, str] | None = None, cgroup: MemoryCgroup | None = None) -> None:
        self.root = root
        self.backend = backend
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        #: The cgroup the process joins before it runs (its memory is counted there from the start).
        self.cgroup = cgroup
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
            self.process = forkserver.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                            preexec_fn=None if self.cgroup is None else self.cgroup.join_hook())
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


class CgroupUnavailable(Exception):
    """This machine does not let us create a memory-limited cgroup; the message says precisely why."""


class MemoryCgroup:
    """A child cgroup of this process's own with a memory limit (and no swap), removed by :meth:`remove`.

    cgroup v2 where this process's cgroup offers the memory controller to children
    (``memory.max``, ``memory.events``), else the v1 memory hierarchy
    (``memory.limit_in_bytes``, ``memory.oom_control``). :meth:`create` raises
    :class:`CgroupUnavailable` saying what it found when neither can be used.
    """

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    @classmethod
    def create(cls, limit_bytes: int, name: str = "materializer-test") -> MemoryCgroup:
        reasons: list[str] = []
        for version, parent in _own_cgroups():
            if parent is None:
                reasons.append(f"cgroup v{version}: this process is in no such hierarchy")
                continue
            if version == 2 and (missing := _no_memory_for_children(parent)):
                reasons.append(missing)
                continue
            limit = "memory.max" if version == 2 else "memory.limit_in_bytes"
            path = parent / f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
            try:
                path.mkdir()
            except OSError as exc:
                reasons.append(f"cgroup v{version}: cannot create {path}: {exc.strerror}")
                continue
            group = cls(path, version)
            try:
                (path / limit).write_text(str(limit_bytes))
                no_swap = path / ("memory.swap.max" if version == 2 else "memory.memsw.limit_in_bytes")
                if no_swap.exists():
                    no_swap.write_text("0" if version == 2 else str(limit_bytes))
            except OSError as exc:
                group.remove()
                reasons.append(f"cgroup v{version}: cannot set {limit} in {path}: {exc.strerror}")
                continue
            return group
        raise CgroupUnavailable("no memory-limited cgroup can be created here: " + "; ".join(reasons))

    def join_hook(self) -> Callable[[], None]:
        """What a child runs before ``exec`` to join this cgroup (``preexec_fn``)."""
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as handle:
                handle.write(str(os.getpid()))
        return join

    def oom_kills(self) -> int:
        """Processes the kernel killed for want of memory in this cgroup so far."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise RuntimeError(f"{self.path / name} has no oom_kill count (kernel before 4.13?)")

    def peak_bytes(self) -> int | None:
        """The most memory charged to the cgroup at once (None where the kernel does not say)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError, ValueError):
            return int((self.path / name).read_text())
        return None

    def remove(self) -> None:
        """Remove the cgroup (its processes must have exited); a no-op when it is gone."""
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                # The last process is still being reaped: the kernel frees the cgroup a moment later.
                os.sched_yield()


def _own_cgroups() -> list[tuple[int, Path | None]]:
    """This process's cgroup in the v2 hierarchy and in the v1 memory hierarchy, as folders (None: not there)."""
    v2_mount = v1_mount = None
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
            if fstype == "cgroup2" and v2_mount is None:
                v2_mount = Path(fields[4])
            elif fstype == "cgroup" and "memory" in options:
                v1_mount = Path(fields[4])
    v2 = v1 = None
    with open("/proc/self/cgroup") as groups:
        for line in groups:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if number == "0" and controllers == "" and v2_mount is not None:
                v2 = v2_mount / path.lstrip("/")
            elif "memory" in controllers.split(",") and v1_mount is not None:
                v1 = v1_mount / path.lstrip("/")
    return [(2, v2), (1, v1)]


def _no_memory_for_children(parent: Path) -> str | None:
    """Why a v2 child of ``parent`` would have no memory controller, or None when it would have one."""
    try:
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        available = (parent / "cgroup.controllers").read_text().split()
    except OSError as exc:
        return f"cgroup v2: cannot read the controllers of {parent}: {exc.strerror}"
    if "memory" in enabled:
        return None
    return (f"cgroup v2: {parent} does not enable the memory controller for its children (cgroup.subtree_control: "
            f"{' '.join(enabled) or '(none)'}; cgroup.controllers: {' '.join(available) or '(none)'})")
