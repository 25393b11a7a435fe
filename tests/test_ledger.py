"""The ledger against real SQLite files, real second processes and a real SIGKILL."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from materializer.layout import default_layout
from materializer.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerBusyError,
    LedgerDamagedError,
    LedgerError,
    LedgerOpenError,
    OutputFile,
    UnknownJobError,
)

from ledger_checks import check_integrity, cursor_of

T0 = 1_800_000_000.0  # the fake clock's start, Unix seconds


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return default_layout(tmp_path / "root").ledger


@pytest.fixture
def ledger(db: Path, clock: Clock) -> Iterator[Ledger]:
    with Ledger(db, clock=clock) as opened:
        yield opened


def job_doc(job_id: str, completed_at_ms: float, **extra: Any) -> dict[str, Any]:
    return {
        "jobId": job_id,
        "capability": "text_to_image",
        "profile": "best",
        "status": "succeeded",
        "request": {"prompt": f"prompt of {job_id}"},
        "output": {"images": [{"url": f"https://cdn.example/{job_id}.png", "content_type": "image/png"}]},
        "createdAt": completed_at_ms - 5_000,
        "completedAt": completed_at_ms,
        **extra,
    }


def output(job_id: str, index: int = 0, content: bytes = b"") -> OutputFile:
    return OutputFile(
        index=index,
        path=f"{job_id}_{index}.png",
        mime_type="image/png",
        width=64,
        height=32,
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )


def materialize(ledger: Ledger, job_id: str, files: int = 1) -> None:
    event = ledger.mark_materialized(job_id, [output(job_id, i) for i in range(files)], {"jobId": job_id})
    assert event is not None


def count_rows(db: Path, sql: str, *params: Any) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchone()[0]


# -- opening, schema, migration --------------------------------------------------


def test_absent_file_is_created_with_the_current_schema_in_wal_mode(db: Path) -> None:
    with Ledger(db) as ledger:
        assert ledger.status().schema_version == SCHEMA_VERSION
        assert cursor_of(ledger) is None
        assert ledger.last_seq() == 0
        assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit is on disk
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_new_ledger_is_private_and_its_folder_is_created(db: Path) -> None:
    with Ledger(db):
        pass
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_reopening_keeps_data_and_does_not_migrate_again(db: Path, clock: Clock) -> None:
    with Ledger(db, clock=clock) as ledger:
        ledger.observe_jobs([job_doc("job_a", 1_000)])
        ledger.ensure_cursor(500)
    with Ledger(db, clock=clock) as ledger:
        job = ledger.job("job_a")
        assert job is not None and job.status == "pending"
        assert cursor_of(ledger) == 500
        assert ledger.status().schema_version == SCHEMA_VERSION


#: A process that stops inside the ledger's creation, after writing to its temporary (as SIGKILL finds it).
STUCK_CREATING = """
import sys, threading
import materializer.ledger as ledger

def stuck(conn, path):
    conn.execute("CREATE TABLE half_made (x)")
    print("building", flush=True)
    threading.Event().wait()

