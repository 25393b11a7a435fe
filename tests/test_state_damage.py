"""Damaged state heals or is named: rows decoded one at a time, damaged ledger files refused, never replaced.

Real SQLite files, damaged on disk byte by byte (:func:`ledger_checks.flip_stored_byte`), real
sidebar sockets, and a real daemon process for the scheduler.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from materializer.display import SKIPPED, DisplayServer
from materializer.layout import default_layout
from materializer.ledger import (
    UNDECODABLE_DOCUMENT,
    Ledger,
    LedgerDamagedError,
    OutputFile,
    _ledger_header_problem,
    header_problem,
)
from materializer.watch import format_event
from stella_devbackend.control import DevBackend

from helpers import DaemonProcess, async_wait_until, ledger_jobs, wait_until
from ledger_checks import check_integrity, flip_stored_byte


def job_doc(job_id: str, completed_at_ms: float) -> dict[str, Any]:
    return {"jobId": job_id, "capability": "text_to_image", "profile": "best", "status": "succeeded",
            "request": {"prompt": f"prompt of {job_id}"}, "completedAt": completed_at_ms,
            "output": {"images": [{"url": f"https://cdn.example/{job_id}.png"}]}}


def a_file(job_id: str) -> OutputFile:
    return OutputFile(0, f"{job_id}_0.png", "image/png", 8, 8, 3, hashlib.sha256(b"png").hexdigest())


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path: a sidebar socket's path must fit AF_UNIX's 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dmg", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def db(short_dir: Path) -> Path:
    return default_layout(short_dir).ledger


# -- the file: absent is fresh, damaged is refused and left as it is ----------------------------------------


def test_header_problem_reads_sqlites_file_format() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.db"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE t (x)")
            conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 50)
        data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    assert header_problem(data[:100], len(data)) is None
    assert header_problem(b"", 0) == "the file is empty (0 bytes)"
    assert "does not start with SQLite's header" in (header_problem(b"\x00" * 100, 4096) or "")
    assert "not a whole number of" in (header_problem(data[:100], len(data) - 1) or "")
    assert f"its header says {len(data)} bytes, it has {len(data) - page}" in (
        header_problem(data[:100], len(data) - page) or "")
    assert "impossible page size (3)" in (header_problem(data[:16] + b"\x00\x03" + data[18:100], len(data)) or "")


@pytest.mark.parametrize("damage", ["empty", "truncated-mid-page", "truncated-at-a-page", "garbled"])
def test_a_damaged_ledger_is_refused_and_left_byte_for_byte(db: Path, damage: str) -> None:
    with Ledger(db) as ledger:
        ledger.observe_jobs([job_doc(f"job_{i:03d}", 1_000 + i) for i in range(300)])
    data = db.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    damaged = {"empty": b"", "truncated-mid-page": data[: len(data) // 2 + 7],
               "truncated-at-a-page": data[: len(data) - 2 * page],
               "garbled": bytes(b ^ 0x5A if i % 97 == 0 else b for i, b in enumerate(data))}[damage]
    db.write_bytes(damaged)
    with pytest.raises(LedgerDamagedError, match=f"^{db} is damaged: "):
        Ledger(db)
    assert db.read_bytes() == damaged
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]  # no -wal, no -shm, nothing new


def test_a_write_ahead_log_without_its_ledger_is_damage_not_a_fresh_start(db: Path) -> None:
    with Ledger(db) as ledger:
        ledger.observe_jobs([job_doc("job_a", 1_000)])
    Path(f"{db}-wal").write_bytes(b"a log of another life")
    db.unlink()
    with pytest.raises(LedgerDamagedError, match="missing but its write-ahead log"):
        Ledger(db)
    assert not db.exists()


def test_a_new_ledger_appears_whole_and_leaves_no_temporary_file(db: Path) -> None:
    with Ledger(db) as ledger, Ledger(db) as second:  # the second opens what the first created
        assert ledger.last_seq() == second.last_seq() == 0
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]


# -- rows, one at a time ------------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_pending_document_quarantines_that_job_only(db: Path) -> None:
    with Ledger(db) as ledger:
        ledger.observe_jobs([job_doc("job_bad", 1_000), job_doc("job_ok1", 2_000), job_doc("job_ok2", 3_000)])
    flip_stored_byte(db, b'"jobId":"job_bad"')  # the quote before jobId becomes '#': not JSON any more
    with Ledger(db) as ledger:
        assert [job.job_id for job in ledger.due_jobs(10)] == ["job_ok1", "job_ok2"]
        bad = ledger.job("job_bad")
        assert bad is not None and bad.status == "quarantined"
        assert bad.last_error is not None and bad.last_error.startswith(f"{UNDECODABLE_DOCUMENT}: Expecting")
        [event] = ledger.events_after(0, 10).events
        assert event.payload == {"state": "quarantined", "jobId": "job_bad", "reason": bad.last_error}
        assert ledger.status().counts == {"pending": 2, "materialized": 0, "quarantined": 1}
        # The document comes again (a replay, the feed): the job heals.
        assert ledger.observe_jobs([job_doc("job_bad", 1_000)]) == []
        healed = ledger.job("job_bad")
        assert healed is not None and (healed.status, healed.attempts, healed.last_error) == ("pending", 0, None)
        assert healed.doc == job_doc("job_bad", 1_000)
        assert "job_bad" in [job.job_id for job in ledger.due_jobs(10)]


def test_invalid_utf8_in_a_document_is_named_too(db: Path) -> None:
    with Ledger(db) as ledger:
        ledger.observe_jobs([job_doc("job_bad", 1_000), job_doc("job_ok", 2_000)])
    flip_stored_byte(db, b'"prompt":"prompt of job_bad"', offset=11, mask=0x80)  # 'p' of the text -> 0xF0
    with Ledger(db) as ledger:
        assert [job.job_id for job in ledger.due_jobs(10)] == ["job_ok"]
        bad = ledger.job("job_bad")
        assert bad is not None and bad.prompt == "prompt of job_bad"  # its other columns still read
        assert re.fullmatch(f"{UNDECODABLE_DOCUMENT}: invalid UTF-8 at byte [0-9]+", bad.last_error or "")


def test_a_corrupt_event_payload_is_skipped_with_a_reason_and_the_rest_reads(db: Path) -> None:
    with Ledger(db) as ledger:
        for state in ("one", "two", "three"):
            ledger.append_event("materializer.state", {"state": state})
        ledger.set_state("gaps", [{"fromMs": 1}])
    flip_stored_byte(db, b'{"state":"two"}')  # '{' becomes 'z'
    flip_stored_byte(db, b'[{"fromMs":1}]')
    with Ledger(db) as ledger:
        events = ledger.events_after(0, 10).events
        assert [(e.seq, e.payload) for e in events] == [(1, {"state": "one"}), (2, {}), (3, {"state": "three"})]
        assert events[1].unreadable is not None and events[1].unreadable.startswith(
            "its stored payload does not decode: Expecting value")
        assert ledger.get_state("gaps", []) == []
        assert "gaps" not in ledger.status().state


def test_files_that_vanished_come_back_without_a_second_announcement(db: Path) -> None:
    with Ledger(db) as ledger:
        ledger.observe_jobs([job_doc("job_a", 1_000), job_doc("job_b", 2_000)])
        first = ledger.mark_materialized("job_a", [a_file("job_a")], {"jobId": "job_a"})
        assert first is not None
        assert ledger.mark_vanished({"job_a": "its files vanished", "job_b": "not materialized"}) == ["job_a"]
        job = ledger.job("job_a")
        assert job is not None and (job.status, job.last_error) == ("pending", "its files vanished")
        assert ledger.outputs("job_a") == [] and ledger.gallery_entries(10) == []
        assert ledger.mark_materialized("job_a", [a_file("job_a")], {"jobId": "job_a"}) is None
        job = ledger.job("job_a")
        assert job is not None and (job.status, job.last_error) == ("materialized", None)
        assert [e.seq for e in ledger.events_after(0, 10).events] == [first.seq]
        assert ledger.materialized_outputs("", 10) == [("job_a", [a_file("job_a")])]
        assert check_integrity(ledger) == []


# -- the sidebar: a notice in the skipped event's place, later events flow -----------------------------------


@pytest.fixture
async def served(short_dir: Path, db: Path) -> AsyncIterator[tuple[Ledger, DisplayServer]]:
    with Ledger(db) as ledger:
        for state in ("one", "two", "three"):
            ledger.append_event("materializer.state", {"state": state})
    flip_stored_byte(db, b'{"state":"two"}')
    with Ledger(db) as ledger:
        server = DisplayServer(default_layout(short_dir).display_socket, ledger, poll_interval=None)
        await server.start()
        try:
            yield ledger, server
        finally:
            await server.close()


async def test_a_client_since_before_a_corrupt_event_gets_a_notice_in_its_place(
        served: tuple[Ledger, DisplayServer], short_dir: Path) -> None:
    ledger, server = served
    reader, writer = await asyncio.open_unix_connection(default_layout(short_dir).display_socket)
    writer.write(b'{"type": "hello", "since": 0}\n')
    lines = [json.loads(await reader.readline()) for _ in range(4)]
    assert lines[0] == {"type": "welcome", "since": 0}
    assert lines[1] == {"seq": 1, "type": "materializer.state", "payload": {"state": "one"}}
    notice = lines[2]
    assert notice["type"] == SKIPPED and "seq" not in notice
    assert notice["payload"]["seq"] == 2 and notice["payload"]["eventType"] == "materializer.state"
    assert notice["payload"]["message"].startswith("event 2 (materializer.state) could not be read from the ledger")
    assert "kind" not in notice["payload"]  # nothing a DisplayPayload reader could take for media
    assert lines[3] == {"seq": 3, "type": "materializer.state", "payload": {"state": "three"}}
    live = ledger.append_event("materializer.state", {"state": "four"})
    server.publish(live)
    assert json.loads(await reader.readline())["seq"] == 4
    assert format_event(notice).endswith(f"- materializer.skipped {notice['payload']['message']}")
    writer.close()


async def test_the_notice_reaches_live_clients_in_order(served: tuple[Ledger, DisplayServer],
                                                        short_dir: Path) -> None:
    ledger, server = served
    reader, writer = await asyncio.open_unix_connection(default_layout(short_dir).display_socket)
    writer.write(b'{"type": "hello", "since": 1}\n')
    assert json.loads(await reader.readline()) == {"type": "welcome", "since": 1}
    assert json.loads(await reader.readline())["payload"]["seq"] == 2
    assert json.loads(await reader.readline())["seq"] == 3
    writer.close()
    await async_wait_until(lambda: server.client_count == 0, what="the client gone")


# -- the daemon: one damaged row does not stall the scheduler ------------------------------------------------


def test_the_daemon_quarantines_a_damaged_pending_job_and_goes_on(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    db = default_layout(root).ledger
    [bad] = backend.create_jobs(count=1, width=32, height=32)
    doc = backend.query("media_jobs:getByJobId", {"jobId": bad}).json()["value"]
    with Ledger(db) as ledger:
        ledger.observe_jobs([doc])
        # The cursor is past the damaged job: the feed will not bring its document again.
        ledger.ensure_cursor(doc["completedAt"] + 1)
        ledger.ensure_cursor(doc["completedAt"] + 1, "failed")
    flip_stored_byte(db, f'"jobId":"{bad}"'.encode())
    with DaemonProcess(root, backend) as daemon:
        later = backend.create_jobs(count=5, width=32, height=32)
        wait_until(lambda: all(ledger_jobs(root).get(j) == "materialized" for j in later), what="the later jobs")
        assert ledger_jobs(root)[bad] == "quarantined"
        assert "the scheduler failed" not in daemon.log.read_text()
    with Ledger(db) as ledger:
        job = ledger.job(bad)
        assert job is not None and job.last_error is not None
        assert job.last_error.startswith(f"{UNDECODABLE_DOCUMENT}: ")


# -- a ledger read while its daemon checkpoints is not damaged ----------------------------------------------


def test_a_ledger_opened_while_another_connection_checkpoints_is_never_taken_for_truncated(db: Path) -> None:
    """A checkpoint writes page 1 (the header with the new size) before the pages that make the file that
    long, so `status` or `replay` opening the ledger then once saw "truncated" and refused it. Real
    connections: one writes big documents and checkpoints after every commit while another opens the file."""
    with Ledger(db) as writer:
        writer._conn.execute("PRAGMA wal_autocheckpoint = 1")  # a checkpoint after every commit
        stop = threading.Event()
        written = 0

        def write() -> None:
            nonlocal written
            while not stop.is_set():
                doc = job_doc(f"j{written}", 1000.0 + written)
                doc["request"]["prompt"] = "p" * 30_000
                writer.observe_jobs([doc])
                written += 1

        thread = threading.Thread(target=write)
        thread.start()
        try:
            # The header as `Ledger()` judges it before it opens the file (cheap, so thousands of looks).
            problems = [_ledger_header_problem(db) for _ in range(3000)]
        finally:
            stop.set()
            thread.join()
    assert written > 0 and problems == [None] * len(problems)
    with Ledger(db, create=False) as reader:
        assert reader.status().counts


def test_a_checkpoint_cut_short_by_a_kill_is_not_damage(db: Path, tmp_path: Path) -> None:
    """What SIGKILL during a checkpoint leaves: page 1 (the header with the new size) copied from the log,
    the pages after it not yet; the log still holds them all. SQLite reads them from it; no damage."""
    with Ledger(db) as ledger:
        ledger.observe_jobs([job_doc("j0", 1000.0)])
    with Ledger(db, background_checkpoints=True) as ledger:  # no checkpoint in these commits
        for n in range(1, 200):
            ledger.observe_jobs([job_doc(f"j{n}", 1000.0 + n)])
        crashed = tmp_path / "crashed"
        crashed.mkdir(mode=0o700)
        for name in (db.name, f"{db.name}-wal"):  # the files as a kill leaves them (-shm is rebuilt)
            shutil.copy2(db.parent / name, crashed / name)
    copy = crashed / db.name
    data, wal = copy.read_bytes(), Path(f"{copy}-wal").read_bytes()
    page = int.from_bytes(data[16:18], "big")
    frames = range(32, len(wal) - page + 1, 24 + page)
    newest_page_1 = max(offset for offset in frames if int.from_bytes(wal[offset:offset + 4], "big") == 1)
    with open(copy, "r+b") as file:  # the checkpoint's first write, and no more
        file.write(wal[newest_page_1 + 24:newest_page_1 + 24 + page])
    assert header_problem(copy.read_bytes()[:100], copy.stat().st_size) is not None  # alone, it looks truncated

    with Ledger(copy, create=False) as reopened:
        assert reopened.status().counts.get("pending") == 200


def test_a_ledger_truncated_for_real_is_refused_even_with_its_log_beside_it(db: Path) -> None:
    with Ledger(db) as ledger:
        ledger.observe_jobs([job_doc(f"j{n}", 1000.0 + n) for n in range(200)])
    data = db.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    db.write_bytes(data[:-page])
    Path(f"{db}-wal").write_bytes(b"\x00" * 32)
    with pytest.raises(LedgerDamagedError, match="its header says"):
        Ledger(db, create=False)
