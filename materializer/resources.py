"""What outputs compete for, shared out by rule: memory, and download slots.

Two accounting objects decide. They are sans-I/O and asyncio-agnostic: they keep counts and
queues of opaque waiters and say which waiters may go now. Two thin asyncio wrappers carry the
decisions out with futures.

- :class:`Budget` (:class:`MemoryBudget`): the bytes the validation of outputs holds in memory at
  once (each file read whole, and its decoded pixels, weighted width x height x 4 x frames), against
  ``daemon.memory_budget_bytes``. Without it, four 10000x10000 PNGs of 1.75 MB each decoded at once
  took 1.5 GB. Requests are granted first come, first served, so a large one is never overtaken
  forever; one larger than the whole budget is granted when nothing else holds any, so it runs
  alone instead of never.
- :class:`SlotShare` (:class:`DownloadSlots`): the ``daemon.download_concurrency`` download slots,
  shared among jobs. A free slot goes to the waiting job that holds the fewest (the one that waited
  longest among equals), and with two slots or more no job holds them all, so a job with thousands
  of outputs cannot keep a normal job waiting behind it.

Lock order: an output holds its download slot while it waits for memory; whoever holds memory
waits for nothing, so both always make progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

__all__ = ["Budget", "DownloadSlots", "MemoryBudget", "SlotShare"]

W = TypeVar("W", bound=Hashable)


class Budget(Generic[W]):
    """Bytes granted to waiters against a capacity, first come, first served.

    :meth:`request` grants at once or queues; :meth:`release` and :meth:`withdraw` return the
    waiters that are granted as a result, in order. A request fits when the bytes held plus its
    own stay within ``capacity``, or when nothing is held at all (a request larger than the whole
    budget then runs alone).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a budget needs a positive capacity, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self._queue: deque[tuple[W, int]] = deque()

    @property
    def waiting(self) -> int:
        """Requests queued, not yet granted."""
        return len(self._queue)

    def request(self, waiter: W, amount: int) -> bool:
        """Ask for ``amount`` bytes: True if granted now, else False (queued behind earlier requests)."""
        if amount < 0:
            raise ValueError(f"cannot request a negative amount ({amount})")
        if not self._queue and self._fits(amount):
            self.held += amount
            return True
        self._queue.append((waiter, amount))
        return False

    def take(self, amount: int) -> bool:
        """Take ``amount`` bytes if :meth:`request` would grant them now; never queue (False: nothing changed)."""
        if amount < 0:
            raise ValueError(f"cannot take a negative amount ({amount})")
        if self._queue or not self._fits(amount):
            return False
        self.held += amount
        return True

    def release(self, amount: int) -> list[W]:
        """Give back ``amount`` bytes a granted request held; return the waiters granted now."""
        if not 0 <= amount <= self.held:
            raise ValueError(f"cannot release {amount} bytes: {self.held} are held")
        self.held -= amount
        return self._grant()

    def withdraw(self, waiter: W, amount: int) -> list[W]:
        """Give up a request of ``amount`` bytes, granted or not (a cancelled waiter); return those granted now."""
        for index, (queued, _) in enumerate(self._queue):
            if queued == waiter:
                del self._queue[index]
                return self._grant()  # it may have been holding the line
        return self.release(amount)

    def _fits(self, amount: int) -> bool:
        return self.held == 0 or self.held + amount <= self.capacity

    def _grant(self) -> list[W]:
        granted = []
        while self._queue and self._fits(self._queue[0][1]):
            waiter, amount = self._queue.popleft()
            self.held += amount
            granted.append(waiter)
        return granted