ledger._migrate = stuck
ledger.Ledger(sys.argv[1])
"""


def test_what_a_process_killed_while_creating_the_ledger_left_goes_at_the_next_open(db: Path) -> None:
    def temporaries() -> list[str]:
        return sorted(path.name for path in db.parent.glob(".materializer.db.new-*"))

    child = subprocess.Popen([sys.executable, "-c", STUCK_CREATING, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "building"
        building = temporaries()
        assert len(building) >= 2  # the temporary and its -wal
        with Ledger(db):  # another process opens meanwhile: what is being built is not touched
            pass
        assert temporaries() == building
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    assert temporaries() == building  # the killed process left them
    with Ledger(db) as ledger:
        assert ledger.status().schema_version == SCHEMA_VERSION
    assert temporaries() == []


def test_missing_ledger_is_not_created_when_told_not_to(db: Path) -> None:
    with pytest.raises(LedgerOpenError, match="no ledger at"):
        Ledger(db, create=False)
    assert not db.exists()


def test_non_sqlite_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "materializer.db"
    content = b"this is not a database, it is someone's notes\n" * 200
    path.write_bytes(content)
    with pytest.raises(LedgerDamagedError, match="does not start with SQLite's header: it is garbled or not a"):
        Ledger(path)
    assert path.read_bytes() == content


def test_corrupt_ledger_is_refused_with_a_clear_error(db: Path, clock: Clock) -> None:
    with Ledger(db, clock=clock) as ledger:
        ledger.observe_jobs([job_doc(f"job_{i:04d}", i) for i in range(2_000)])
    page_size = count_rows(db, "PRAGMA page_size")
    with open(db, "r+b") as file:  # keep the header and schema page, scramble the rest
        file.seek(2 * page_size)
        file.write(bytes(range(256)) * (8 * page_size // 256))
    with pytest.raises(LedgerDamagedError, match="is damaged: (SQLite.s quick_check found|.*malformed)"):
        Ledger(db)


def test_someone_elses_sqlite_database_is_refused_and_left_intact(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
    with pytest.raises(LedgerDamagedError, match="not a materializer ledger"):
        Ledger(path)
    assert count_rows(path, "SELECT count(*) FROM notes WHERE text = 'keep me'") == 1


def test_ledger_from_a_newer_version_is_refused(db: Path) -> None:
    with Ledger(db):
        pass
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerOpenError, match="newer than this materializer"):
        Ledger(db)


def test_closed_ledger_raises_a_ledger_error(ledger: Ledger) -> None:
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.last_seq()


# -- observing jobs ----------------------------------------------------------------


def test_observe_is_idempotent_and_never_resets_finished_jobs(ledger: Ledger) -> None:
    docs = [job_doc("job_a", 1_000), job_doc("job_b", 2_000), job_doc("job_a", 1_000)]
    assert ledger.observe_jobs(docs) == ["job_a", "job_b"]
    assert ledger.observe_jobs(docs) == []
    assert ledger.record_failure("job_b", "timed out", T0 + 60, owner="me") == 1
    materialize(ledger, "job_a")
    refreshed = job_doc("job_a", 1_000, output={"images": [{"url": "https://cdn.example/new.png"}]})
    assert ledger.observe_jobs([refreshed, job_doc("job_b", 2_000), job_doc("job_c", 3_000)]) == ["job_c"]
    job_a, job_b = ledger.job("job_a"), ledger.job("job_b")
    assert job_a is not None and job_a.status == "materialized"
    assert job_a.doc == job_doc("job_a", 1_000)  # a finished job keeps the document it was made from
    assert job_b is not None and (job_b.status, job_b.attempts, job_b.last_error) == ("pending", 1, "timed out")
    assert len(ledger.outputs("job_a")) == 1


def test_observe_reads_no_further_than_id_and_completion_of_a_materialized_job(ledger: Ledger, db: Path) -> None:
    """A window lists the same finished jobs on every answer: their documents are not even serialised."""
    ledger.ensure_cursor(0)
    ledger.observe_jobs([job_doc("job_a", 1_000), job_doc("job_b", 2_000)])
    materialize(ledger, "job_a")
    statements: list[str] = []
    ledger._conn.set_trace_callback(statements.append)
    not_json = job_doc("job_a", 5_000, output={1, 2})  # would be refused for a job still to do
    assert ledger.observe_jobs([not_json, job_doc("job_b", 2_000)]) == []
    ledger._conn.set_trace_callback(None)
    job_a = ledger.job("job_a")
    assert job_a is not None and job_a.doc == job_doc("job_a", 1_000) and job_a.status == "materialized"
    assert not any("job_a" in statement for statement in statements if statement.startswith("UPDATE jobs"))
    with sqlite3.connect(db) as raw:  # its completion still counts toward the feed's high-water mark
        assert raw.execute("SELECT seen_max_ms FROM cursors WHERE feed = 'succeeded'").fetchone() == (5_000,)
    with pytest.raises(ValueError, match="'job_b' is not plain JSON"):
        ledger.observe_jobs([job_doc("job_b", 2_000, output={1, 2})])


def test_observe_refreshes_the_document_of_a_pending_job(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000)])
    refreshed = job_doc("job_a", 1_000, output={"images": [{"url": "https://cdn.example/fresh.png"}]})
    assert ledger.observe_jobs([refreshed]) == []
    job = ledger.job("job_a")
    assert job is not None and job.doc == refreshed


def test_observe_extracts_the_job_fields(ledger: Ledger, clock: Clock) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_234.5, profile="fast")])
    job = ledger.job("job_a")
    assert job is not None
    assert (job.completed_at_ms, job.created_at_ms, job.capability, job.profile, job.prompt) == (
        1_234.5,
        -3_765.5,
        "text_to_image",
        "fast",
        "prompt of job_a",
    )
    assert (job.status, job.attempts, job.next_attempt_at, job.first_seen_at) == ("pending", 0, 0, T0)


@pytest.mark.parametrize(
    ("bad_doc", "message"),
    [
        ({"completedAt": 1}, "no jobId string"),
        ({"jobId": "", "completedAt": 1}, "no jobId string"),
        ({"jobId": "job_x"}, "'job_x': completedAt must be a finite number"),
        ({"jobId": "job_x", "completedAt": True}, "completedAt must be a finite number"),
        ({"jobId": "job_x", "completedAt": float("nan")}, "completedAt must be a finite number"),
        ({"jobId": "job_x", "completedAt": 1, "output": {1, 2}}, "'job_x' is not plain JSON"),
        ({"jobId": "job_\ud800", "completedAt": 1}, "is not valid Unicode"),
        ("job_x", "must be an object"),
    ],
)
def test_observe_refuses_a_bad_document_before_writing_anything(ledger: Ledger, bad_doc: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ledger.observe_jobs([job_doc("job_good", 1_000), bad_doc])
    assert ledger.job("job_good") is None


def test_hostile_text_fields_are_stored_safely(ledger: Ledger) -> None:
    doc = job_doc("job_a", 1_000, capability=["not", "text"], request={"prompt": "cat \ud83d and \x00 nul"})
    ledger.observe_jobs([doc])
    job = ledger.job("job_a")
    assert job is not None
    assert (job.capability, job.prompt) == ("", "cat ? and \x00 nul")
    assert job.doc["request"]["prompt"] == "cat \ud83d and \x00 nul"  # the raw document survives intact


# -- retries, leases, quarantine ------------------------------------------------------


def test_due_jobs_come_oldest_first_and_respect_the_limit(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_c", 3_000), job_doc("job_a", 1_000), job_doc("job_b", 2_000)])
    assert [job.job_id for job in ledger.due_jobs(limit=2)] == ["job_a", "job_b"]
    assert [job.job_id for job in ledger.due_jobs(limit=10)] == ["job_a", "job_b", "job_c"]


def test_failures_are_counted_and_scheduled_with_backoff(ledger: Ledger, clock: Clock) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000), job_doc("job_b", 2_000)])
    assert ledger.try_claim("job_a", "daemon", lease_seconds=60)
    assert [job.job_id for job in ledger.due_jobs(10)] == ["job_b"]  # leased jobs are not due
    assert ledger.record_failure("job_a", "HTTP 503", retry_at=T0 + 30, owner="daemon") == 1
    job = ledger.job("job_a")
    assert job is not None
    assert (job.attempts, job.next_attempt_at, job.last_error, job.lease_owner) == (1, T0 + 30, "HTTP 503", None)
    materialize(ledger, "job_b")
    assert ledger.due_jobs(10) == []
    assert ledger.next_due_at() == T0 + 30
    clock.now = T0 + 30
    assert [job.job_id for job in ledger.due_jobs(10)] == ["job_a"]
    assert ledger.record_failure("job_a", "HTTP 503 again", retry_at=T0 + 90, owner="daemon") == 2
    assert ledger.next_due_at() == T0 + 90


def test_recording_a_failure_leaves_someone_elses_lease_alone(ledger: Ledger, clock: Clock) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000)])
    assert ledger.try_claim("job_a", "old-daemon", lease_seconds=10)
    clock.now = T0 + 11  # old-daemon's lease lapsed; a replay takes over
    assert ledger.try_claim("job_a", "replay", lease_seconds=10)
    assert ledger.record_failure("job_a", "late failure", retry_at=T0 + 20, owner="old-daemon") == 1
    job = ledger.job("job_a")
    assert job is not None and (job.lease_owner, job.lease_expires_at) == ("replay", T0 + 21)


def test_failure_of_a_finished_or_unknown_job(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000)])
    materialize(ledger, "job_a")
    assert ledger.record_failure("job_a", "late", retry_at=T0, owner="me") is None
    assert ledger.job("job_a").attempts == 0  # type: ignore[union-attr]
    with pytest.raises(UnknownJobError, match="job_nope"):
        ledger.record_failure("job_nope", "x", retry_at=T0, owner="me")
    with pytest.raises(ValueError, match="retry_at must be a finite number"):
        ledger.record_failure("job_a", "x", retry_at=float("inf"), owner="me")


def test_claims_are_exclusive_renewable_and_lapse(ledger: Ledger, clock: Clock) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000)])
    assert ledger.try_claim("job_a", "daemon", lease_seconds=30)
    assert not ledger.try_claim("job_a", "replay", lease_seconds=30)
    clock.now = T0 + 20
    assert ledger.try_claim("job_a", "daemon", lease_seconds=30)  # renewal, now until T0 + 50
    clock.now = T0 + 40
    assert not ledger.try_claim("job_a", "replay", lease_seconds=30)
    clock.now = T0 + 50
    assert ledger.try_claim("job_a", "replay", lease_seconds=30)
    materialize(ledger, "job_a")
    assert not ledger.try_claim("job_a", "replay", lease_seconds=30)  # finished jobs cannot be claimed
    assert not ledger.try_claim("job_unknown", "replay", lease_seconds=30)
    with pytest.raises(ValueError, match="lease_seconds must be positive"):
        ledger.try_claim("job_a", "daemon", lease_seconds=0)


def test_claim_due_leases_the_due_jobs_in_one_step_and_returns_them_leased(ledger: Ledger, clock: Clock) -> None:
    ledger.observe_jobs([job_doc(f"job_{n}", 1_000 * n) for n in range(1, 6)])
    assert ledger.try_claim("job_1", "replay", lease_seconds=30)  # leased by another: not due
    ledger.record_failure("job_2", "HTTP 503", retry_at=T0 + 60, owner="nobody")  # backing off: not due
    claimed = ledger.claim_due(2, "daemon", lease_seconds=30)
    assert [(job.job_id, job.lease_owner, job.lease_expires_at) for job in claimed] == [
        ("job_3", "daemon", T0 + 30), ("job_4", "daemon", T0 + 30)]
    assert claimed == [ledger.job("job_3"), ledger.job("job_4")]  # as stored, lease and all
    assert [job.job_id for job in ledger.due_jobs(10)] == ["job_5"]
    assert not ledger.try_claim("job_3", "replay", lease_seconds=30)
    assert [job.job_id for job in ledger.claim_due(10, "daemon", lease_seconds=30)] == ["job_5"]
    assert ledger.claim_due(10, "daemon", lease_seconds=30) == []
    clock.now = T0 + 30  # every daemon lease lapsed; job_1's too
    assert [job.job_id for job in ledger.claim_due(10, "other", lease_seconds=5)] == ["job_1", "job_3", "job_4",
                                                                                      "job_5"]
    with pytest.raises(ValueError, match="lease_seconds must be positive"):
        ledger.claim_due(1, "daemon", lease_seconds=0)
    with pytest.raises(ValueError, match="lease owner"):
        ledger.claim_due(1, "", lease_seconds=5)


def test_observe_and_claim_records_then_leases_what_is_due_in_one_transaction(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_old", 500)])  # pending from before, due
    new, leased = ledger.observe_and_claim([job_doc("job_b", 2_000), job_doc("job_a", 1_000)], 2, "daemon", 30)
    assert new == ["job_b", "job_a"]  # in the answer's order
    assert [(job.job_id, job.lease_owner) for job in leased] == [("job_old", "daemon"), ("job_a", "daemon")]
    assert [job.job_id for job in ledger.due_jobs(10)] == ["job_b"]  # no room was left for it
    new, leased = ledger.observe_and_claim([job_doc("job_a", 1_000)], 5, "daemon", 30)
    assert new == [] and [job.job_id for job in leased] == ["job_b"]
    with pytest.raises(ValueError, match="jobId"):
        ledger.observe_and_claim([job_doc("job_c", 3_000), {"completedAt": 1.0}], 5, "daemon", 30)
    assert ledger.job("job_c") is None  # nothing written by a refused answer, nothing leased
    assert ledger.observe_and_claim([], 5, "daemon", 30) == ([], [])


def test_claim_returns_the_job_as_leased_with_its_attempts(ledger: Ledger, clock: Clock) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000)])
    ledger.record_failure("job_a", "HTTP 503", retry_at=T0 + 600, owner="daemon")
    job = ledger.claim("job_a", "replay", lease_seconds=30)  # backoff does not block a claim
    assert job is not None and (job.attempts, job.lease_owner, job.lease_expires_at) == (1, "replay", T0 + 30)
    assert job == ledger.job("job_a")
    assert ledger.claim("job_a", "daemon", lease_seconds=30) is None
    assert ledger.claim("job_unknown", "daemon", lease_seconds=30) is None


def test_jobs_reads_many_jobs_at_once_as_job_reads_each(ledger: Ledger) -> None:
    ids = [f"job_{n}" for n in range(1200)]  # more than one chunk of SQL variables
    ledger.observe_jobs([job_doc(job_id, 1_000 + n) for n, job_id in enumerate(ids)])
    found = ledger.jobs([*ids, "job_unknown", "job_7"])
    assert sorted(found) == sorted(ids) and all(found[job_id] == ledger.job(job_id) for job_id in ("job_0", "job_1199"))
    assert ledger.jobs([]) == {}


def test_quarantine_records_the_reason_and_requeue_brings_it_back(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000), job_doc("job_b", 2_000)])
    ledger.record_failure("job_a", "HTTP 500", retry_at=T0, owner="daemon")
    assert ledger.try_claim("job_a", "daemon", lease_seconds=30)
    assert ledger.quarantine("job_a", "gave up after 2 attempts: HTTP 500")
    assert not ledger.quarantine("job_a", "again")
    job = ledger.job("job_a")
    assert job is not None
    assert (job.status, job.attempts, job.last_error, job.lease_owner) == (
        "quarantined",
        2,
        "gave up after 2 attempts: HTTP 500",
        None,
    )
    assert [job.job_id for job in ledger.due_jobs(10)] == ["job_b"]
    status = ledger.status()
    assert status.counts == {"pending": 1, "materialized": 0, "quarantined": 1}
    assert [(q.job_id, q.reason, q.attempts) for q in status.quarantined] == [
        ("job_a", "gave up after 2 attempts: HTTP 500", 2)
    ]
    assert ledger.requeue(["job_a", "job_b", "job_unknown"]) == ["job_a"]
    job = ledger.job("job_a")
    assert job is not None and (job.status, job.attempts, job.last_error) == ("pending", 0, None)
    with pytest.raises(UnknownJobError):
        ledger.quarantine("job_unknown", "x")


def test_a_quarantined_job_can_still_be_materialized_by_a_replay(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000)])
    ledger.quarantine("job_a", "unsafe")
    materialize(ledger, "job_a")
    assert ledger.job("job_a").status == "materialized"  # type: ignore[union-attr]
    assert check_integrity(ledger) == []


# -- exactly-once announcement -----------------------------------------------------------


def test_mark_materialized_records_files_and_announces_exactly_once(ledger: Ledger, clock: Clock) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000)])
    files = [output("job_a", 1, b"second"), output("job_a", 0, b"first")]
    payload = {"kind": "media", "jobId": "job_a", "asset": {"kind": "image", "filePaths": ["/x/job_a_0.png"]}}
    event = ledger.mark_materialized("job_a", files, payload)
    assert event is not None
    assert (event.seq, event.type, event.payload, event.created_at) == (1, "media.materialized", payload, T0)
    assert ledger.mark_materialized("job_a", files, payload) is None
    assert [f.index for f in ledger.outputs("job_a")] == [0, 1]
    assert ledger.outputs("job_a")[0] == output("job_a", 0, b"first")
    job = ledger.job("job_a")
    assert job is not None and (job.status, job.materialized_at) == ("materialized", T0)
    assert ledger.events_after(0, 10).events == [event]
    assert check_integrity(ledger) == []


def test_mark_materialized_refuses_bad_input_and_writes_nothing(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000)])
    good = output("job_a")
    bad_cases: list[tuple[list[OutputFile], str]] = [
        ([], "at least one output file"),
        ([good, good], "index appears twice"),
        ([OutputFile(0, "/etc/passwd", "image/png", 1, 1, 1, good.sha256)], "plain relative path"),
        ([OutputFile(0, "../job_a_0.png", "image/png", 1, 1, 1, good.sha256)], "plain relative path"),
        ([OutputFile(0, "job_a_0.png", "image/png", 0, 1, 1, good.sha256)], "width must be a positive integer"),
        ([OutputFile(0, "job_a_0.png", "image/png", 1, 1, -1, good.sha256)], "size_bytes"),
        ([OutputFile(0, "job_a_0.png", "image/png", 1, 1, 1, "ABC")], "sha256 must be 64 lowercase hex"),
        ([OutputFile(-1, "job_a_0.png", "image/png", 1, 1, 1, good.sha256)], "index must be a non-negative"),
    ]
    for files, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            ledger.mark_materialized("job_a", files, {"jobId": "job_a"})
    with pytest.raises(ValueError, match="not plain JSON"):
        ledger.mark_materialized("job_a", [good], {"when": object()})
    with pytest.raises(UnknownJobError, match="never observed"):
        ledger.mark_materialized("job_nope", [output("job_nope")], {})
    assert ledger.job("job_a").status == "pending"  # type: ignore[union-attr]
    assert ledger.last_seq() == 0


def test_an_output_path_cannot_belong_to_two_jobs(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000), job_doc("job_b", 2_000)])
    materialize(ledger, "job_a")
    clash = OutputFile(0, "job_a_0.png", "image/png", 1, 1, 0, output("x").sha256)
    with pytest.raises(LedgerError, match="UNIQUE constraint failed: outputs.path"):
        ledger.mark_materialized("job_b", [clash], {})
    assert ledger.job("job_b").status == "pending"  # type: ignore[union-attr]
    assert ledger.last_seq() == 1


def race(script: str, db: Path, racers: int) -> list[Any]:
    """Run ``script`` in ``racers`` processes (argv: the ledger, ``racer-<n>``), started together once each is
    ready; the JSON line each printed, in racer order (each must exit 0)."""
    processes = [subprocess.Popen([sys.executable, "-c", script, str(db), f"racer-{n}"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for n in range(racers)]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [json.loads(process.communicate(timeout=60)[0]) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert [process.returncode for process in processes] == [0] * racers
    return results


RACER = """
import hashlib, json, sys
from materializer.ledger import Ledger, OutputFile
db, owner = sys.argv[1], sys.argv[2]
with Ledger(db) as ledger:
    print("ready", flush=True)
    sys.stdin.readline()  # the starting gun: every racer has its connection open
    claimed = ledger.try_claim("job_claimed", owner, lease_seconds=60)
    files = [OutputFile(0, "job_raced_0.png", "image/png", 8, 8, 0, hashlib.sha256(b"").hexdigest())]
    event = ledger.mark_materialized("job_raced", files, {"by": owner})
    print(json.dumps({"claimed": claimed, "announced": event is not None}), flush=True)
