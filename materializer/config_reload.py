"""The daemon's configuration: validated in a helper process, at start and at each live reload.

The validation (:mod:`materializer.config`) needs pydantic, which would stay in the
daemon's memory for good once imported (about 10 MB of its idle resident set). So the
daemon asks a helper process instead (:func:`materializer.config.answer_request`, run
by the same interpreter from the same package): one JSON request on its stdin (the
config file, the command-line flags; the helper inherits the environment and the
working directory, the other two layers), one JSON answer on its stdout, the plain
:data:`~materializer.config_values.Values` or the problems. The helper takes about a
bare interpreter's start plus pydantic's import, once at start and once per reload.
It runs in a session of its own: Ctrl-C in the daemon's terminal is the daemon's to
handle, not a traceback of the helper's.

Live reload (file change or SIGHUP) goes through :class:`ConfigReloader`: keys in
:data:`~materializer.config_values.LIVE_KEYS` take effect at once, every other key
keeps its running value and is logged as needing a restart. A bad edit is logged and
the running values stay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import materializer
from materializer.config_sources import config_path
from materializer.config_values import ConfigError, ConfigProblem, Values, diff_values, with_live_values
from materializer.folder_watch import watch_folder

__all__ = ["ConfigReloader", "FileState", "config_file_state", "resolve", "resolve_async"]

log = logging.getLogger("materializer.config")

#: The helper's command: this interpreter, running the very package this process imported (from
#: where it imported it), and nothing from the working directory (``-P``: no ``''`` on the path). Not
#: ``-I``: the environment is one of the layers it reads, and a user install must stay importable.
_HELPER = (sys.executable, "-P", "-c",
           f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(materializer.__file__))!r}); "
           "from materializer.config import answer_request; answer_request()")
#: A helper that has not answered by then is stuck (it reads a file and the environment, nothing else).
HELPER_TIMEOUT_SECONDS = 60.0


#: What tells one version of the config file from another: (device, inode, size, mtime_ns);
#: all zero where there is no file.
FileState = tuple[int, int, int, int]


def config_file_state(config_file: Path | None) -> FileState:
    """The state of the config file (``--config``, else the default one) as a load would find it now."""
    try:
        info = os.stat(config_path(config_file))
    except OSError:
        return (0, 0, 0, 0)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _request(config_file: Path | None, overrides: Mapping[str, Any]) -> bytes:
    flags = {key: None if value is None else str(value) if isinstance(value, Path) else value
             for key, value in overrides.items()}
    return json.dumps({"config_file": None if config_file is None else str(config_file),
                       "overrides": flags}).encode()


def _values(returncode: int | None, stdout: bytes, stderr: bytes) -> Values:
    """The helper's answer as values; :class:`ConfigError` for its problems or for a helper that failed."""
    try:
        answer = json.loads(stdout) if returncode == 0 else None
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("values"), dict):
        values: Values = answer["values"]
        return values
    if isinstance(answer, dict) and isinstance(answer.get("problems"), list):
        raise ConfigError([ConfigProblem(str(problem["key"]), str(problem["reason"]))
                           for problem in answer["problems"]])
    last_line = (stderr.decode(errors="replace").strip().splitlines() or ["no answer"])[-1][:300]
    raise ConfigError([ConfigProblem("", f"the configuration could not be read (its helper process, exit code "
                                         f"{returncode}: {last_line})")])


def resolve(config_file: Path | None, overrides: Mapping[str, Any]) -> Values:
    """The validated configuration (flags ``overrides`` on top), from the helper process; :class:`ConfigError`."""
    try:
        done = subprocess.run(_HELPER, input=_request(config_file, overrides), capture_output=True,
                              timeout=HELPER_TIMEOUT_SECONDS, check=False, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError([ConfigProblem("", f"the configuration could not be read ({exc})")]) from None
    return _values(done.returncode, done.stdout, done.stderr)


async def resolve_async(config_file: Path | None, overrides: Mapping[str, Any]) -> Values:
    """:func:`resolve` without blocking the event loop."""
    try:
        helper = await asyncio.create_subprocess_exec(
            *_HELPER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"the configuration could not be read ({exc})")]) from None
    try:
        stdout, stderr = await asyncio.wait_for(helper.communicate(_request(config_file, overrides)),
                                                HELPER_TIMEOUT_SECONDS)
    except TimeoutError:
        raise ConfigError([ConfigProblem("", "the configuration could not be read (its helper process did not "
                                             f"answer in {HELPER_TIMEOUT_SECONDS:g} s)")]) from None
    finally:
        if helper.returncode is None:
            helper.kill()
            await helper.wait()
    return _values(helper.returncode, stdout, stderr)


