"""Where the session token comes from: a fixed value, an environment variable, a file, a command,
or a file descriptor the launching app writes fresh tokens to.

Every source is a :class:`TokenProvider`: ``await get()`` gives the current
token (None when there is none; ``last_error`` then says why, never quoting
the token), ``await get(force_refresh=True)`` asks for a fresh one (the
command runs again), and ``await wait_changed(current)`` returns once the
source holds a token other than ``current``, so a client that was refused can
wait for sign-in to change instead of retrying on a timer.

Token text is stripped of surrounding whitespace. No provider logs a token,
and ``repr()`` never shows one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from materializer.config_values import DEFAULTS, Values, optional_path, token_argv
from materializer.folder_watch import watch_folder
from materializer.redaction import register_secret

__all__ = [
    "CommandTokenProvider",
    "EnvTokenProvider",
    "FdTokenProvider",
    "FileTokenProvider",
    "StaticTokenProvider",
    "TokenProvider",
    "TokenSourceError",
    "provider_from_values",
]

log = logging.getLogger("materializer.tokens")

DEFAULT_TOKEN_ENV: str = DEFAULTS["auth.token_env"]
_JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


class TokenSourceError(ValueError):
    """A token source that is configured wrongly (not: a source that currently holds no token)."""


@runtime_checkable
class TokenProvider(Protocol):
    """A source of session tokens."""

    last_error: str | None
    #: True when ``wait_changed`` has to re-ask the source on a timer (a command) rather than
    #: being woken by the change itself; a connected client then relies on ``exp`` instead.
    polls_for_changes: bool

    async def get(self, force_refresh: bool = False) -> str | None:
        """The current token, or None when the source holds none (see ``last_error``)."""
        ...

    async def wait_changed(self, current: str | None) -> None:
        """Return once the source holds a token other than ``current`` (at once if it already does)."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds (watchers, processes)."""
        ...


def _clean(text: str) -> str | None:
    """The token in ``text``, registered for redaction from every log line."""
    token = text.strip()
    if token:
        register_secret(token)
    return token or None


async def _wait_forever() -> None:
    await asyncio.get_running_loop().create_future()


class StaticTokenProvider:
    """A token given once (``--token``); it never changes."""

    polls_for_changes = False

    def __init__(self, token: str) -> None:
        self._token = _clean(token)
        self.last_error: str | None = None if self._token else "the given token is empty"

    def __repr__(self) -> str:
        return "StaticTokenProvider(<redacted>)"

    async def get(self, force_refresh: bool = False) -> str | None:
        return self._token

    async def wait_changed(self, current: str | None) -> None:
        if self._token != current:
            return
        await _wait_forever()

    async def aclose(self) -> None:
        return None


class EnvTokenProvider:
    """A token in an environment variable, read afresh on every ``get``.

    A running process's environment does not change from outside, so
    ``wait_changed`` only returns when it already differs.
    """

    polls_for_changes = False

    def __init__(self, name: str = DEFAULT_TOKEN_ENV) -> None:
        if not name:
            raise TokenSourceError("the token environment variable needs a name")
        self.name = name
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"EnvTokenProvider(name={self.name!r})"

    def _read(self) -> str | None:
        token = _clean(os.environ.get(self.name, ""))
        self.last_error = None if token else f"environment variable {self.name} is unset or empty"
        return token

    async def get(self, force_refresh: bool = False) -> str | None:
        return self._read()

    async def wait_changed(self, current: str | None) -> None:
        if self._read() != current:
            return
        await _wait_forever()

    async def aclose(self) -> None:
        return None


class FileTokenProvider:
    """A token in a file, re-read on every ``get`` and watched for changes.

    The file's folder is watched (not the file), so a token replaced by
    rename, by an editor or by a symlink swap is seen too. The watcher starts
    with the first ``wait_changed`` and runs until ``aclose``.
    """

    polls_for_changes = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        if not self.path.parent.is_dir():
            raise TokenSourceError(f"token file folder {self.path.parent} does not exist")
        self.last_error: str | None = None
        self._changed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._watch_started = False
        self._stop = asyncio.Event()

    def __repr__(self) -> str:
        return f"FileTokenProvider(path={str(self.path)!r})"

    def _read(self) -> str | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.last_error = f"token file {self.path} does not exist"
            return None
        except (OSError, UnicodeDecodeError) as exc:
            self.last_error = f"token file {self.path} cannot be read: {type(exc).__name__}"
            return None
        token = _clean(text)
        self.last_error = None if token else f"token file {self.path} is empty"
        return token

    async def get(self, force_refresh: bool = False) -> str | None:
        return self._read()

    @property
    def watching(self) -> bool:
        """Whether the folder watch is in place (every change from now on wakes ``wait_changed``)."""
        return self._watch_started and self._watcher is not None and not self._watcher.done()

    async def wait_changed(self, current: str | None) -> None:
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name=f"watch {self.path.name}")
            # One turn of the loop lets awatch set up its inotify watch (it does so before its
            # first suspension), so the read below cannot miss a change made after it.
            await asyncio.sleep(0)
            self._watch_started = True
        while True:
            changed = self._changed
            if self._read() != current:
                return
            await changed.wait()

    async def _watch(self) -> None:
        try:
            async for _changes in watch_folder(self.path.parent, stop_event=self._stop):
                changed, self._changed = self._changed, asyncio.Event()
                changed.set()
        except OSError as exc:
            log.error("stopped watching token file folder %s: %s", self.path.parent, exc)

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._stop.set()
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
            self._watch_started = False
            self._stop = asyncio.Event()