"""


def test_processes_racing_for_a_job_claim_it_once_and_announce_it_once(db: Path) -> None:
    with Ledger(db) as ledger:
        ledger.observe_jobs([job_doc("job_claimed", 1_000), job_doc("job_raced", 2_000)])
    results = race(RACER, db, 4)
    assert sum(result["claimed"] for result in results) == 1
    assert sum(result["announced"] for result in results) == 1
    with Ledger(db) as ledger:
        page = ledger.events_after(0, 100)
        assert [(event.type, event.seq) for event in page.events] == [("media.materialized", 1)]
        assert check_integrity(ledger) == []


DUE_RACER = """
import json, sys
from materializer.ledger import Ledger
db, owner = sys.argv[1], sys.argv[2]
ledger = Ledger(db)
print("ready", flush=True)
sys.stdin.readline()  # the starting gun
claimed = []
while batch := ledger.claim_due(3, owner, lease_seconds=600):
    claimed += [job.job_id for job in batch]
print(json.dumps(claimed), flush=True)
"""


def test_processes_claiming_due_jobs_at_once_each_get_a_job_once(db: Path) -> None:
    ids = [f"job_{n:03}" for n in range(60)]
    with Ledger(db) as ledger:
        ledger.observe_jobs([job_doc(job_id, 1_000 + n) for n, job_id in enumerate(ids)])
    claimed = race(DUE_RACER, db, 4)
    assert sorted(job_id for batch in claimed for job_id in batch) == ids
    with Ledger(db) as ledger:
        owners = {job_id: job.lease_owner for job_id, job in ledger.jobs(ids).items()}
    assert all(owners[job_id] == f"racer-{n}" for n, batch in enumerate(claimed) for job_id in batch)


# -- a holder killed with SIGKILL ------------------------------------------------------------

HOLDER = """
import sys
from materializer.ledger import Ledger
db, now = sys.argv[1], float(sys.argv[2])
ledger = Ledger(db, clock=lambda: now)
print("claimed" if ledger.try_claim("job_a", "doomed-daemon", lease_seconds=30) else "refused", flush=True)
sys.stdin.readline()  # hold the lease until killed
"""

LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO kv (key, value, updated_at) VALUES ('half-written', '1', 0)")
print("locked", flush=True)
sys.stdin.readline()  # hold the write lock until killed
"""


