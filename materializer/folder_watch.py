"""Watching one folder for changes (the token file's, the configuration file's), cheaply while nothing changes.

watchfiles' loop wakes every ``step`` milliseconds to look for changes and for its stop
event; at its default of 50 ms, one idle watch takes 0.15 % of a core, more than the rest
of an idle daemon. At :data:`WATCH_STEP_MS` it takes 0.03 %, and a change is seen within
half a second (a token is replaced minutes before it expires; a configuration edit needs
no faster answer).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import watchfiles

__all__ = ["WATCH_STEP_MS", "watch_folder"]

#: How often (ms) a watch looks for changes: the longest a change waits to be seen, once it is quiet.
WATCH_STEP_MS = 500


Changes = set[tuple[watchfiles.Change, str]]


def watch_folder(folder: Path, *, watch_filter: Callable[[watchfiles.Change, str], bool] | None = None,
                 stop_event: watchfiles.main.AnyEvent | None = None) -> AsyncGenerator[Changes, None]:
    """Changes to the entries of ``folder`` (not below it), as ``watchfiles.awatch`` yields them."""
    return watchfiles.awatch(folder, watch_filter=watch_filter, recursive=False, step=WATCH_STEP_MS,
                             stop_event=stop_event)
