"""A clock for schedules that a step of the wall clock does not move.

Retry times and leases are stored in the ledger as Unix seconds (so they survive a restart and
other processes can read them), but they are *waits*: a retry due in 30 s must come in 30 s even
if the wall clock is stepped back a day meanwhile (with ``time.time()`` it would wait a day).
:class:`SteadyClock` reads the wall clock once, when it is made, and moves on with the monotonic
clock from there. What a step did to times stored before a restart is undone at start
(:meth:`materializer.ledger.Ledger.clamp_schedule`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["SteadyClock"]


class SteadyClock:
    """Unix seconds: the wall clock at creation, carried on by the monotonic clock (both injectable)."""

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._offset = wall() - monotonic()

    def __call__(self) -> float:
        return self._offset + self._monotonic()
