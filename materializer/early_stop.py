"""A stop signal that lands while ``materializer run`` is still starting is remembered, not fatal.

Importing the daemon takes a good part of a second; until the event loop installs its
own handlers, Python's defaults would let SIGTERM kill the process mid-start (exit -15,
no final gallery.json) and turn Ctrl-C into a traceback. ``cli`` installs these handlers
first, before any heavy import, and the service stops at once if one fired.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["EarlyStop"]

#: The signals that stop the daemon (the service's event loop takes them over once it runs).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class EarlyStop:
    """Notes SIGTERM/SIGINT until the service's loop handles them itself."""

    def __init__(self) -> None:
        self.requested = False

    @classmethod
    def install(cls) -> EarlyStop:
        early = cls()
        for signum in STOP_SIGNALS:
            signal.signal(signum, early._note)
        return early

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
