"""The backend's own clock: the machine's, moved by ``--clock-offset``.

A deployment keeps its own time, and a client's clock may be far from it (a laptop
a year ahead, a clock stepped back a day). Everything this backend stamps with a time
reads this clock: database timestamps and ``serverTs`` (nanoseconds, as Convex's), the
``clientClockSkew`` it measures at ``Connect``, token ``iat``/``exp`` and their expiry,
and the ``createdAt``/``completedAt`` of the jobs it runs. Moving it (``--clock-offset``)
is how the tests give a materializer a local clock that is wrong *relative to the
server*, without touching the materializer's clock.
"""

from __future__ import annotations

import time

__all__ = ["ServerClock"]


class ServerClock:
    """Unix time ``offset_seconds`` away from the machine's (0: the machine's own)."""

    def __init__(self, offset_seconds: float = 0.0) -> None:
        self.offset_seconds = offset_seconds

    def time(self) -> float:
        """Unix seconds."""
        return time.time() + self.offset_seconds

    def time_ms(self) -> float:
        """Unix milliseconds (what job documents carry)."""
        return self.time() * 1000

    def time_ns(self) -> int:
        """Unix nanoseconds (Convex timestamps)."""
        return time.time_ns() + int(self.offset_seconds * 1_000_000_000)