@contextmanager
def child_until_sigkill(script: str, *args: str, expect: str) -> Iterator[None]:
    """Run a child until it prints ``expect``, let the body act meanwhile, then SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == expect + "\n"
        yield
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def test_lease_of_a_sigkilled_holder_lapses(db: Path, clock: Clock) -> None:
    with Ledger(db, clock=clock) as ledger:
        ledger.observe_jobs([job_doc("job_a", 1_000)])
        with child_until_sigkill(HOLDER, str(db), str(T0), expect="claimed"):
            assert not ledger.try_claim("job_a", "new-daemon", lease_seconds=30)
        clock.now = T0 + 10
        assert not ledger.try_claim("job_a", "new-daemon", lease_seconds=30)
        assert ledger.due_jobs(10) == []
        assert ledger.next_due_at() == T0 + 30
        clock.now = T0 + 30
        assert [job.job_id for job in ledger.due_jobs(10)] == ["job_a"]
        assert ledger.try_claim("job_a", "new-daemon", lease_seconds=30)
        materialize(ledger, "job_a")
        assert check_integrity(ledger) == []


def test_a_writer_killed_mid_transaction_neither_wedges_nor_leaks(db: Path, clock: Clock) -> None:
    with Ledger(db, clock=clock, busy_timeout=0) as ledger:
        ledger.observe_jobs([job_doc("job_a", 1_000)])
        with child_until_sigkill(LOCK_HOLDER, str(db), expect="locked"):
            with pytest.raises(LedgerBusyError, match="busy"):
                ledger.set_state("daemon", {"pid": 1})
            assert ledger.job("job_a") is not None  # readers are not blocked by a writer (WAL)
        ledger.set_state("daemon", {"pid": 2})
        assert ledger.get_state("daemon") == {"pid": 2}
        assert ledger.get_state("half-written") is None
        assert check_integrity(ledger) == []


# -- cursor ------------------------------------------------------------------------------------


def test_cursor_is_set_once_and_survives_a_restart(db: Path, clock: Clock) -> None:
    with Ledger(db, clock=clock) as ledger:
        assert cursor_of(ledger) is None
        with pytest.raises(LedgerError, match="never set"):
            ledger.advance_cursor(0, 10)
        assert ledger.ensure_cursor(5_000) == 5_000
        assert ledger.ensure_cursor(9_000) == 5_000
    with Ledger(db, clock=clock) as ledger:
        assert cursor_of(ledger) == 5_000
        assert cursor_of(ledger, "failed") is None


def test_cursor_never_passes_an_unfinished_job(ledger: Ledger) -> None:
    ledger.ensure_cursor(0)
    ledger.observe_jobs([job_doc("job_a", 10_000), job_doc("job_b", 20_000), job_doc("job_c", 30_000)])
    assert ledger.advance_cursor(0, 30_000, overlap_ms=2_000) == 8_000  # all pending: stops at the oldest
    materialize(ledger, "job_a")
    materialize(ledger, "job_c")
    assert ledger.advance_cursor(0, 30_000, overlap_ms=2_000) == 18_000  # job_b still pending
    ledger.quarantine("job_b", "unsafe jobId")
    assert ledger.advance_cursor(0, 30_000, overlap_ms=2_000) == 28_000  # quarantined counts as finished
    assert cursor_of(ledger) == 28_000


def test_cursor_never_moves_backwards(ledger: Ledger) -> None:
    ledger.ensure_cursor(0)
    ledger.observe_jobs([job_doc("job_a", 10_000)])
    materialize(ledger, "job_a")
    assert ledger.advance_cursor(0, 10_000, overlap_ms=2_000) == 8_000
    ledger.observe_jobs([job_doc("job_old", 1_000)])  # a replay found an old job, still pending
    assert ledger.advance_cursor(0, 10_000, overlap_ms=2_000) == 8_000
    assert ledger.advance_cursor(0, 10_000, overlap_ms=9_000) == 8_000  # a bigger overlap does not rewind
    ledger.requeue(["job_old"])
    assert cursor_of(ledger) == 8_000


def test_cursor_never_skips_an_uncovered_range_nor_passes_what_was_observed(ledger: Ledger) -> None:
    ledger.ensure_cursor(1_000)
    ledger.observe_jobs([job_doc("job_new", 50_000)])
    materialize(ledger, "job_new")
    # A truncated answer vouches only for [its oldest job, ...]: the gap after the cursor stays open.
    assert ledger.advance_cursor(40_000, 50_000, overlap_ms=0) == 1_000
    # A caller that claims more than was ever observed is held to what the ledger saw.
    assert ledger.advance_cursor(1_000, 90_000, overlap_ms=0) == 50_000
    with pytest.raises(ValueError, match="overlap_ms must not be negative"):
        ledger.advance_cursor(0, 1, overlap_ms=-1)


job_fates = st.lists(
    st.tuples(st.integers(0, 100_000), st.sampled_from(["pending", "materialized", "quarantined"])),
    min_size=1,
    max_size=12,
)
coverage = st.tuples(st.integers(-5_000, 100_000), st.integers(0, 120_000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.integers(-5_000, 50_000),
    rounds=st.lists(st.tuples(job_fates, coverage), min_size=1, max_size=4),
    overlap=st.integers(0, 3_000),
)
def test_cursor_safety_holds_for_any_history(
    initial: int, rounds: list[tuple[list[tuple[int, str]], tuple[int, int]]], overlap: int
) -> None:
    """Whatever is observed and finished, an advance never skips an unfinished or unvouched-for job."""
    with tempfile.TemporaryDirectory() as folder, Ledger(Path(folder) / "ledger.db", clock=Clock()) as ledger:
        cursor = ledger.ensure_cursor(initial)
        observed: dict[str, int] = {}
        for round_number, (fates, (covered_from, covered_until)) in enumerate(rounds):
            docs = [job_doc(f"job_{round_number}_{n}", at) for n, (at, _) in enumerate(fates)]
            ledger.observe_jobs(docs)
            observed.update({doc["jobId"]: doc["completedAt"] for doc in docs})
            for doc, (_, fate) in zip(docs, fates, strict=True):
                if fate == "materialized":
                    materialize(ledger, doc["jobId"])
                elif fate == "quarantined":
                    ledger.quarantine(doc["jobId"], "given up")
            pending_ahead = [
                at
                for job_id, at in observed.items()
                if at >= cursor and ledger.job(job_id).status == "pending"  # type: ignore[union-attr]
            ]
            advanced = ledger.advance_cursor(covered_from, covered_until, overlap_ms=overlap)
            assert advanced >= cursor  # never backwards
            if advanced > cursor:
                assert covered_from <= cursor  # only a range vouched for from the cursor on
                assert advanced <= min(covered_until, max(observed.values())) - overlap  # nothing unseen passed
                assert all(advanced <= at - overlap for at in pending_ahead)  # no unfinished job passed
            cursor = advanced
            assert cursor_of(ledger) == cursor


def test_cursor_waits_for_a_first_observation(ledger: Ledger) -> None:
    ledger.ensure_cursor(1_000)
    assert ledger.advance_cursor(1_000, 5_000) == 1_000


def test_failed_feed_has_its_own_cursor(ledger: Ledger) -> None:
    ledger.ensure_cursor(0, feed="failed")
    ledger.observe_jobs([job_doc("job_pending", 1_000)])  # pending succeeded jobs do not hold the failed feed
    ledger.note_failed_job(job_doc("job_failed", 20_000, status="failed"), {"jobId": "job_failed"})
    assert ledger.advance_cursor(0, 20_000, feed="failed", overlap_ms=2_000) == 18_000
    assert cursor_of(ledger) is None
    with pytest.raises(ValueError, match="unknown feed"):
        ledger.ensure_cursor(0, feed="running")  # type: ignore[arg-type]


# -- events --------------------------------------------------------------------------------------


def test_failed_jobs_are_announced_once(ledger: Ledger) -> None:
    doc = {"jobId": "job_f", "status": "failed", "error": {"message": "provider refused"}}
    event = ledger.note_failed_job(doc, {"jobId": "job_f", "message": "The provider refused this prompt."})
    assert event is not None and (event.type, event.payload["message"]) == (
        "media.failed",
        "The provider refused this prompt.",
    )
    assert ledger.note_failed_job(doc, {"jobId": "job_f", "message": "again"}) is None
    assert [e.type for e in ledger.events_after(0, 10).events] == ["media.failed"]
    assert ledger.status().failed_jobs_noted == 1
    assert check_integrity(ledger) == []


def test_append_event_accepts_only_known_types_and_never_announces_a_job(ledger: Ledger) -> None:
    event = ledger.append_event("materializer.state", {"state": "connected"})
    assert (event.seq, event.type, event.payload) == (1, "materializer.state", {"state": "connected"})
    with pytest.raises(ValueError, match="unknown event type"):
        ledger.append_event("media.exploded", {})
    with pytest.raises(ValueError, match="only by mark_materialized"):
        ledger.append_event("media.materialized", {"jobId": "job_a"})
    with pytest.raises(ValueError, match="payload must be an object"):
        ledger.append_event("materializer.state", ["connected"])  # type: ignore[arg-type]
    assert ledger.last_seq() == 1


def test_events_after_pages_in_order(ledger: Ledger) -> None:
    for n in range(7):
        ledger.append_event("materializer.state", {"n": n})
    first = ledger.events_after(0, 3)
    assert [e.seq for e in first.events] == [1, 2, 3]
    assert (first.first_seq, first.last_seq, first.gap) == (1, 7, False)
    second = ledger.events_after(first.events[-1].seq, 3)
    assert [e.payload["n"] for e in second.events] == [3, 4, 5]
    assert [e.seq for e in ledger.events_after(6, 3).events] == [7]
    assert ledger.events_after(7, 3).events == []
    assert ledger.events_after(99, 3).last_seq == 7


def test_pruning_keeps_the_newest_events_and_reveals_the_gap(db: Path, clock: Clock) -> None:
    with Ledger(db, clock=clock, event_cap=5) as ledger:
        ledger.observe_jobs([job_doc(f"job_{n}", n) for n in range(4)])
        for n in range(4):
            materialize(ledger, f"job_{n}")
        for n in range(8):
            ledger.append_event("materializer.state", {"n": n})
        page = ledger.events_after(0, 100)
        assert [e.seq for e in page.events] == [8, 9, 10, 11, 12]
        assert (page.first_seq, page.last_seq, page.gap) == (8, 12, True)
        assert not ledger.events_after(7, 100).gap
        assert check_integrity(ledger) == []  # pruned announcements are not "missing"
    with Ledger(db, clock=clock, event_cap=5) as ledger:
        assert ledger.append_event("materializer.state", {"n": 8}).seq == 13  # seqs are never reused
        assert [e.seq for e in ledger.events_after(0, 100).events] == [9, 10, 11, 12, 13]
    assert count_rows(db, "SELECT count(*) FROM events") == 5


# -- gallery, status, state -------------------------------------------------------------------------


def test_gallery_lists_materialized_jobs_newest_first_with_their_files(ledger: Ledger, clock: Clock) -> None:
    ledger.observe_jobs(
        [job_doc("job_a", 1_000), job_doc("job_b", 3_000), job_doc("job_c", 2_000), job_doc("job_d", 4_000)]
    )
    clock.now = T0 + 1
    materialize(ledger, "job_b", files=3)
    clock.now = T0 + 2
    materialize(ledger, "job_a")
    materialize(ledger, "job_c", files=2)
    ledger.quarantine("job_d", "no images")
    entries = ledger.gallery_entries(limit=10)
    assert [e.job_id for e in entries] == ["job_b", "job_c", "job_a"]
    assert [[f.path for f in e.files] for e in entries] == [
        ["job_b_0.png", "job_b_1.png", "job_b_2.png"],
        ["job_c_0.png", "job_c_1.png"],
        ["job_a_0.png"],
    ]
    assert (entries[0].prompt, entries[0].completed_at_ms, entries[0].materialized_at) == (
        "prompt of job_b",
        3_000,
        T0 + 1,
    )
    assert [e.job_id for e in ledger.gallery_entries(limit=2)] == ["job_b", "job_c"]
    assert ledger.gallery_entries(limit=0) == []


def test_gallery_changes_reads_only_what_a_reader_does_not_hold(ledger: Ledger, clock: Clock) -> None:
    """Heads of the newest jobs every time; entries only for heads the reader does not know, in one snapshot."""
    ledger.observe_jobs([job_doc("job_a", 1_000), job_doc("job_b", 2_000), job_doc("job_c", 3_000)])
    materialize(ledger, "job_a")
    materialize(ledger, "job_b", files=2)
    heads, read = ledger.gallery_changes(10, ())
    assert [head.job_id for head in heads] == ["job_b", "job_a"]
    assert set(read) == set(heads) and [f.path for f in read[heads[0]].files] == ["job_b_0.png", "job_b_1.png"]
    assert [read[head] for head in heads] == ledger.gallery_entries(10)

    clock.now = T0 + 5
    materialize(ledger, "job_c")
    newer, read = ledger.gallery_changes(10, frozenset(heads))
    assert [head.job_id for head in newer] == ["job_c", "job_b", "job_a"]
    assert [head.job_id for head in read] == ["job_c"]  # the two known ones are not read again
    assert ledger.gallery_changes(2, frozenset(newer))[0] == newer[:2]

    # Files that vanished and came back: materialized again, a new head, read again.
    ledger.mark_vanished({"job_b": "files vanished"})
    assert [head.job_id for head in ledger.gallery_changes(10, frozenset(newer))[0]] == ["job_c", "job_a"]
    clock.now = T0 + 9
    assert ledger.mark_materialized("job_b", [output("job_b")], {"jobId": "job_b"}) is None  # announced before
    again, read = ledger.gallery_changes(10, frozenset(newer))
    assert [head.job_id for head in read] == ["job_b"] and again[1] == (heads[0].job_id, T0 + 9)
    assert [f.path for f in read[again[1]].files] == ["job_b_0.png"]


def test_status_reports_counts_cursor_last_event_and_state(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000), job_doc("job_b", 2_000), job_doc("job_c", 3_000)])
    ledger.ensure_cursor(500)
    materialize(ledger, "job_a")
    ledger.quarantine("job_b", "HTTP 404")
    ledger.set_state("connection", {"state": "connected"})
    last = ledger.append_event("materializer.state", {"state": "connected"})
    status = ledger.status()
    assert status.counts == {"pending": 1, "materialized": 1, "quarantined": 1}
    assert status.backlog == 1
    assert [(q.job_id, q.reason) for q in status.quarantined] == [("job_b", "HTTP 404")]
    assert status.cursors == {"failed": None, "succeeded": 500}
    assert status.last_event == last
    assert status.state == {"connection": {"state": "connected"}}


def test_state_values_round_trip_and_must_be_json(ledger: Ledger) -> None:
    assert ledger.get_state("daemon", default="absent") == "absent"
    ledger.set_state("daemon", {"pid": 42, "heartbeat": T0})
    ledger.set_state("daemon", {"pid": 43, "heartbeat": T0 + 5})
    assert ledger.get_state("daemon") == {"pid": 43, "heartbeat": T0 + 5}
    with pytest.raises(ValueError, match="not plain JSON"):
        ledger.set_state("daemon", {"heartbeat": float("nan")})


# -- threads ----------------------------------------------------------------------------------------


def test_one_ledger_can_be_shared_by_threads(ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc(f"job_{n:03d}", n) for n in range(64)])
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(offset: int) -> None:
        try:
            barrier.wait()
            for n in range(offset, 64, 8):
                job_id = f"job_{n:03d}"
                assert ledger.try_claim(job_id, f"thread-{offset}", lease_seconds=30)
                materialize(ledger, job_id)
                ledger.append_event("materializer.state", {"n": n})
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert ledger.status().counts["materialized"] == 64
    assert ledger.last_seq() == 128
    assert check_integrity(ledger) == []


# -- integrity check ------------------------------------------------------------------------------------


def test_integrity_check_finds_broken_invariants(db: Path, ledger: Ledger) -> None:
    ledger.observe_jobs([job_doc("job_a", 1_000), job_doc("job_b", 2_000), job_doc("job_c", 3_000)])
    materialize(ledger, "job_a")
    materialize(ledger, "job_b")
    assert check_integrity(ledger) == []
    with sqlite3.connect(db) as raw:  # what a buggy writer could leave behind
        raw.execute("DELETE FROM outputs WHERE job_id = 'job_a'")
        raw.execute(
            "INSERT INTO outputs VALUES ('job_c', 0, 'job_c_0.png', 'image/png', 1, 1, 0, ?)", (output("x").sha256,)
        )
        raw.execute("DELETE FROM events WHERE job_id = 'job_b'")
        raw.execute("UPDATE jobs SET lease_owner = 'ghost' WHERE job_id = 'job_b'")
    assert sorted(check_integrity(ledger)) == [
        "finished job 'job_b' still holds a lease",
        "job 'job_c' has output files but is not materialized",
        "materialized job 'job_a' has no output files",
        "materialized job 'job_b' was never announced",
    ]


def test_integrity_check_verifies_files_on_disk(tmp_path: Path, ledger: Ledger) -> None:
    outputs_dir = tmp_path / "outputs"
    outputs_dir.mkdir()
    ledger.observe_jobs([job_doc("job_a", 1_000), job_doc("job_b", 2_000), job_doc("job_c", 3_000)])
    for job_id in ("job_a", "job_b", "job_c"):
        content = f"pixels of {job_id}".encode()
        (outputs_dir / f"{job_id}_0.png").write_bytes(content)
        assert ledger.mark_materialized(job_id, [output(job_id, 0, content)], {}) is not None
    assert check_integrity(ledger, outputs_dir) == []
    (outputs_dir / "job_a_0.png").write_bytes(b"pixels of job_X")  # same size, different bytes
    (outputs_dir / "job_b_0.png").unlink()
    (outputs_dir / "job_c_0.png").unlink()
    (outputs_dir / "job_c_0.png").symlink_to(outputs_dir / "job_a_0.png")
    problems = check_integrity(ledger, outputs_dir)
    assert len(problems) == 3
    assert "job 'job_a'" in problems[0] and "does not match its recorded SHA-256" in problems[0]
    assert "job 'job_b'" in problems[1] and "is missing" in problems[1]
    assert "job 'job_c'" in problems[2] and "is not a regular file" in problems[2]


# -- scale ---------------------------------------------------------------------------------------------------


def build_large_ledger(db: Path, clock: Clock, jobs: int) -> Ledger:
    """A ledger holding ``jobs`` jobs (a few pending, a few quarantined, the rest materialized).

    Filled with executemany on a raw connection: the per-call API would spend
    its time on one fsync per job, which is not what this measures.
    """
    Ledger(db, clock=clock).close()
    statuses = {7: "pending", 8: "quarantined"}
    rows = [(f"job_{n:07d}", float(n), statuses.get(n % 1000, "materialized")) for n in range(jobs)]
    with sqlite3.connect(db) as raw:
        raw.executemany(
            "INSERT INTO jobs (job_id, completed_at_ms, capability, profile, status, first_seen_at, doc)"
            " VALUES (?, ?, 'text_to_image', 'best', ?, 0, '{}')",
            rows,
        )
        raw.executemany(
            "INSERT INTO outputs VALUES (?, 0, ? || '_0.png', 'image/png', 8, 8, 0, ?)",
            [(job_id, job_id, "0" * 64) for job_id, _, status in rows if status == "materialized"],
        )
        raw.execute("UPDATE cursors SET seen_max_ms = ? WHERE feed = 'succeeded'", (float(jobs - 1),))
        raw.execute("ANALYZE")
    return Ledger(db, clock=clock)


def test_hot_queries_use_indexes_on_a_large_ledger(db: Path, clock: Clock) -> None:
    with build_large_ledger(db, clock, jobs=100_000) as ledger:
        statements: list[str] = []
        ledger._conn.set_trace_callback(statements.append)  # see exactly what the public calls run
        gallery = ledger.gallery_entries(limit=1000)
        due = ledger.due_jobs(limit=50)
        ledger.ensure_cursor(-10_000)
        ledger.advance_cursor(-10_000, 99_999)
        ledger.events_after(0, 100)
        ledger._conn.set_trace_callback(None)

        assert len(gallery) == 1000 and gallery[0].job_id == "job_0099999"
        assert [f.path for f in gallery[0].files] == ["job_0099999_0.png"]
        assert [job.job_id for job in due[:2]] == ["job_0000007", "job_0001007"]
        assert cursor_of(ledger) == 7 - 2_000  # held back by the oldest pending job

        queries = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        assert any("status = 'materialized'" in q for q in queries)
        assert any("status = 'pending'" in q for q in queries)
        with sqlite3.connect(db) as probe:
            for query in queries:
                plan = [row[3] for row in probe.execute("EXPLAIN QUERY PLAN " + query)]
                for step in plan:
                    assert not step.startswith(("SCAN jobs", "SCAN outputs", "SCAN events")), (query, plan)
                    assert "TEMP B-TREE" not in step, (query, plan)


def test_release_claims_by_prefix_frees_only_matching_owners(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.observe_jobs([{"jobId": f"job_{i}", "completedAt": 1000.0 + i, "status": "succeeded",
                              "capability": "icon", "profile": "default"} for i in range(3)])
        assert ledger.try_claim("job_0", "daemon:1:a", 300)
        assert ledger.try_claim("job_1", "replay:2:b", 300)
        assert ledger.release_claims_by_prefix("daemon:") == 1
        assert ledger.try_claim("job_0", "daemon:3:c", 300)
        assert not ledger.try_claim("job_1", "daemon:3:c", 300)


def test_live_leases_counts_unexpired_claims(tmp_path: Path) -> None:
    now = [1000.0]
    with Ledger(tmp_path / "l.db", clock=lambda: now[0]) as ledger:
        ledger.observe_jobs([{"jobId": f"job_{i}", "completedAt": 1000.0 + i, "status": "succeeded",
                              "capability": "icon", "profile": "default"} for i in range(2)])
        assert ledger.live_leases() == 0
        ledger.try_claim("job_0", "replay:1", 10)
        assert ledger.live_leases() == 1
        now[0] += 11
        assert ledger.live_leases() == 0


# -- time: cursors placed by the server's clock, schedules pulled back after a clock step ---------------------


def test_a_cursor_is_placed_at_start_back_or_forth_and_read_back(ledger: Ledger) -> None:
    assert ledger.cursor() is None and ledger.cursor("failed") is None
    assert ledger.place_cursor(5_000.0) == 5_000.0
    assert ledger.cursor() == 5_000.0 and ledger.cursor("failed") is None
    assert ledger.place_cursor(1_000.0) == 1_000.0  # pulled back (a cursor dated after the server's now)
    assert ledger.cursor() == 1_000.0
    with pytest.raises(ValueError, match="finite"):
        ledger.place_cursor(float("inf"))


def test_retry_times_and_leases_later_than_any_wait_are_pulled_back(ledger: Ledger, clock: Clock) -> None:
    """What a clock stepped back a day leaves behind: a retry and a lease a day ahead of the clock."""
    ledger.observe_jobs([job_doc("stepped", 1.0), job_doc("normal", 2.0)])
    assert ledger.try_claim("stepped", "daemon:1", 86_400 + 60)
    ledger.record_failure("stepped", "503", clock.now + 86_400, owner="daemon:1")
    assert ledger.try_claim("stepped", "replay:2", 86_400)  # a lease a day long, as a stepped clock leaves it
    ledger.record_failure("normal", "503", clock.now + 30, owner="daemon:1")
    assert ledger.clamp_schedule(clock.now + 900, clock.now + 120) == 2
    assert ledger.next_due_at() == clock.now + 30  # "normal" keeps its own, shorter wait
    stepped = ledger.job("stepped")
    assert stepped is not None and stepped.next_attempt_at == clock.now + 900
    clock.now += 900
    assert [job.job_id for job in ledger.due_jobs(10)] == ["stepped", "normal"]  # the lease lapsed with it
    assert ledger.clamp_schedule(clock.now + 900, clock.now + 120) == 0


def test_a_document_too_large_to_keep_is_quarantined_with_its_reason_and_not_stored(ledger: Ledger) -> None:
    assert ledger.quarantine_unkept("huge", 7.0, "job document is 20,000,000 bytes") is True
    job = ledger.job("huge")
    assert job is not None and job.status == "quarantined" and job.last_error == "job document is 20,000,000 bytes"
    assert job.doc == {"jobId": "huge", "completedAt": 7.0}
    assert ledger.quarantine_unkept("huge", 7.0, "again") is False  # already given up
    ledger.observe_jobs([job_doc("pending", 8.0)])
    assert ledger.quarantine_unkept("pending", 8.0, "grew too large") is True
    assert check_integrity(ledger) == []