class CommandTokenProvider:
    """A token printed on stdout by a command (e.g. a CLI that holds the session).

    The command runs on the first ``get``, on every ``get(force_refresh=True)``
    (after a refusal, or before the token expires), and every
    ``poll_interval`` seconds while someone waits for the token to change:
    a command's answer cannot be watched, only asked for.
    """

    polls_for_changes = True

    def __init__(
        self, command: str | Sequence[str], *, timeout: float = 30.0, poll_interval: float = 30.0
    ) -> None:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise TokenSourceError("the token command is empty")
        self.argv = argv
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.last_error: str | None = None
        self._token: str | None = None
        self._fetched = False
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"CommandTokenProvider(argv={self.argv!r})"

    async def get(self, force_refresh: bool = False) -> str | None:
        async with self._lock:
            if force_refresh or not self._fetched:
                self._token = await self._run()
                self._fetched = True
            return self._token

    async def wait_changed(self, current: str | None) -> None:
        if await self.get() != current:
            return
        while True:
            await asyncio.sleep(self.poll_interval)
            if await self.get(force_refresh=True) != current:
                return

    async def _run(self) -> str | None:
        name = self.argv[0]
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            self.last_error = f"token command {name!r} could not start: {exc.strerror or exc}"
            return None
        try:
            async with asyncio.timeout(self.timeout):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            self.last_error = f"token command {name!r} did not finish within {self.timeout:g} s"
            return None
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            # stderr is the command's own diagnostic; stdout might hold a token, so it is never shown.
            last_line = (stderr.decode("utf-8", "replace").strip().splitlines() or [""])[-1]
            detail = _JWT_LIKE.sub("<redacted>", last_line)[:200]
            self.last_error = f"token command {name!r} exited with status {process.returncode}: {detail}"
            return None
        try:
            token = _clean(stdout.decode("utf-8"))
        except UnicodeDecodeError:
            self.last_error = f"token command {name!r} printed something that is not UTF-8"
            return None
        self.last_error = None if token else f"token command {name!r} printed nothing"
        return token

    async def aclose(self) -> None:
        return None


class FdTokenProvider:
    """Tokens written, one per line, to an inherited file descriptor by the app that launched us.

    Real Stella tokens live five minutes and only the desktop app can mint new
    ones (its session cookie is encrypted at rest), so the app hands them over:
    ``materializer run --token-fd 3`` with the read end of a pipe as fd 3, and
    a new line each time it refreshes. The newest complete line wins. End of
    file (the app closed its end) keeps the last token; the daemon then says
    ``token_needed`` once that token expires. The first ``get`` waits up to
    ``first_token_timeout`` seconds for a first line, so a one-shot command
    started together with its token does not lose the race.
    """

    polls_for_changes = False
    #: Longest line taken as a token; a longer one is dropped (a JWT is a few KiB at most).
    MAX_LINE_BYTES = 64 * 1024

    def __init__(self, fd: int, *, first_token_timeout: float = 10.0) -> None:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise TokenSourceError(f"token file descriptor {fd} is not open ({exc.strerror})") from None
        self.fd = fd
        self.first_token_timeout = first_token_timeout
        self.last_error: str | None = f"no token has arrived on file descriptor {fd} yet"
        self._token: str | None = None
        self._buffer = b""
        self._eof = False
        self._changed = asyncio.Event()
        self._reading = False

    def __repr__(self) -> str:
        return f"FdTokenProvider(fd={self.fd})"

    def _start(self) -> None:
        if self._reading or self._eof:
            return
        os.set_blocking(self.fd, False)
        asyncio.get_running_loop().add_reader(self.fd, self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("stopped reading tokens from file descriptor %d: %s", self.fd, exc.strerror)
            chunk = b""
        if not chunk:
            self._eof = True
            self._stop_reading()
            if self._token is None:
                self.last_error = f"file descriptor {self.fd} closed before any token arrived"
            self._wake()
            return
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        if len(self._buffer) > self.MAX_LINE_BYTES:
            log.warning("dropping an overlong line on token file descriptor %d", self.fd)
            self._buffer = b""
        for line in reversed(lines):
            try:
                token = _clean(line.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            if token is not None and len(line) <= self.MAX_LINE_BYTES:
                if token != self._token:
                    self._token = token
                    self.last_error = None
                    self._wake()
                break

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._reading = False

    async def get(self, force_refresh: bool = False) -> str | None:
        self._start()
        if self._token is None and not self._eof:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.first_token_timeout):
                    while self._token is None and not self._eof:
                        await self._changed.wait()
        return self._token

    async def wait_changed(self, current: str | None) -> None:
        self._start()
        while self._token == current:
            if self._eof:
                await _wait_forever()
            await self._changed.wait()

    async def aclose(self) -> None:
        self._stop_reading()


def provider_from_values(values: Values) -> TokenProvider:
    """The token source a validated configuration chooses (the ``auth`` section): a file descriptor, else a
    command, else a file, else an environment variable."""
    if values["auth.token_fd"] is not None:
        return FdTokenProvider(values["auth.token_fd"])
    command = token_argv(values["auth.token_command"])
    if command:
        return CommandTokenProvider(command)
    token_file = optional_path(values["auth.token_file"])
    if token_file is not None:
        return FileTokenProvider(token_file)
    return EnvTokenProvider(values["auth.token_env"])