class SlotShare(Generic[W]):
    """``slots`` download slots shared among jobs: fewest held first, and at most ``per_job`` each.

    ``per_job`` is ``slots - 1`` (at least 1): with two slots or more, a job that holds all it may
    still leaves one for the next job. Within a job, its outputs go in the order they asked.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"need at least one download slot, got {slots}")
        self.slots = slots
        self.per_job = max(1, slots - 1)
        self._in_use: dict[str, int] = {}
        #: Jobs with waiting outputs, in the order they are to be served among equals.
        self._waiting: dict[str, deque[W]] = {}

    @property
    def free(self) -> int:
        return self.slots - sum(self._in_use.values())

    def held_by(self, job: str) -> int:
        return self._in_use.get(job, 0)

    def request(self, job: str, waiter: W) -> bool:
        """An output of ``job`` asks for a slot: True if it has one now, else False (queued)."""
        if self.free > 0 and self.held_by(job) < self.per_job and job not in self._waiting:
            # Anyone waiting now is held back by the per-job cap, so the slot is this job's to take.
            self._take(job)
            return True
        self._waiting.setdefault(job, deque()).append(waiter)
        return False

    def release(self, job: str) -> list[W]:
        """An output of ``job`` is done with its slot; return the waiters given a slot now."""
        held = self.held_by(job)
        if held < 1:
            raise ValueError(f"job {job!r} holds no download slot")
        if held == 1:
            del self._in_use[job]
        else:
            self._in_use[job] = held - 1
        return self._grant()

    def withdraw(self, job: str, waiter: W) -> list[W]:
        """An output gives up (cancelled), waiting or holding a slot; return the waiters given a slot now."""
        queue = self._waiting.get(job)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[job]
            return []
        return self.release(job)

    def _grant(self) -> list[W]:
        granted = []
        while self.free > 0:
            eligible = [job for job in self._waiting if self.held_by(job) < self.per_job]
            if not eligible:
                break
            job = min(eligible, key=self.held_by)  # min() keeps the first of equals: the longest waiting
            queue = self._waiting.pop(job)
            granted.append(queue.popleft())
            self._take(job)
            if queue:
                self._waiting[job] = queue  # to the back of the line among equals
        return granted

    def _take(self, job: str) -> None:
        self._in_use[job] = self.held_by(job) + 1


def _wake(futures: Iterable[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # a cancelled waiter withdraws its grant itself
            future.set_result(None)


class MemoryBudget:
    """:class:`Budget` for asyncio: ``async with budget.reserve(n):`` holds ``n`` bytes of it.

    A worker thread may also take its share at once with ``with budget.hold_now(n, loop) as held:``
    (when ``held`` is False it holds nothing and should wait with :meth:`reserve`): a file that fits
    is checked in the same trip to the thread as its size was read, not in a second one.
    """

    def __init__(self, capacity: int) -> None:
        self._budget: Budget[asyncio.Future[None]] = Budget(capacity)
        #: Guards the budget: the loop requests and releases, worker threads take and release.
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._budget.capacity

    @property
    def held(self) -> int:
        return self._budget.held

    @contextlib.asynccontextmanager
    async def reserve(self, amount: int) -> AsyncIterator[None]:
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            granted = self._budget.request(future, amount)
        if not granted:
            try:
                await future
            except asyncio.CancelledError:
                with self._lock:
                    woken = self._budget.withdraw(future, amount)
                _wake(woken)
                raise
        try:
            yield
        finally:
            with self._lock:
                woken = self._budget.release(amount)
            _wake(woken)

    @contextlib.contextmanager
    def hold_now(self, amount: int, loop: asyncio.AbstractEventLoop) -> Iterator[bool]:
        """From a worker thread: hold ``amount`` bytes for the block if they are granted at once (never queued).

        Waiters the release grants are woken on ``loop``, their futures' own thread.
        """
        with self._lock:
            held = self._budget.take(amount)
        try:
            yield held
        finally:
            if held:
                with self._lock:
                    woken = self._budget.release(amount)
                if woken:
                    loop.call_soon_threadsafe(_wake, woken)

class DownloadSlots:
    """:class:`SlotShare` for asyncio: ``async with slots.slot(job_id):`` holds one of the job's slots."""

    def __init__(self, slots: int) -> None:
        self._share: SlotShare[asyncio.Future[None]] = SlotShare(slots)

    @contextlib.asynccontextmanager
    async def slot(self, job: str) -> AsyncIterator[None]:
        future = asyncio.get_running_loop().create_future()
        if not self._share.request(job, future):
            try:
                await future
            except asyncio.CancelledError:
                _wake(self._share.withdraw(job, future))
                raise
        try:
            yield
        finally:
            _wake(self._share.release(job))
