"""The ledger's own thread: calls in order, those that queue up committed together (group commit).

What must hold (materializer/ledger_thread.py, Ledger.group): calls that queued while another
ran share one transaction (one COMMIT: one WAL fsync) and are each a savepoint, so one call's
failure takes back its own writes only; a group that does not commit fails every call in it and
leaves none of their writes; no caller hears a result before the commit that holds it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

import pytest

from materializer.ledger import Ledger, LedgerBusyError, LedgerError
from materializer.ledger_thread import MAX_GROUP, Checkpointer, LedgerThread


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "materializer.db", busy_timeout=0.2) as ledger:
        yield ledger


@pytest.fixture
def thread(ledger: Ledger) -> Iterator[LedgerThread]:
    executor = LedgerThread(ledger)
    yield executor
    executor.shutdown(wait=True)


class Gate:
    """A first call that holds the ledger's thread until released, so that the next calls queue up."""

    def __init__(self, executor: LedgerThread) -> None:
        self.entered, self.released = threading.Event(), threading.Event()
        self.future = executor.submit(self._hold)
        assert self.entered.wait(10), "the ledger's thread never ran the first call"

    def _hold(self) -> None:
        self.entered.set()
        assert self.released.wait(10)

    def open(self) -> None:
        self.released.set()
        self.future.result(timeout=10)


def statements_of(ledger: Ledger) -> list[str]:
    statements: list[str] = []
    ledger._conn.set_trace_callback(statements.append)  # see exactly what the calls run
    return statements


def state(n: int) -> dict[str, Any]:
    return {"state": "connected", "n": n}


def committed_events(path: Path) -> list[int]:
    """The ``n`` of every state event another connection sees committed."""
    with sqlite3.connect(path) as other:
        rows = other.execute("SELECT payload FROM events ORDER BY seq").fetchall()
    return [int(json.loads(row[0])["n"]) for row in rows]


def test_calls_that_queue_up_commit_together_in_order(ledger: Ledger, thread: LedgerThread) -> None:
    gate = Gate(thread)
    statements = statements_of(ledger)
    futures = [thread.submit(ledger.append_event, "materializer.state", state(n)) for n in range(10)]
    assert not any(future.done() for future in futures)
    gate.open()
    events = [future.result(timeout=10) for future in futures]

    assert [event.seq for event in events] == list(range(events[0].seq, events[0].seq + 10))
    assert statements.count("COMMIT") == 1 and statements.count("BEGIN IMMEDIATE") == 1
    assert statements.count("SAVEPOINT call") == 10 and statements.count("RELEASE call") == 10
    assert committed_events(ledger.path) == list(range(10))


def test_a_call_alone_runs_in_its_own_transaction(ledger: Ledger, thread: LedgerThread) -> None:
    statements = statements_of(ledger)
    thread.submit(ledger.append_event, "materializer.state", state(1)).result(timeout=10)
    assert "SAVEPOINT call" not in statements
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1


def test_a_group_is_at_most_max_group_calls(ledger: Ledger, thread: LedgerThread) -> None:
    gate = Gate(thread)
    statements = statements_of(ledger)
    futures = [thread.submit(ledger.append_event, "materializer.state", state(n)) for n in range(MAX_GROUP + 5)]
    gate.open()
    for future in futures:
        future.result(timeout=10)
    assert statements.count("COMMIT") == 2
    assert committed_events(ledger.path) == list(range(MAX_GROUP + 5))


def test_a_failing_call_takes_back_its_own_writes_and_leaves_the_others(ledger: Ledger,
                                                                         thread: LedgerThread) -> None:
    def write_then_fail() -> None:
        with ledger._write() as conn:  # a ledger method that fails after writing (a constraint, a bug)
            ledger._append_event(conn, "materializer.state", None, '{"state": "connected", "n": 99}')
            raise ValueError("failed after writing")

    gate = Gate(thread)
    first = thread.submit(ledger.append_event, "materializer.state", state(1))
    failing = thread.submit(write_then_fail)
    last = thread.submit(ledger.append_event, "materializer.state", state(2))
    gate.open()

    assert first.result(timeout=10).seq + 1 == last.result(timeout=10).seq
    with pytest.raises(ValueError, match="failed after writing"):
        failing.result(timeout=10)
    assert committed_events(ledger.path) == [1, 2]


def test_a_group_that_does_not_commit_fails_every_call_and_keeps_none_of_their_writes(
        ledger: Ledger, thread: LedgerThread) -> None:
    def rolled_back_by_sqlite() -> None:
        # What SQLite does to the whole transaction on SQLITE_FULL or SQLITE_IOERR.
        ledger._conn.execute("ROLLBACK")

    gate = Gate(thread)
    before = thread.submit(ledger.append_event, "materializer.state", state(1))
    rollback = thread.submit(rolled_back_by_sqlite)
    after = thread.submit(ledger.append_event, "materializer.state", state(2))
    gate.open()

    for future in (before, rollback, after):
        with pytest.raises(LedgerError, match="rolled back a group of calls"):
            future.result(timeout=10)
    assert committed_events(ledger.path) == []
    # The thread and the ledger go on.
    assert thread.submit(ledger.append_event, "materializer.state", state(3)).result(timeout=10).seq > 0
    assert committed_events(ledger.path) == [3]


