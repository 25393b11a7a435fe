"""Processes forked from a warm interpreter: the suite's daemons, backends and commands, started in milliseconds.

Every process of the suite that runs ``python -m materializer ...`` or
``python -m stella_devbackend ...`` spends about 0.3-0.45 s of CPU importing
the same modules (pydantic, httpx, websockets, aiohttp, Pillow, ...). The
fork server is a Python process that imports them once and then forks on
request, as :mod:`multiprocessing`'s ``forkserver`` does. What it starts is
still a real process of its own: its own pid, file descriptors, environment
and working folder, ``python -m`` semantics (``runpy``), the interpreter's
normal exit (``atexit``, waiting for non-daemon threads) and the same
signals, SIGKILL included.

It forks twice and the middle process exits at once, so the new process is
orphaned and the kernel gives it to the nearest *child subreaper* among its
ancestors: the process that called :func:`enable`. There it is an ordinary
child, and :class:`Popen` (``subprocess.Popen``, with only the start replaced)
waits for it, reads its exit code and signal, and talks to its pipes as for
any other child.

Only what a fresh interpreter would do the same way is forked: the command is
``[sys.executable, "-m", <materializer or stella_devbackend>, ...]``, with no
``preexec_fn``, user, group, umask or process group, and an environment that
agrees with the server's on every ``PYTHON*`` and locale variable (they shape
an interpreter's start). Anything else, and everything while no server is
enabled (the benchmarks, which measure start-up), is started by
``subprocess.Popen`` as usual.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import importlib
import json
import os
import pkgutil
import runpy
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ForkServer", "Popen", "become_subreaper", "disable", "enable", "enabled", "run"]

#: The packages whose ``python -m`` commands are forked, and whose modules the server imports first.
PACKAGES = ("materializer", "stella_devbackend")

#: Environment variables that shape how an interpreter starts: a command whose values differ from the
#: server's is not forked (its ``sys.flags``, ``sys.path``, encodings and locale would differ).
_STARTUP_PREFIXES = ("PYTHON", "LC_")
_STARTUP_NAMES = ("LANG", "LANGUAGE")

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_HIGH_FD = 1000  # received descriptors are parked above any target before they are put in place
_MAX_MESSAGE = 1 << 20


def _startup_environment(env: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items()
            if key.startswith(_STARTUP_PREFIXES) or key in _STARTUP_NAMES}


class ForkServer:
    """A fork server process and the socket its requests go through (one at a time).

    It forks ``python -m`` commands of the modules in ``packages`` (and imports them all first), for a caller
    that is the subreaper of what it forks (:func:`enable` makes this process one); ``env`` is its own
    environment, and what a command's must agree with on the variables that shape a start.
    """

    def __init__(self, packages: Sequence[str] = PACKAGES, env: Mapping[str, str] | None = None) -> None:
        self.packages = tuple(packages)
        environment = dict(os.environ if env is None else env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._socket = ours
        self._lock = threading.Lock()
        self._startup = _startup_environment(environment)
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno()), *self.packages],
                                        stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), env=environment)
        theirs.close()
        ready = self._socket.recv(_MAX_MESSAGE)
        if not ready:
            self.close()
            raise RuntimeError(f"the fork server did not start (exit code {self.process.returncode})")
        # What the interpreter's start added to its environment (LC_CTYPE, where it coerces a C locale):
        # a process executed with the same start-up variables gets the same, so a forked one must too.
        started_with = json.loads(ready)
        self._added_at_start = {key: value for key, value in started_with.items() if environment.get(key) != value}

    def forks(self, module: str, env: Mapping[str, str]) -> bool:
        """Whether ``python -m module`` with ``env`` is started here (else it is executed as usual)."""
        return module.split(".")[0] in self.packages and _startup_environment(env) == self._startup

    def spawn(self, module: str, args: Sequence[str], env: Mapping[str, str], cwd: str | None,
              fds: Mapping[int, int], new_session: bool) -> int:
        """Start ``python -m module *args`` with ``fds`` (target number -> our descriptor); its pid."""
        request = {"module": module, "args": list(args), "env": {**env, **self._added_at_start}, "cwd": cwd,
                   "targets": list(fds), "new_session": new_session}
        with self._lock:
            socket.send_fds(self._socket, [json.dumps(request).encode()], list(fds.values()))
            reply = json.loads(self._socket.recv(_MAX_MESSAGE) or b'{"error": "the fork server exited"}')
        if "error" in reply:
            raise OSError(f"the fork server could not start {module}: {reply['error']}")
        return int(reply["pid"])

    def close(self) -> None:
        self._socket.close()  # the server reads end-of-file and exits
        self.process.wait(timeout=30)


_server: ForkServer | None = None


def become_subreaper() -> bool:
    """Make this process the parent of its orphaned descendants (Linux's ``PR_SET_CHILD_SUBREAPER``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def enable() -> bool:
    """Start the fork server :class:`Popen` uses by default; False where this process cannot be a subreaper.

    Then nothing changes: every process is started as usual.
    """
    global _server
    if _server is None and become_subreaper():
        _server = ForkServer()
    return _server is not None


def disable() -> None:
    """Stop the fork server (processes it started run on)."""
    global _server
    if _server is not None:
        server, _server = _server, None
        server.close()


def enabled() -> bool:
    return _server is not None


def _forked_module(args: Any, executable: Any, shell: bool) -> tuple[str, list[str]] | None:
    """``(module, arguments)`` when ``args`` is ``[sys.executable, "-m", module, ...]``."""
    if shell or executable is not None or isinstance(args, (str, bytes, os.PathLike)):
        return None
    command = list(args)
    if len(command) < 3 or command[0] != sys.executable or command[1] != "-m" or not all(
            isinstance(part, str) for part in command):
        return None
    return command[2], command[3:]


class Popen(subprocess.Popen[Any]):
    """``subprocess.Popen``, whose ``python -m`` commands of ours come from a fork server.

    That is ``fork_server``, or else the one :func:`enable` started (none: every command is executed as usual).
    """

    def __init__(self, *args: Any, fork_server: ForkServer | None = None, **kwargs: Any) -> None:
        self._fork_server = fork_server or _server
        super().__init__(*args, **kwargs)

    def _execute_child(self, args: Any, executable: Any, preexec_fn: Any, close_fds: bool, pass_fds: Sequence[int],
                       cwd: Any, env: Any, startupinfo: Any, creationflags: int, shell: bool,
                       p2cread: int, p2cwrite: int, c2pread: int, c2pwrite: int, errread: int, errwrite: int,
                       restore_signals: bool, gid: Any, gids: Any, uid: Any, umask: int,
                       start_new_session: bool, process_group: int) -> None:
        server, forked = self._fork_server, _forked_module(args, executable, shell)
        environment = os.environ if env is None else env
        if (server is None or forked is None or preexec_fn is not None or not close_fds or gid is not None
                or gids is not None or uid is not None or umask >= 0 or process_group != -1
                or not server.forks(forked[0], environment)):
            super()._execute_child(  # type: ignore[misc]
                args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo, creationflags, shell,
                p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, restore_signals, gid, gids, uid, umask,
                start_new_session, process_group)
            return
        module, arguments = forked
        fds = {0: p2cread if p2cread != -1 else 0, 1: c2pwrite if c2pwrite != -1 else 1,
               2: errwrite if errwrite != -1 else 2}
        fds.update({int(fd): int(fd) for fd in pass_fds})
        try:
            self.pid = server.spawn(module, arguments, {os.fsdecode(k): os.fsdecode(v) for k, v in environment.items()},
                                    None if cwd is None else os.fsdecode(cwd), fds, start_new_session)
            self._child_created = True
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)  # type: ignore[attr-defined]


