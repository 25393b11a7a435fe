"""The ledger's own threads: every ledger call of a process, in order, with group commit; and checkpoints.

Why: each ledger commit waits for an fsync of the write-ahead log (``synchronous=FULL``,
see :mod:`materializer.ledger`), and several jobs finishing at once (a burst, a replay)
each want one. Calls that queue up while one runs are run next as one group
(:meth:`materializer.ledger.Ledger.group`): each in a savepoint of its own, all under one
commit, one fsync. Durability is the same: no caller hears its call's result before the
commit that holds its writes is on disk, and a call that raises takes back its own writes only.
A call alone in the queue runs as before, in its own transaction.

:class:`LedgerThread` is a :class:`concurrent.futures.Executor`, so ``loop.run_in_executor``
takes it, as it took the single-thread pool it replaces.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, NamedTuple, ParamSpec, TypeVar

from materializer.ledger import Ledger, LedgerError

__all__ = ["CHECKPOINT_INTERVAL", "MAX_GROUP", "Checkpointer", "LedgerThread"]

log = logging.getLogger(__name__)

#: The most calls committed together: a group holds the write lock for its whole length, and
#: another process (``replay`` beside the daemon) waits that long for it.
MAX_GROUP = 64

#: How often the checkpointer copies what was committed from the write-ahead log into the database file
#: (seconds). A few hundred pages a second at most, copied off the ledger's thread.
CHECKPOINT_INTERVAL = 1.0

P = ParamSpec("P")
T = TypeVar("T")


class _Call(NamedTuple):
    future: Future[Any]
    function: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class LedgerThread(Executor):
    """Runs ledger calls on one thread of its own, in the order submitted, queued ones committed together.

    Every call must reach the ledger only through ``ledger``'s methods (they are what a group
    turns into savepoints).
    """

    def __init__(self, ledger: Ledger, name: str = "ledger") -> None:
        self._ledger = ledger
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put(_Call(future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; the calls already queued still run (``cancel_futures`` cancels them)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    while True:
                        try:
                            call = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if call is not None:
                            call.future.cancel()
                self._queue.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            calls = [first]
            stop = False
            while len(calls) < MAX_GROUP:
                try:
                    call = self._queue.get_nowait()
                except queue.Empty:
                    break
                if call is None:  # shutdown: nothing can have been queued after it
                    stop = True
                    break
                calls.append(call)
            calls = [call for call in calls if call.future.set_running_or_notify_cancel()]
            if len(calls) == 1:
                _run_alone(calls[0])
            elif calls:
                self._run_group(calls)
            if stop:
                return

    def _run_group(self, calls: list[_Call]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self._ledger.group():
                for call in calls:
                    try:
                        outcomes.append((True, call.function(*call.args, **call.kwargs)))
                    except BaseException as exc:  # the call's own failure: its savepoint is rolled back
                        outcomes.append((False, exc))
        except BaseException as exc:  # the group did not commit: no call's writes are in the ledger
            for call in calls:
                call.future.set_exception(exc)
            return
        for call, (ok, value) in zip(calls, outcomes, strict=True):
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)


def _run_alone(call: _Call) -> None:
    try:
        result = call.function(*call.args, **call.kwargs)
    except BaseException as exc:
        call.future.set_exception(exc)
    else:
        call.future.set_result(result)


class Checkpointer:
    """Checkpoints the write-ahead log of a ``Ledger(background_checkpoints=True)`` from a thread of its own.

    Why: SQLite checkpoints in the commit that takes the log past its threshold, a few times a
    minute under load and tens of milliseconds each (copying pages, an fsync of the database
    file): on the ledger's thread, the job behind that commit waited for it. Here every
    ``interval`` seconds, when something was committed, on a connection of its own.
    """

    def __init__(self, ledger: Ledger, interval: float = CHECKPOINT_INTERVAL) -> None:
        self._ledger = ledger
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-checkpoints", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop (a checkpoint under way finishes first); the ledger may be closed after this."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._ledger.checkpoint()
            except LedgerError as exc:  # busy or failing: SQLite's own fallback threshold still holds
                log.debug("checkpoint not done: %s", exc)