def test_a_group_that_cannot_take_the_write_lock_fails_every_call_as_busy(ledger: Ledger,
                                                                          thread: LedgerThread) -> None:
    other = sqlite3.connect(ledger.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process (a replay) holds the write lock
    try:
        gate = Gate(thread)
        futures = [thread.submit(ledger.append_event, "materializer.state", state(n)) for n in range(3)]
        gate.open()
        for future in futures:
            with pytest.raises(LedgerBusyError):
                future.result(timeout=10)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert thread.submit(ledger.append_event, "materializer.state", state(4)).result(timeout=10).seq > 0


def test_results_wait_for_the_commit(ledger: Ledger, thread: LedgerThread) -> None:
    """No caller hears of its write while the group holding it has not committed."""
    seen_by_others: list[list[int]] = []
    heard = threading.Event()

    def hear(_: Future[Any]) -> None:  # runs as the result is handed over, before any later call
        seen_by_others.append(committed_events(ledger.path))
        heard.set()

    gate = Gate(thread)
    first = thread.submit(ledger.append_event, "materializer.state", state(1))
    first.add_done_callback(hear)
    thread.submit(ledger.append_event, "materializer.state", state(2))
    gate.open()
    assert heard.wait(10)
    assert seen_by_others == [[1, 2]]


def test_shutdown_runs_what_was_queued_then_refuses_new_calls(ledger: Ledger) -> None:
    executor = LedgerThread(ledger)
    gate = Gate(executor)
    queued = [executor.submit(ledger.append_event, "materializer.state", state(n)) for n in range(3)]
    stopping = threading.Thread(target=executor.shutdown)
    stopping.start()
    gate.open()
    stopping.join(10)
    assert not stopping.is_alive()
    assert [future.result(timeout=0).seq for future in queued] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(ledger.append_event, "materializer.state", state(9))


def test_shutdown_can_cancel_what_was_queued(ledger: Ledger) -> None:
    executor = LedgerThread(ledger)
    gate = Gate(executor)
    queued: list[Future[Any]] = [executor.submit(ledger.append_event, "materializer.state", state(n))
                                 for n in range(3)]
    executor.shutdown(wait=False, cancel_futures=True)
    gate.open()
    for future in queued:
        with pytest.raises(CancelledError):
            future.result(timeout=10)
    assert committed_events(ledger.path) == []


def test_run_in_executor_takes_it(ledger: Ledger, thread: LedgerThread) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        events = await asyncio.gather(*(loop.run_in_executor(thread, ledger.append_event, "materializer.state",
                                                             state(n)) for n in range(5)))
        return [event.seq for event in events]

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


# -- checkpoints, off the ledger's thread ------------------------------------------------------------


def fill_the_log(ledger: Ledger, pages: int) -> None:
    """Commit about ``pages`` pages of events, one commit each."""
    for n in range(pages // 2):
        ledger.append_event("materializer.state", {"state": "connected", "n": n, "pad": "x" * 6000})


def test_commits_leave_checkpoints_to_the_background_and_checkpoint_copies_what_is_new(tmp_path: Path) -> None:
    path = tmp_path / "materializer.db"
    with Ledger(path, background_checkpoints=True) as ledger:
        fill_the_log(ledger, 1500)  # past SQLite's own threshold of 1,000 pages
        before = path.stat().st_size
        assert Path(f"{path}-wal").stat().st_size > 1000 * 4096  # no commit checkpointed on its own
        assert ledger.checkpoint() is True
        assert path.stat().st_size > before + 1000 * 4096  # the pages are in the database file now
        assert ledger.checkpoint() is False  # nothing committed since
        ledger.events_after(0, 10)  # a read commits nothing
        assert ledger.checkpoint() is False
        ledger.append_event("materializer.state", state(1))
        assert ledger.checkpoint() is True


def test_without_background_checkpoints_sqlite_checkpoints_in_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "materializer.db"
    with Ledger(path) as ledger:
        fill_the_log(ledger, 1500)
        assert path.stat().st_size > 1000 * 4096  # SQLite's automatic checkpoint ran in a commit


def test_the_checkpointer_checkpoints_from_its_own_thread(tmp_path: Path) -> None:
    path = tmp_path / "materializer.db"
    with Ledger(path, background_checkpoints=True) as ledger:
        checkpointer = Checkpointer(ledger, interval=0.01)
        try:
            before = path.stat().st_size
            fill_the_log(ledger, 200)
            deadline = time.monotonic() + 10
            while path.stat().st_size < before + 100 * 4096:
                assert time.monotonic() < deadline, "the checkpointer never copied the log"
                time.sleep(0.01)
        finally:
            checkpointer.close()


def test_opening_the_checkpoint_connection_keeps_the_ledgers_locks(tmp_path: Path) -> None:
    """Closing any descriptor of the file drops every POSIX lock the process holds on it, SQLite's too:
    another process would then take the ledger for unused and, closing its connection, checkpoint the log
    and delete it under the daemon. The checkpoint connection is opened without such a descriptor."""
    path = tmp_path / "materializer.db"
    with Ledger(path, background_checkpoints=True) as ledger:
        ledger.append_event("materializer.state", state(1))
        assert ledger.checkpoint() is True  # opens the checkpoint connection
        ledger.append_event("materializer.state", state(2))
        reads_then_closes = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
                             " c.execute('SELECT count(*) FROM events').fetchone(); c.close()")
        subprocess.run([sys.executable, "-c", reads_then_closes, str(path)], check=True)
        assert Path(f"{path}-wal").exists()  # the other process knew it was not the last connection
        assert committed_events(path) == [1, 2]
