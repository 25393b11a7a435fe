"""``materializer run`` as a service: configuration, signals, reloads, systemd notify, parent death.

The daemon itself (:mod:`materializer.daemon`) knows nothing of processes;
this module is what makes it behave like a well-made Linux service:
SIGTERM/SIGINT stop it cleanly, SIGHUP and edits of the config file reload
what can change live, systemd hears READY, STATUS and WATCHDOG, and a daemon
launched by the desktop app exits when the app dies.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from materializer import exits
from materializer.config_reload import ConfigReloader, FileState
from materializer.config_values import ConfigError, Values
from materializer.daemon import Materializer
from materializer.display import DisplayServer, DisplaySocketError
from materializer.early_stop import EarlyStop
from materializer.layout import AlreadyRunning, UntrustedPath
from materializer.ledger import LedgerDamagedError, LedgerOpenError
from materializer.logs import setup_logging
from materializer.options import DaemonOptions
from materializer.sdnotify import Notifier, run_watchdog
from materializer.tokens import TokenProvider, TokenSourceError, provider_from_values

__all__ = ["ledger_trouble", "run_service"]

log = logging.getLogger(__name__)

#: glibc ``mallopt`` parameters (malloc.h) and the values the daemon sets (see _bound_malloc_retention).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_TRIM_THRESHOLD_BYTES, _MMAP_THRESHOLD_BYTES, _ARENAS = 16 * 1024 * 1024, 6 * 1024 * 1024, 2


async def wait_for_exit(pid: int) -> None:
    """Return when process ``pid`` has exited (a pidfd where the kernel has them, else polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            await asyncio.sleep(1.0)
    exited = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, exited.set)
    try:
        await exited.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _bound_malloc_retention() -> None:
    """Give blocks of 6 MiB or more (large image files, their pixels) their own mmap, unmapped when freed.

    By default glibc raises its mmap threshold to the size of every large block freed, so after
    the first large image the next ones come from the heap, which fragments and keeps them: during
    a burst of 8 MB images on a busy machine the daemon grew to about 150 MB and stayed at 80-110 MB
    afterwards, where with these settings it peaks near 110 MB and returns to its idle size. The
    trim threshold keeps up to 16 MiB of freed heap for reuse, so the common smaller images (a
    1024x1024 decode is 4 MiB) do not fault their pages in again every time. And two arenas, not
    glibc's eight per core: each worker thread that decodes would otherwise get an arena of its own,
    each keeping its freed blocks (peak RSS of 50 jobs x 4 images of 7.7 MB: 102-105 MB -> 96-98 MB,
    ``bench/run.py --only memory``; ``MALLOC_ARENA_MAX`` in the environment is left to win). Nothing
    to do where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, _ARENAS)


def run_service(values: Values, config_file: Path | None, overrides: dict[str, Any],
                early_stop: EarlyStop | None = None, loaded_state: FileState | None = None) -> int:
    """Run the daemon until stopped; return the exit code (0 clean stop, 1 already running, 2 bad config or an
    untrusted state folder: a symlink, another user's folder or file, see :mod:`materializer.layout`; 4 a damaged
    ledger).

    ``values`` is the validated configuration (:func:`materializer.config_reload.resolve`), ``config_file``
    and ``overrides`` where it came from, to reload it, ``loaded_state`` the file's state before it was
    read (:func:`materializer.config_reload.config_file_state`).
    """
    _bound_malloc_retention()
    setup_logging(values["log.level"], values["log.format"])
    try:
        options = DaemonOptions.from_values(values)
        provider = provider_from_values(values)
    except (ConfigError, TokenSourceError) as exc:
        print(f"materializer run: {exc}", file=sys.stderr)
        return exits.USAGE
    return asyncio.run(_serve(values, options, provider, config_file, overrides, early_stop, loaded_state))


async def _serve(values: Values, options: DaemonOptions, provider: TokenProvider, config_file: Path | None,
                 overrides: dict[str, Any], early_stop: EarlyStop | None, loaded_state: FileState | None) -> int:
    try:
        daemon = Materializer(options, provider, display_factory=DisplayServer)
    except UntrustedPath as exc:
        print(f"materializer run: {exc}", file=sys.stderr)
        await provider.aclose()
        return exits.USAGE
    except LedgerOpenError as exc:
        await provider.aclose()
        print(f"materializer run: {ledger_trouble(exc)}", file=sys.stderr)
        return exits.LEDGER_DAMAGED
    notifier = Notifier()

    def on_state(payload: dict[str, Any]) -> None:
        notifier.status(_status_text(payload))

    daemon.on_state = on_state

    def reloaded(new: Values | ConfigError) -> None:
        if isinstance(new, ConfigError):
            log.error("configuration not reloaded: %s", new)
            return
        setup_logging(new["log.level"], new["log.format"])
        daemon.apply_live(DaemonOptions.from_values(new))

    reloader = ConfigReloader(values, config_file, overrides, reloaded, loaded_state)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, daemon.stop)
    loop.add_signal_handler(signal.SIGINT, daemon.stop)
    loop.add_signal_handler(signal.SIGHUP, reloader.reload)
    if early_stop is not None and early_stop.requested:
        log.info("asked to stop while starting: stopping")
        daemon.stop()
    helpers: list[asyncio.Task[None]] = []

    def ready() -> None:
        notifier.ready(f"following {options.convex_url}")
        helpers.append(asyncio.create_task(run_watchdog(notifier)))
        helpers.append(asyncio.create_task(reloader.watch()))
        if values["daemon.parent_pid"] is not None:
            helpers.append(asyncio.create_task(_stop_with_parent(values["daemon.parent_pid"], daemon)))
        log.info("materializer running for %s (root %s)", options.convex_url, options.root)

    try:
        await daemon.run(on_ready=ready)
    except AlreadyRunning as exc:
        print(f"materializer run: {exc}", file=sys.stderr)
        return exits.FAILED
    except (UntrustedPath, DisplaySocketError) as exc:  # the lock or the socket: a setup restarting cannot fix
        print(f"materializer run: {exc}", file=sys.stderr)
        return exits.USAGE
    finally:
        notifier.stopping("stopping")
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await reloader.aclose()
        await daemon.aclose()
        await provider.aclose()
        notifier.close()
    log.info("materializer stopped")
    return exits.OK


def ledger_trouble(exc: LedgerOpenError) -> str:
    """The one line a command prints for a ledger it cannot open: what is wrong, and the way out when there is one."""
    text = " ".join(str(exc).split())
    if isinstance(exc, LedgerDamagedError):
        return (f"{text}. It was left as it is: `materializer repair` (with the same --root or --state-dir) moves "
                "it aside and rebuilds the ledger from the files on disk and the backend")
    return text


async def _stop_with_parent(pid: int, daemon: Materializer) -> None:
    await wait_for_exit(pid)
    log.info("the launching process (pid %d) exited: stopping", pid)
    daemon.stop()


def _status_text(payload: dict[str, Any]) -> str:
    state = str(payload.get("state", ""))
    return {"auth_required": "sign-in needed", "token_needed": "waiting for a fresh token"}.get(state, state)