class ConfigReloader:
    """Reloads the configuration on SIGHUP (:meth:`reload`) and on file changes (:meth:`watch`).

    ``values`` is what the daemon runs with: live keys follow the file, restart
    keys keep the values it started with (``restart_needed`` lists those that
    now differ). ``on_change`` is called with the new values when a reload
    changes anything (or recovers from an error), and with the
    :class:`ConfigError` when a reload fails (once per distinct error); a failed
    reload changes nothing. Reloads run one at a time; asked again while one
    runs, one more follows it.
    """

    def __init__(
        self,
        values: Values,
        config_file: Path | None,
        overrides: Mapping[str, Any],
        on_change: Callable[[Values | ConfigError], None],
        loaded_state: FileState | None = None,
    ) -> None:
        self.values = values
        #: The file's state before ``values`` were loaded, if known: :meth:`watch` then reloads at
        #: its start only when the file changed since (else it always does).
        self.loaded_state = loaded_state
        self.config_file = config_file
        self.path = config_path(config_file)
        self.overrides = dict(overrides)
        self.restart_needed: list[str] = []
        self.error: ConfigError | None = None
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def reload(self) -> None:
        """Reload soon (a signal handler's call): :meth:`reload_now` in a task of its own."""
        task = asyncio.get_running_loop().create_task(self.reload_now())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload_now(self) -> None:
        """Load the configuration again and apply what can change live."""
        async with self._lock:
            try:
                loaded = await resolve_async(self.config_file, self.overrides)
            except ConfigError as exc:
                if self.error is None or str(exc) != str(self.error):
                    self.error = exc
                    log.error("configuration not reloaded, keeping the running settings: %s", exc)
                    self._on_change(exc)
                return
            recovered, self.error = self.error is not None, None
            live, restart = diff_values(self.values, loaded)
            if not (live or restart != self.restart_needed or recovered):
                log.debug("configuration reloaded; nothing changed")
                return
            if live:
                log.info("configuration reloaded; applied: %s", ", ".join(live))
            if restart and restart != self.restart_needed:
                log.warning("configuration changed; needs a restart to apply: %s", ", ".join(restart))
            self.restart_needed = restart
            self.values = with_live_values(self.values, loaded)
            self._on_change(self.values)

    async def aclose(self) -> None:
        """Cancel the reloads :meth:`reload` started and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def watch(self) -> None:
        """Reload whenever the config file changes, until cancelled.

        The folder is watched, so a file replaced by rename (as editors save)
        is seen. Right after the watch is in place, a reload catches an edit
        made between start-up and then (when the file's state is not the one
        ``values`` were loaded from). Without the folder there is nothing to
        watch (SIGHUP still reloads).
        """
        folder = self.path.parent
        if not folder.is_dir():
            log.info("not watching %s: folder %s does not exist (SIGHUP reloads)", self.path.name, folder)
            return
        name = self.path.name
        # awatch sets up its inotify watch in its first step, before it first waits: a
        # callback queued now runs after that, so no change can fall in between.
        catch_up = asyncio.get_running_loop().call_soon(self._catch_up)
        try:
            async for _changes in watch_folder(folder, watch_filter=lambda _, path: os.path.basename(path) == name):
                await self.reload_now()
        finally:
            catch_up.cancel()

    def _catch_up(self) -> None:
        if self.loaded_state is None or config_file_state(self.config_file) != self.loaded_state:
            self.reload()