def run(*popenargs: Any, input: Any = None, capture_output: bool = False, timeout: float | None = None,
        check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` with :class:`Popen`."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with Popen(*popenargs, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
        returncode = process.poll()
        assert returncode is not None
    if check and returncode:
        raise subprocess.CalledProcessError(returncode, process.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(process.args, returncode, stdout, stderr)


# -- the server's side --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    """What a forked process becomes: the request and the descriptors that came with it."""

    module: str
    args: list[str]
    env: dict[str, str]
    cwd: str | None
    fds: dict[int, int]  # target number -> the descriptor received
    new_session: bool


def _preload(packages: Sequence[str]) -> None:
    """Import every module of ``packages`` (not the ``__main__`` ones, which would run): what the forks share."""
    for package_name in packages:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), package_name + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)


def _serve(control: socket.socket, packages: Sequence[str]) -> _Launch | None:
    """Fork on each request; returns in the forked process (its launch), or None when the client has gone."""
    _preload(packages)
    gc.collect()
    gc.freeze()  # the imported objects stay out of the forks' collections, so their pages stay shared
    control.send(json.dumps(dict(os.environ)).encode())  # ready, and the environment it started with
    while True:
        message, received, _flags, _address = socket.recv_fds(control, _MAX_MESSAGE, 256)
        if not message:
            return None
        request = json.loads(message)
        launch = _Launch(request["module"], request["args"], request["env"], request["cwd"],
                         dict(zip(request["targets"], received, strict=True)), request["new_session"])
        pid_read, pid_write = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.close(pid_read)
            child = os.fork()
            if child == 0:
                os.close(pid_write)
                control.close()
                return launch
            os.write(pid_write, str(child).encode())
            os._exit(0)
        os.close(pid_write)
        with os.fdopen(pid_read, "rb") as pids:
            pid = pids.read()
        # Once the middle process has exited, the kernel has handed the child to the client's subreaper.
        os.waitpid(middle, 0)
        for fd in received:
            os.close(fd)
        control.send(json.dumps({"pid": int(pid)} if pid else {"error": "fork failed"}).encode())


def _become(launch: _Launch) -> None:
    """In the forked process: take the descriptors, folder and environment asked for, then run the module."""
    if launch.new_session:
        os.setsid()
    parked = {target: fcntl.fcntl(fd, fcntl.F_DUPFD, _HIGH_FD) for target, fd in launch.fds.items()}
    for fd in launch.fds.values():
        os.close(fd)
    for target, fd in parked.items():
        os.dup2(fd, target, inheritable=True)
    keep = set(launch.fds)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed
    if launch.cwd is not None:
        os.chdir(launch.cwd)
    os.environ.clear()
    os.environ.update(launch.env)
    sys.path[0] = os.getcwd()  # where `python -m` puts the working folder
    sys.argv = [launch.module, *launch.args]
    runpy.run_module(launch.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    launched = _serve(socket.socket(fileno=int(sys.argv[1])), sys.argv[2:])
    if launched is not None:
        _become(launched)
