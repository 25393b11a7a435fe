"""The materializer's durable state: one SQLite file shared by every process.

``<root>/state/media/materializer.db`` holds the jobs seen, the files committed
for each, the sidebar event log, the subscription cursors and a little
key/value state. The daemon, ``materializer replay`` (possibly while the daemon
runs) and ``materializer status`` all open it.

Durability. The file is in WAL mode with ``synchronous=FULL``: every commit
fsyncs the WAL before it returns. ``NORMAL`` would keep the file consistent but
may roll back the last commits on power loss, and what this ledger commits is
acted on at once outside it: a ``media.materialized`` event is pushed to the
sidebar with its ``seq`` right after the commit. A rolled-back commit would
hand that ``seq`` out again for a different event (a client resuming with
``since`` would skip it) and announce the job a second time. Commits are few
(one per job or state change), so the extra fsync costs nothing that matters.
Output files are fsynced by the pipeline *before* :meth:`Ledger.mark_materialized`,
so the ledger never claims a job whose files are not durably on disk.

Processes. Every read-modify-write runs in ``BEGIN IMMEDIATE`` (the write lock is
taken up front, so concurrent writers queue on ``busy_timeout`` instead of
failing with a stale snapshot) and transactions stay short. Announcing a job is
exactly-once by construction: :meth:`Ledger.mark_materialized` flips the job to
``materialized`` and appends its event in one transaction, and does nothing if
the job is already materialized; a unique index backs this up. Leases
(:meth:`Ledger.try_claim`) keep the daemon and a replay from working on the same
job at once; a lease held by a killed process simply expires.

Threads. A :class:`Ledger` owns one connection and serialises calls on a lock,
so any thread may use it. The daemon and ``replay`` make their ledger calls from one
dedicated thread (:class:`materializer.ledger_thread.LedgerThread`): calls then run in
order, a slow fsync never ties up the event loop or the default thread pool, and calls
that queue up meanwhile commit together (:meth:`Ledger.group`: one fsync for all),
and the write-ahead log is checkpointed from another thread, on a connection of its
own (``background_checkpoints``, :class:`materializer.ledger_thread.Checkpointer`).
Every call is short (index lookups and small writes).

Secrets. Everything stored here may be read by ``status``, sent to sidebar
clients or written to the gallery, so what comes from a server passes through
:func:`materializer.redaction.redact` on the way in: event payloads, state, reasons,
the prompt and other columns the gallery shows, and the documents of finished
jobs. A finished job's document is also kept without the query strings of its
URLs (``X-Amz-Signature``, ``X-Amz-Credential`` and the like): nothing reads
it again to download (``replay`` lists jobs afresh from the backend), and a
signed URL must not outlive its use. Only a pending job's document is kept as
the server sent it: it is what the download needs.

Units. Times taken from job documents keep Stella's Unix milliseconds
(``*_ms``); times the ledger keeps itself (attempt schedules, leases, event
and materialization times) are Unix seconds from the ledger's clock.
"""

# No `from __future__ import annotations` here: with it, the ten record NamedTuples get string annotations, and
# typing compiles each one (a ForwardRef) when the class is made, milliseconds of every start
# (`materializer status` imports this module).

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple, Self

from materializer.finite import finite_number
from materializer.layout import Finding, UntrustedPath, check_file, file_identity, open_nofollow
from materializer.redaction import redact, redact_value

__all__ = [
    "DEFAULT_CURSOR_OVERLAP_MS",
    "DEFAULT_EVENT_CAP",
    "FALLBACK_CHECKPOINT_PAGES",
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "Event",
    "EventPage",
    "FailedEntry",
    "Feed",
    "GalleryEntry",
    "GalleryHead",
    "Job",
    "JobStatus",
    "Ledger",
    "LedgerBusyError",
    "LedgerDamagedError",
    "LedgerError",
    "LedgerOpenError",
    "LedgerStatus",
    "OutputFile",
    "QuarantinedJob",
    "UNDECODABLE_DOCUMENT",
    "UnknownJobError",
]


def _warn(message: str, *args: object) -> None:
    """Log a warning; :mod:`logging` (9 ms) is imported at the first one, as ``status`` never logs."""
    import logging

    logging.getLogger(__name__).warning(message, *args)


DEFAULT_EVENT_CAP = 100_000
#: With background checkpoints, the write-ahead log's length (pages) at which a commit checkpoints it
#: itself all the same (SQLite's default is 1,000): only if the background thread falls far behind.
FALLBACK_CHECKPOINT_PAGES = 20_000
DEFAULT_CURSOR_OVERLAP_MS = 2_000.0
EVENT_TYPES = frozenset({"media.materialized", "media.failed", "materializer.state"})

JobStatus = Literal["pending", "materialized", "quarantined"]
Feed = Literal["succeeded", "failed"]

# "STML" in ASCII: marks the file as a materializer ledger, so opening some
# other SQLite database by mistake is refused instead of being written into.
_APPLICATION_ID = 0x53544D4C
_FEEDS: tuple[Feed, ...] = ("succeeded", "failed")
_STATUSES: tuple[JobStatus, ...] = ("pending", "materialized", "quarantined")
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
#: The primary result codes SQLite gives for a file whose bytes are damaged (not for one it cannot open).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
#: The first 16 bytes of every SQLite 3 database file (the file-format documentation's "magic header").
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: The smallest valid database: one page of the smallest size SQLite allows.
_MIN_DATABASE_BYTES = 512
#: The start of the reason a job is quarantined with when its stored document no longer decodes.
UNDECODABLE_DOCUMENT = "stored document does not decode"
# Keeps every `IN (...)` list well under SQLite's bound-parameter limit.
_CHUNK = 500


class LedgerError(Exception):
    """The ledger could not do what was asked; the message says why."""


class LedgerOpenError(LedgerError):
    """The file is missing, not SQLite, corrupt, someone else's database, or from a newer version."""


class LedgerDamagedError(LedgerOpenError):
    """The file at the ledger's path is there but its bytes are damaged (empty, truncated, garbled, foreign).

    Never replaced silently: ``materializer repair`` moves it aside and rebuilds the ledger.
    """


class LedgerBusyError(LedgerError):
    """Another process held the write lock for longer than ``busy_timeout``; try again later."""


class UnknownJobError(LedgerError):
    """The job was never observed by this ledger."""


# The records are NamedTuples, not dataclasses: `materializer status` imports this module and
# materializer.layout, and their ten dataclasses with the dataclasses module took 18 ms of its start.
class Job(NamedTuple):
    """A succeeded job as the ledger tracks it."""

    job_id: str
    completed_at_ms: float
    capability: str
    profile: str
    prompt: str | None
    created_at_ms: float | None
    status: JobStatus
    attempts: int
    next_attempt_at: float
    last_error: str | None
    first_seen_at: float
    materialized_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    doc: dict[str, Any]


class OutputFile(NamedTuple):
    """One committed output of a job; ``path`` is relative to the outputs folder."""

    index: int  # type: ignore[assignment]  # a field, not tuple.index()
    path: str
    mime_type: str
    width: int | None
    height: int | None
    size_bytes: int
    sha256: str


class Event(NamedTuple):
    """One entry of the sidebar event log."""

    seq: int
    type: str
    payload: dict[str, Any]
    created_at: float
    unreadable: str | None = None
    """Why the stored payload could not be read (then ``payload`` is empty): sent as a notice, not as the event."""


class EventPage(NamedTuple):
    """Events after ``after_seq``, with the log's bounds to detect pruned ranges."""

    after_seq: int
    events: list[Event]
    first_seq: int | None
    """The oldest event still kept (``None`` if the log is empty)."""
    last_seq: int
    """The newest ``seq`` ever handed out (0 if none)."""

    @property
    def gap(self) -> bool:
        """True when events the client has not seen were pruned before it asked."""
        return self.first_seq is not None and self.after_seq + 1 < self.first_seq


class GalleryHead(NamedTuple):
    """A materialized job as the gallery tells its versions apart: materializing it again changes the time."""

    job_id: str
    materialized_at: float


class GalleryEntry(NamedTuple):
    """A materialized job with its files, for the gallery manifest."""

    job_id: str
    capability: str
    profile: str
    prompt: str | None
    completed_at_ms: float
    materialized_at: float
    files: list[OutputFile]


class FailedEntry(NamedTuple):
    """A job that failed upstream (``failed`` or ``unknown``), as noted with its ``media.failed`` event."""

    job_id: str
    completed_at_ms: float | None
    noted_at: float
    event_seq: int
    doc: dict[str, Any]


class QuarantinedJob(NamedTuple):
    """A job given up on, with the reason."""

    job_id: str
    reason: str | None
    attempts: int
    completed_at_ms: float


class LedgerStatus(NamedTuple):
    """What ``materializer status`` shows, read in one consistent snapshot."""

    counts: dict[str, int]
    failed_jobs_noted: int
    quarantined: list[QuarantinedJob]
    """Newest first, at most the limit asked for; ``counts["quarantined"]`` has the total."""
    cursors: dict[str, float | None]
    last_event: Event | None
    state: dict[str, Any]
    schema_version: int

    @property
    def backlog(self) -> int:
        """Jobs seen but not yet materialized nor given up on."""
        return self.counts["pending"]


# -- schema ----------------------------------------------------------------------

_SCHEMA_V1 = """
CREATE TABLE jobs (
    job_id           TEXT PRIMARY KEY NOT NULL,
    completed_at_ms  REAL NOT NULL,
    capability       TEXT NOT NULL,
    profile          TEXT NOT NULL,
    prompt           TEXT,
    created_at_ms    REAL,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'materialized', 'quarantined')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL DEFAULT 0,
    last_error       TEXT,
    first_seen_at    REAL NOT NULL,
    materialized_at  REAL,
    event_seq        INTEGER,
    lease_owner      TEXT,
    lease_expires_at REAL,
    doc              TEXT NOT NULL
);
-- Serves the due queue (pending, oldest first), the gallery (materialized,
-- newest first), the cursor (oldest pending), quarantine lists and counts.
CREATE INDEX jobs_by_status ON jobs (status, completed_at_ms, job_id);

CREATE TABLE outputs (
    job_id     TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL CHECK (idx >= 0),
    path       TEXT NOT NULL UNIQUE,
    mime_type  TEXT NOT NULL,
    width      INTEGER,
    height     INTEGER,
    size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
    sha256     TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;

-- AUTOINCREMENT: a seq is never handed out twice, even after pruning.
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    type       TEXT NOT NULL,
    job_id     TEXT,
    payload    TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX events_one_announcement_per_job ON events (job_id)
    WHERE type = 'media.materialized';

CREATE TABLE failed_jobs (
    job_id          TEXT PRIMARY KEY NOT NULL,
    completed_at_ms REAL,
    noted_at        REAL NOT NULL,
    event_seq       INTEGER NOT NULL,
    doc             TEXT NOT NULL
);

CREATE TABLE cursors (
    feed        TEXT PRIMARY KEY NOT NULL CHECK (feed IN ('succeeded', 'failed')),
    since_ms    REAL,
    seen_max_ms REAL,
    updated_at  REAL NOT NULL
);

CREATE TABLE kv (
    key        TEXT PRIMARY KEY NOT NULL,
    value      TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run DDL inside the caller's transaction (``executescript`` would commit first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    _execute_script(conn, _SCHEMA_V1)
    conn.executemany("INSERT INTO cursors (feed, updated_at) VALUES (?, 0)", [(feed,) for feed in _FEEDS])


# _MIGRATIONS[n] brings a version-n ledger to version n + 1; append, never edit.
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_0_to_1,)
SCHEMA_VERSION = len(_MIGRATIONS)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file to :data:`SCHEMA_VERSION` in one transaction, refusing foreign or newer files.

    The version is read under the write lock, so two processes opening a new
    file at once cannot both run a migration.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if application_id != _APPLICATION_ID:
            if application_id != 0 or conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                raise LedgerDamagedError(f"{path} is a SQLite database but not a materializer ledger")
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        if version > SCHEMA_VERSION:
            raise LedgerOpenError(
                f"{path} has ledger schema version {version}, newer than this materializer's"
                f" {SCHEMA_VERSION}; upgrade stella-materializer"
            )
        for step in _MIGRATIONS[version:]:
            step(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _refuse_untrusted(path: Path) -> None:
    """Raise :class:`UntrustedPath` if the ledger or its -wal/-shm is a symlink, not a file, or someone else's.

    SQLite follows symlinks (and creates the -wal and -shm files through planted ones), so a link here
    would make every write land wherever it points.
    """
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        finding = check_file(file)
        if finding is not None:
            raise UntrustedPath(finding)


def _open_checked(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Connect to the file at ``path`` and make sure SQLite opened the very file that was checked."""
    held = open_nofollow(path, os.O_RDONLY)
    try:
        try:
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise LedgerOpenError(f"cannot open ledger {path}: {exc}") from exc
        checked, now = os.fstat(held), os.lstat(path)
        if file_identity(checked) != file_identity(now):
            conn.close()
            raise UntrustedPath(Finding(path, "was replaced while it was being opened",
                                        "make sure no other program writes in this folder"))
        return conn
    finally:
        os.close(held)


def _second_connection(path: Path, identity: tuple[int, int], busy_timeout: float) -> sqlite3.Connection:
    """Another connection to a ledger this process has open, to the same file (``identity``).

    No descriptor of the file is opened and closed here, unlike :func:`_open_checked`: closing
    one drops every POSIX lock this process holds on the file, the locks of SQLite's connections
    included, and another process could then take the ledger for unused (and checkpoint away the
    log under them). SQLite's own connections close their descriptors safely.
    """
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    if file_identity(os.lstat(path)) != identity:
        conn.close()
        raise UntrustedPath(Finding(path, "was replaced while the ledger was open",
                                    "make sure no other program writes in this folder"))
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def _connect(path: Path, *, create: bool, busy_timeout: float) -> sqlite3.Connection:
    """Open the ledger at ``path``, creating it first when it is absent (and ``create`` allows).

    A symlink or someone else's file raises :class:`UntrustedPath`; a file that is there but damaged
    (empty, truncated, garbled, failing ``quick_check``, someone else's database) raises
    :class:`LedgerDamagedError` before anything is written to it.
    """
    _refuse_untrusted(path)
    if create:
        _remove_abandoned_temporaries(path)
    if not path.exists():
        if os.path.lexists(f"{path}-wal"):
            # Its write-ahead log would be replayed into a new file at the path: that is no fresh start.
            raise LedgerDamagedError(f"{path} is damaged: it is missing but its write-ahead log {path}-wal is there")
        if not create:
            raise LedgerOpenError(f"no ledger at {path}")
        _create(path, busy_timeout)
    problem = _ledger_header_problem(path)
    if problem is not None:
        raise LedgerDamagedError(f"{path} is damaged: {problem}")
    conn = _open_checked(path, busy_timeout)
    # A flipped byte in one text cell must not make every query that reads it fail: text is read
    # leniently, and the cells that are parsed (documents, payloads) are checked one row at a time.
    conn.text_factory = _lenient_text
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            details = "; ".join(line for problem in problems for line in problem.splitlines())
            raise LedgerDamagedError(f"{path} is damaged: SQLite's quick_check found {details}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise LedgerOpenError(f"{path}: SQLite refused WAL mode (journal_mode is {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        # Zero what a write frees: a finished job's old document (its signed URLs) must not linger in free space.
        conn.execute("PRAGMA secure_delete = ON")
        _migrate(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_busy(exc):
            raise LedgerBusyError(f"ledger {path} stayed locked by another process: {exc}") from exc
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise LedgerDamagedError(f"{path} is damaged: {exc}") from exc
        raise LedgerOpenError(f"{path} is not a usable materializer ledger: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _create(path: Path, busy_timeout: float) -> None:
    """Make a new ledger at ``path`` whole or not at all: built under a hidden temporary name, then linked.

    So a crash during the first start never leaves an empty or half-made file at ``path``, and a
    file found there that is empty or not a ledger is damage, never an interrupted start (a crash
    at that moment leaves only the hidden temporary file). A link, unlike a rename, never replaces
    a ledger another process created meanwhile.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{_temporary_prefix(path)}{os.urandom(8).hex()}")
    # Prompts are private. SQLite gives the -wal and -shm files the
    # database file's mode, so creating it 0600 covers all three.
    building = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(building, fcntl.LOCK_EX)  # while it is built (see _remove_abandoned_temporaries)
    try:
        conn = sqlite3.connect(temporary, timeout=busy_timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # kept in the file's header
            _migrate(conn, path)
        finally:
            conn.close()  # the last connection: SQLite checkpoints and removes the -wal and -shm files
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        for leftover in (temporary, Path(f"{temporary}-wal"), Path(f"{temporary}-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        os.close(building)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.new-"


def _remove_abandoned_temporaries(path: Path) -> None:
    """Remove what a process killed inside :func:`_create` left: temporaries no process is building.

    A builder holds an exclusive ``flock`` on its temporary until it is gone; one that can be
    locked has no builder left. Its ``-wal`` and ``-shm`` go with it.
    """
    prefix = _temporary_prefix(path)
    try:
        names = [entry.name for entry in os.scandir(path.parent) if entry.name.startswith(prefix)]
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(("-wal", "-shm")):
            if not os.path.lexists(path.parent / name[:-4]):  # its temporary is gone: no one builds it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path.parent / name)
            continue
        try:
            fd = os.open(path.parent / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, or not a file of ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # being built right now
        finally:
            os.close(fd)
        for leftover in (name, f"{name}-wal", f"{name}-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.parent / leftover)


#: A write-ahead log's first four bytes (https://www.sqlite.org/fileformat.html, "WAL File Format"),
#: its header's length, and each frame's header's length.
_WAL_MAGIC = (0x377F0682, 0x377F0683)
_WAL_HEADER_BYTES, _WAL_FRAME_HEADER_BYTES = 32, 24


def _ledger_header_problem(path: Path) -> str | None:
    """:func:`header_problem` of the file, unless a write-ahead log beside it holds what its header promises.

    A checkpoint copies pages from the log in page order, page 1 (whose header gives the new
    size) first: a ledger opened while another process checkpoints it, or after a checkpoint was
    cut short (a daemon killed during one), has a header that promises more pages than the file
    has. SQLite reads those pages from the log, and ``quick_check`` then judges what it reads; a
    log without a frame cannot stand in for them, so a file truncated for real is still refused.
    """
    try:
        with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as file:
            header = file.read(100)
            problem = header_problem(header, os.fstat(file.fileno()).st_size)
    except OSError as exc:
        raise LedgerOpenError(f"cannot read ledger {path}: {exc.strerror or exc}") from exc
    if problem is None or not problem.startswith("the file is truncated: its header says"):
        return problem
    page_size = int.from_bytes(header[16:18], "big")
    return None if _log_has_a_frame(Path(f"{path}-wal"), 65536 if page_size == 1 else page_size) else problem


def _log_has_a_frame(wal: Path, page_size: int) -> bool:
    try:
        with os.fdopen(open_nofollow(wal, os.O_RDONLY), "rb") as file:
            magic = int.from_bytes(file.read(4), "big")
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return False
    return magic in _WAL_MAGIC and size >= _WAL_HEADER_BYTES + _WAL_FRAME_HEADER_BYTES + page_size


def header_problem(header: bytes, size: int) -> str | None:
    """What is wrong with a database file, judged from its first 100 bytes and its size; None if nothing.

    The layout is SQLite's file format (https://www.sqlite.org/fileformat.html, "The Database
    Header"): the magic string, the page size at offset 16 (1 meaning 65536), and the database's
    size in pages at offset 28, valid when the change counter (offset 24) equals the
    version-valid-for number (offset 92). A whole file is a whole number of pages, at least as many
    as a valid header says.
    """
    if size == 0:
        return "the file is empty (0 bytes)"
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return f"the file ({size} bytes) does not start with SQLite's header: it is garbled or not a database"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < _MIN_DATABASE_BYTES or page_size & (page_size - 1):
        return f"its header names an impossible page size ({page_size}): it is garbled"
    if size % page_size:
        return f"the file is truncated: {size} bytes is not a whole number of {page_size}-byte pages"
    pages = int.from_bytes(header[28:32], "big")
    if pages and header[24:28] == header[92:96] and pages * page_size > size:
        return f"the file is truncated: its header says {pages * page_size} bytes, it has {size}"
    return None


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _connect_read_only(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A connection that can only read: SQLite's ``mode=ro``, on a ledger of exactly this schema version."""
    _refuse_untrusted(path)
    if not path.exists():
        raise LedgerOpenError(f"no ledger at {path}")
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=busy_timeout,
                               isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise LedgerOpenError(f"cannot open ledger {path}: {exc}") from exc
    conn.text_factory = _lenient_text  # as for writers: one flipped byte must not stop every read
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LedgerOpenError(f"{path} is not a usable materializer ledger: {exc}") from exc
    if application_id != _APPLICATION_ID or version != SCHEMA_VERSION:
        conn.close()
        what = "not a materializer ledger" if application_id != _APPLICATION_ID else (
            f"ledger schema version {version}, not this materializer's {SCHEMA_VERSION}"
            + ("; upgrade stella-materializer" if version > SCHEMA_VERSION else "; run the daemon once to upgrade it"))
        raise LedgerOpenError(f"{path} is {what}")
    return conn


# -- the ledger ------------------------------------------------------------------

# The rowid names a row whose job id itself may be garbled; the document is read as bytes and
# decoded in Python, one row at a time (see _decode_jobs).
_JOB_COLUMNS = (
    "rowid, job_id, completed_at_ms, capability, profile, prompt, created_at_ms, status, attempts,"
    " next_attempt_at, last_error, first_seen_at, materialized_at, lease_owner, lease_expires_at,"
    " CAST(doc AS BLOB)"
)
#: Pending jobs due for an attempt and not leased by anyone (or whose lease lapsed), oldest completion first.
_DUE_JOBS = (
    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'pending' AND next_attempt_at <= :now"
    " AND (lease_expires_at IS NULL OR lease_expires_at <= :now)"
    " ORDER BY completed_at_ms, job_id LIMIT :limit"
)
_EVENT_COLUMNS = "seq, type, CAST(payload AS BLOB), created_at"
_OUTPUT_COLUMNS = "job_id, idx, path, mime_type, width, height, size_bytes, sha256"


class Ledger:
    """The durable state of one Stella root; see the module docstring for the guarantees.

    ``clock`` gives Unix seconds (injectable so tests can move time);
    ``event_cap`` is how many sidebar events are kept (older ones are pruned);
    ``busy_timeout`` is how many seconds a call waits for another process's
    write lock before raising :class:`LedgerBusyError`. ``create=False`` (for
    ``materializer status``) refuses to create a missing ledger. A ledger (or
    ``-wal``/``-shm``) that is a symlink, not a regular file, or another user's
    raises :class:`~materializer.layout.UntrustedPath` before SQLite opens it. ``read_only=True``
    (for ``materializer gallery``) opens an existing ledger of this schema version for
    reading alone: it never creates, migrates or writes it, and writes raise
    :class:`LedgerError`.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        create: bool = True,
        busy_timeout: float = 10.0,
        event_cap: int = DEFAULT_EVENT_CAP,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
        background_checkpoints: bool = False,
    ) -> None:
        if event_cap < 1:
            raise ValueError(f"event_cap must be at least 1, got {event_cap}")
        self.path = Path(path)
        self._event_cap = event_cap
        self._clock = clock
        self._lock = threading.Lock()
        self._group_thread: int | None = None  # the thread inside group(), whose calls are its savepoints
        self._conn = (_connect_read_only(self.path, busy_timeout) if read_only
                      else _connect(self.path, create=create, busy_timeout=busy_timeout))
        self._busy_timeout = busy_timeout
        self._identity = file_identity(os.lstat(self.path))  # the file just opened (checked by _open_checked)
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._commits = 0  # writes committed on this connection: checkpoint() knows when there is nothing new
        self._checkpointed = 0
        if background_checkpoints and not read_only:
            # SQLite's own checkpoint runs inside the commit that crosses the threshold, on the ledger's
            # thread: the checkpoint() of a background thread does it instead, and this is only a fallback.
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {FALLBACK_CHECKPOINT_PAGES}")

    def close(self) -> None:
        with self._lock:
            if self._checkpoint_conn is not None:
                self._checkpoint_conn.close()
            self._conn.close()

    def checkpoint(self) -> bool:
        """Copy what was committed since the last call from the write-ahead log into the database file.

        SQLite's PASSIVE checkpoint, on a connection of its own: the ledger's calls never wait for it
        (nor it for them; it copies what no reader still needs). For a background thread (see
        ``background_checkpoints``); whether there was anything new to copy.
        """
        commits = self._commits
        if commits == self._checkpointed:
            return False
        if self._checkpoint_conn is None:
            self._checkpoint_conn = _second_connection(self.path, self._identity, self._busy_timeout)
        with self._sqlite_errors():
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self._checkpointed = commits
        return True

    def now(self) -> float:
        """The ledger's clock (Unix seconds): what attempt times and leases are measured against."""
        return self._clock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------

    @contextmanager
    def group(self) -> Iterator[None]:
        """One transaction around the calls this thread makes inside: one commit, one WAL fsync, for all.

        Group commit (see :class:`materializer.ledger_thread.LedgerThread`): each call runs in a
        savepoint of its own, so one that raises takes back its own writes and leaves the others';
        nothing a call wrote is committed (and so nothing may be acted on) before the group's commit,
        which raises if it fails: then none of the calls' writes are in the ledger. A call made after
        SQLite rolled the whole transaction back (a full disk, an I/O error) raises too.
        """
        with self._lock, self._sqlite_errors():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            self._group_thread = threading.get_ident()
            try:
                yield
                if not conn.in_transaction:
                    raise LedgerError(f"ledger {self.path}: an error rolled back a group of calls")
                conn.execute("COMMIT")
                self._commits += 1
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._group_thread = None

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        if self._group_thread == threading.get_ident():
            with self._savepoint() as conn:
                yield conn
            return
        with self._lock, self._sqlite_errors():
            conn = self._conn
            conn.execute(begin)
            try:
                yield conn
                conn.execute("COMMIT")
                if begin != "BEGIN":  # a write
                    self._commits += 1
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _savepoint(self) -> Iterator[sqlite3.Connection]:
        """A call inside :meth:`group`: its writes kept or taken back as one, committed with the group's."""
        with self._sqlite_errors():
            conn = self._conn
            if not conn.in_transaction:  # else each statement would commit on its own, outside the group
                raise LedgerError(f"ledger {self.path}: an error rolled back a group of calls")
            conn.execute("SAVEPOINT call")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK TO call")
                    conn.execute("RELEASE call")
                raise
            conn.execute("RELEASE call")

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read-modify-write transaction holding the write lock from its start."""
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read transaction: one consistent snapshot, never blocking writers (WAL)."""
        return self._transaction("BEGIN")

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise LedgerBusyError(
                    f"ledger {self.path} is busy: another process held its write lock past the busy timeout"
                ) from exc
            raise LedgerError(f"ledger {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"ledger {self.path}: {exc}") from exc

    def _append_event(self, conn: sqlite3.Connection, type_: str, job_id: str | None, payload: str) -> Event:
        now = self._clock()
        cursor = conn.execute(
            "INSERT INTO events (type, job_id, payload, created_at) VALUES (?, ?, ?, ?)",
            (type_, job_id, payload, now),
        )
        seq = int(cursor.lastrowid or 0)
        if seq > self._event_cap:
            conn.execute("DELETE FROM events WHERE seq <= ?", (seq - self._event_cap,))
        return Event(seq, type_, json.loads(payload), now)

    # -- jobs ------------------------------------------------------------------

    def observe_jobs(self, docs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Record succeeded jobs from a query answer; return the ids never seen before, in order.

        Idempotent: a known job keeps its status, attempts and files; a job still
        pending takes the newer document (its output URLs may have been
        refreshed). Raises ``ValueError`` naming the first document without a
        usable ``jobId`` or ``completedAt`` (or, unless its job is materialized
        already, that is not plain JSON) before writing anything.

        The document of a job already materialized is not read past those two
        fields: nothing in it can change the job, and a query answer lists the same
        jobs again and again (the daemon's window holds tens of them).
        """
        observed = _observed(docs)
        if not observed:
            return []
        with self._write() as conn:
            return self._observe(conn, observed, self._clock())

    def observe_and_claim(self, docs: Iterable[Mapping[str, Any]], limit: int, owner: str,
                          lease_seconds: float) -> tuple[list[str], list[Job]]:
        """:meth:`observe_jobs`, then :meth:`claim_due`, in one transaction: the new ids and the jobs leased.

        What the daemon does with a query answer while it has room for more work: a new job is
        recorded and leased by one commit (one fsync), and its attempt starts without a second
        trip to the ledger.
        """
        observed = _observed(docs)
        owner, lease = _lease(owner, lease_seconds)
        with self._write() as conn:
            now = self._clock()
            new = self._observe(conn, observed, now) if observed else []
            leased = _claim_due(conn, now, _count(limit, "limit"), owner, lease)
        return new, [job for job in self._decode_jobs(leased) if job.status == "pending"]

    def _observe(self, conn: sqlite3.Connection, observed: dict[str, tuple[Mapping[str, Any], float]],
                 now: float) -> list[str]:
        statuses = _statuses(conn, list(observed))
        # Raises ValueError (the transaction then writes nothing) for a document that is not plain JSON.
        rows = {job_id: _job_fields(job_id, doc, completed_at) for job_id, (doc, completed_at) in observed.items()
                if statuses.get(job_id) != "materialized"}
        known = [job_id for job_id in rows if job_id in statuses]
        new = [job_id for job_id in rows if job_id not in statuses]
        conn.executemany(
            "INSERT INTO jobs (job_id, completed_at_ms, capability, profile, prompt, created_at_ms,"
            " first_seen_at, doc) VALUES (:job_id, :completed_at_ms, :capability, :profile, :prompt,"
            " :created_at_ms, :now, :doc)",
            [{**rows[job_id], "now": now} for job_id in new],
        )
        conn.executemany(
            "UPDATE jobs SET completed_at_ms = :completed_at_ms, capability = :capability,"
            " profile = :profile, prompt = :prompt, created_at_ms = :created_at_ms, doc = :doc"
            " WHERE job_id = :job_id AND status = 'pending' AND doc != :doc",
            [rows[job_id] for job_id in known],
        )
        # A job quarantined because its stored document stopped decoding heals with a fresh one.
        conn.executemany(
            "UPDATE jobs SET completed_at_ms = :completed_at_ms, capability = :capability,"
            " profile = :profile, prompt = :prompt, created_at_ms = :created_at_ms, doc = :doc,"
            " status = 'pending', attempts = 0, next_attempt_at = 0, last_error = NULL"
            " WHERE job_id = :job_id AND status = 'quarantined' AND substr(last_error, 1, :n) = :undecodable",
            [{**rows[job_id], "n": len(UNDECODABLE_DOCUMENT), "undecodable": UNDECODABLE_DOCUMENT}
             for job_id in known],
        )
        _note_seen(conn, "succeeded", max(completed_at for _, completed_at in observed.values()))
        return new

    def job(self, job_id: str) -> Job | None:
        """The job, or None if never observed; a pending job whose document does not decode is quarantined."""
        return self.jobs([job_id]).get(job_id)

    def jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """The observed jobs among ``job_ids``, by id, read in one snapshot (each as :meth:`job` reads it)."""
        with self._read() as conn:
            rows = [row for chunk in _chunks(list(job_ids)) for row in conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id IN ({', '.join('?' * len(chunk))})", chunk)]
        return {job.job_id: job for job in self._decode_jobs(rows)}

    def outputs(self, job_id: str) -> list[OutputFile]:
        """The committed files of a job, by index (empty unless it is materialized)."""
        with self._read() as conn:
            return _outputs_of(conn, [job_id]).get(job_id, [])

    def due_jobs(self, limit: int) -> list[Job]:
        """Pending jobs due for an attempt and not leased by anyone, oldest completion first."""
        with self._read() as conn:
            rows = conn.execute(_DUE_JOBS, {"now": self._clock(), "limit": _count(limit, "limit")}).fetchall()
        return [job for job in self._decode_jobs(rows) if job.status == "pending"]

    def claim_due(self, limit: int, owner: str, lease_seconds: float) -> list[Job]:
        """Lease up to ``limit`` of the :meth:`due_jobs` to ``owner`` for ``lease_seconds``; return them, leased.

        One transaction (one fsync) for all of them: a burst of jobs is claimed by one commit, not
        one per job, and a job is read and leased in the same step.
        """
        owner, lease = _lease(owner, lease_seconds)
        with self._write() as conn:
            leased = _claim_due(conn, self._clock(), _count(limit, "limit"), owner, lease)
        return [job for job in self._decode_jobs(leased) if job.status == "pending"]

    def _decode_jobs(self, rows: list[Any]) -> list[Job]:
        """The jobs of ``rows`` (selected as ``_JOB_COLUMNS``), each decoded on its own.

        A pending job whose stored document does not decode (a flipped byte on disk) is quarantined
        with the reason, in one transaction with its ``quarantined`` state event, and comes back so
        (with an empty document): it must not stop the jobs around it. Observing the job again (a
        replay, the feed) brings a fresh document and makes it pending again.
        """
        jobs: list[Job] = []
        broken: list[tuple[int, str, str]] = []
        for rowid, *fields, raw in rows:
            try:
                doc = _decode_object(raw)
            except ValueError as exc:
                reason = f"{UNDECODABLE_DOCUMENT}: {exc}"
                if fields[6] == "pending":
                    broken.append((rowid, fields[0], reason))
                    fields[6], fields[7], fields[9] = "quarantined", fields[7] + 1, reason
                    fields[12] = fields[13] = None
                doc = {}
            jobs.append(Job(*fields, doc=doc))  # type: ignore[misc]
        if broken:
            with self._write() as conn:
                for rowid, job_id, reason in broken:
                    changed = conn.execute(
                        "UPDATE jobs SET status = 'quarantined', attempts = attempts + 1, last_error = ?,"
                        " lease_owner = NULL, lease_expires_at = NULL WHERE rowid = ? AND status = 'pending'",
                        (reason, rowid),
                    ).rowcount
                    if changed:
                        _warn("job %r quarantined: %s", job_id, reason)
                        payload = {"state": "quarantined", "jobId": job_id, "reason": reason}
                        self._append_event(conn, "materializer.state", None, _payload_json(payload))
        return jobs

    def next_due_at(self) -> float | None:
        """When the earliest pending job becomes due (attempt time or lease expiry), or None.

        Scans the pending jobs only; call it when :meth:`due_jobs` came back
        empty, to sleep until then instead of polling.
        """
        with self._read() as conn:
            row = conn.execute(
                "SELECT min(max(next_attempt_at, coalesce(lease_expires_at, 0))) FROM jobs WHERE status = 'pending'"
            ).fetchone()
        due: float | None = row[0]
        return due

    def try_claim(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Whether :meth:`claim` leased the job to ``owner`` (False: someone else holds it, or it is not pending)."""
        return self.claim(job_id, owner, lease_seconds) is not None

    def claim(self, job_id: str, owner: str, lease_seconds: float) -> Job | None:
        """Lease a pending job to ``owner`` for ``lease_seconds``; the job as leased, or None if another holds it.

        Claiming again as the same owner renews the lease (do so well before
        it lapses during a long download). A lease whose holder died lapses at
        its expiry. Leases only prevent duplicate work: even two holders could
        never announce a job twice (see :meth:`mark_materialized`). Backoff
        does not block a claim, so a replay can force an attempt.
        """
        owner, lease = _lease(owner, lease_seconds)
        with self._write() as conn:
            now = self._clock()  # read under the write lock: waiting for it must not shorten the lease
            leased = _lease_rows(conn, conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = :job_id AND status = 'pending'"
                " AND (lease_owner IS NULL OR lease_owner = :owner OR lease_expires_at <= :now)",
                {"owner": owner, "job_id": job_id, "now": now},
            ).fetchall(), owner, now + lease)
        jobs = self._decode_jobs(leased)
        return jobs[0] if jobs and jobs[0].status == "pending" else None

    def release_claims_by_prefix(self, prefix: str) -> int:
        """Drop every lease whose owner starts with ``prefix``; return how many.

        A daemon that has just taken its root's instance lock knows that any
        lease held by an earlier daemon belongs to a dead process, and frees
        those jobs at once instead of waiting for the leases to lapse.
        """
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL"
                " WHERE lease_owner IS NOT NULL AND substr(lease_owner, 1, ?) = ?",
                (len(prefix), _text(prefix)),
            )
            return cursor.rowcount

    def live_leases(self) -> int:
        """How many jobs someone holds an unexpired lease on right now."""
        with self._read() as conn:
            count: int = conn.execute(
                "SELECT count(*) FROM jobs WHERE lease_owner IS NOT NULL AND lease_expires_at > ?", (self._clock(),)
            ).fetchone()[0]
        return count

    def record_failure(self, job_id: str, reason: str, retry_at: float, *, owner: str) -> int | None:
        """Count a failed attempt and schedule the next at ``retry_at`` (Unix seconds).

        Releases ``owner``'s lease. Returns the attempts made so far, or None
        if the job is no longer pending (finished meanwhile by another process).
        """
        retry_at = _finite(retry_at, "retry_at")
        with self._write() as conn:
            row = conn.execute(
                "UPDATE jobs SET attempts = attempts + 1, next_attempt_at = :retry_at, last_error = :reason,"
                " lease_owner = nullif(lease_owner, :owner),"
                " lease_expires_at = CASE WHEN lease_owner = :owner THEN NULL ELSE lease_expires_at END"
                " WHERE job_id = :job_id AND status = 'pending' RETURNING attempts",
                {"retry_at": retry_at, "reason": _reason(reason), "owner": _text(owner), "job_id": job_id},
            ).fetchone()
            if row is None:
                _require_job(conn, job_id)
        return row[0] if row else None

    def quarantine_unkept(self, job_id: str, completed_at_ms: float, reason: str) -> bool:
        """Record a job whose document cannot be kept, as quarantined with ``reason`` (its document not stored).

        Only the id and ``completedAt`` are kept. Returns False if the job was already known and
        not pending (then nothing changes).
        """
        completed_at_ms = _finite(completed_at_ms, "completed_at_ms")
        stub = _dump_json({"jobId": job_id, "completedAt": completed_at_ms}, f"job {job_id!r}")
        with self._write() as conn:
            changed = conn.execute(
                "INSERT INTO jobs (job_id, completed_at_ms, capability, profile, first_seen_at, doc, status, attempts,"
                " last_error) VALUES (:job_id, :completed, '', '', :now, :doc, 'quarantined', 1, :reason)"
                " ON CONFLICT (job_id) DO UPDATE SET status = 'quarantined', last_error = :reason, lease_owner = NULL,"
                " lease_expires_at = NULL WHERE status = 'pending'",
                {"job_id": _text(job_id), "completed": completed_at_ms, "now": self._clock(), "doc": stub,
                 "reason": _text(reason)},
            ).rowcount
            _note_seen(conn, "succeeded", completed_at_ms)
        return changed == 1

    def clamp_schedule(self, latest_attempt_at: float, latest_lease_expiry: float) -> int:
        """Pull back attempt times and leases later than could have been set: return how many.

        Retries wait at most the retry policy's longest delay and leases last ``lease_seconds``;
        a stored time later than that came from a clock that has since been stepped back (or
        from a clock that was ahead), and would hold a job back for as long as the step.
        """
        attempt_at = _finite(latest_attempt_at, "latest_attempt_at")
        lease_until = _finite(latest_lease_expiry, "latest_lease_expiry")
        with self._write() as conn:
            retries = conn.execute(
                "UPDATE jobs SET next_attempt_at = ? WHERE status = 'pending' AND next_attempt_at > ?",
                (attempt_at, attempt_at),
            ).rowcount
            leases = conn.execute(
                "UPDATE jobs SET lease_expires_at = ? WHERE status = 'pending' AND lease_expires_at > ?",
                (lease_until, lease_until),
            ).rowcount
        return retries + leases

    def quarantine(self, job_id: str, reason: str) -> bool:
        """Give up on a pending job with ``reason``; it counts as finished for the cursor.

        Returns False if the job was not pending. :meth:`requeue` brings it back.
        """
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE jobs SET status = 'quarantined', attempts = attempts + 1, last_error = ?,"
                " lease_owner = NULL, lease_expires_at = NULL WHERE job_id = ? AND status = 'pending'",
                (_reason(reason), job_id),
            ).rowcount
            if not changed:
                _require_job(conn, job_id)
        return changed == 1

    def requeue(self, job_ids: Iterable[str]) -> list[str]:
        """Make quarantined jobs pending again with fresh attempts; returns those requeued."""
        requeued: list[str] = []
        with self._write() as conn:
            for chunk in _chunks(list(job_ids)):
                marks = ", ".join("?" * len(chunk))
                requeued += [
                    row[0]
                    for row in conn.execute(
                        "UPDATE jobs SET status = 'pending', attempts = 0, next_attempt_at = 0, last_error = NULL"
                        f" WHERE status = 'quarantined' AND job_id IN ({marks}) RETURNING job_id",
                        chunk,
                    )
                ]
        return requeued

    def mark_vanished(self, reasons: Mapping[str, str]) -> list[str]:
        """Make materialized jobs whose files are gone (removed, replaced, changed) pending again.

        ``reasons`` gives each job's reason, kept as its ``last_error``. Their file rows go, their
        announcement stays: materialized again at the same paths, they are not announced a second
        time (see :meth:`mark_materialized`). Returns the jobs changed (those still materialized).
        """
        changed: list[str] = []
        with self._write() as conn:
            for job_id, reason in reasons.items():
                if conn.execute(
                    "UPDATE jobs SET status = 'pending', attempts = 0, next_attempt_at = 0, last_error = ?,"
                    " materialized_at = NULL WHERE status = 'materialized' AND job_id = ?",
                    (_reason(reason), job_id),
                ).rowcount:
                    conn.execute("DELETE FROM outputs WHERE job_id = ?", (job_id,))
                    changed.append(job_id)
        return changed

    def materialized_outputs(self, after_job_id: str, limit: int) -> list[tuple[str, list[OutputFile]]]:
        """Materialized jobs with ``job_id > after_job_id`` (by job id, at most ``limit``) with their files.

        Pages through every materialized job (pass the last id of a page to get the next).
        """
        with self._read() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT job_id FROM jobs WHERE status = 'materialized' AND job_id > ? ORDER BY job_id LIMIT ?",
                    (after_job_id, _count(limit, "limit")),
                )
            ]
            files = _outputs_of(conn, ids)
        return [(job_id, files.get(job_id, [])) for job_id in ids]

    def mark_materialized(
        self, job_id: str, files: Sequence[OutputFile], event_payload: Mapping[str, Any],
        missing: Sequence[str] = (),
    ) -> Event | None:
        """Record all of a job's committed files and announce it, in one transaction.

        The files must already be fsynced in place. Returns the
        ``media.materialized`` event to push to live clients, or None if the
        job was already materialized (by this or another process): each job is
        announced exactly once, whatever crashes or replays happen. A
        quarantined job may still be materialized (a replay that succeeded).

        ``missing`` names the extra outputs (not the announced asset) that could
        not be kept, one reason each; they become the job's ``last_error``, so
        the job's record says what it lacks.

        A job announced before its files vanished (:meth:`mark_vanished`) gets
        its files back without a second announcement (None is returned).
        """
        checked = _check_files(files)
        payload = _payload_json(event_payload)
        note = f"materialized without {len(missing)} extra output(s): {'; '.join(missing)}" if missing else None
        with self._write() as conn:
            row = conn.execute("SELECT status, doc, event_seq FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(f"job {job_id!r} was never observed; observe it before materializing")
            if row[0] == "materialized":
                return None
            record = _dump_json(_finished_document(json.loads(row[1])), f"job {job_id!r}")
            conn.executemany(
                f"INSERT INTO outputs ({_OUTPUT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (job_id, f.index, f.path, f.mime_type, f.width, f.height, f.size_bytes, f.sha256)
                    for f in checked
                ],
            )
            if row[2] is not None:
                # Announced before its files vanished (see mark_vanished): back at the announced paths,
                # it is not announced again.
                conn.execute(
                    "UPDATE jobs SET status = 'materialized', materialized_at = ?, doc = ?, last_error = ?,"
                    " lease_owner = NULL, lease_expires_at = NULL WHERE job_id = ?",
                    (self._clock(), record, None if note is None else _reason(note), job_id),
                )
                return None
            event = self._append_event(conn, "media.materialized", job_id, payload)
            conn.execute(
                "UPDATE jobs SET status = 'materialized', materialized_at = ?, event_seq = ?, doc = ?,"
                " last_error = coalesce(?, last_error), lease_owner = NULL, lease_expires_at = NULL WHERE job_id = ?",
                (event.created_at, event.seq, record, None if note is None else _reason(note), job_id),
            )
        return event

    def note_failed_job(self, doc: Mapping[str, Any], event_payload: Mapping[str, Any]) -> Event | None:
        """Record a job that failed upstream and append its ``media.failed`` event, once per job.

        Returns the event the first time, None after. ``completedAt`` may be
        missing on failed jobs.
        """
        if not isinstance(doc, Mapping):
            raise ValueError(f"a job document must be an object, got {type(doc).__name__}")
        job_id = _job_id(doc)
        completed_at = finite_number(doc.get("completedAt"))
        doc_json = _dump_json(_finished_document(doc), f"job {job_id!r}")
        payload = _payload_json(event_payload)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM failed_jobs WHERE job_id = ?", (job_id,)).fetchone():
                return None
            event = self._append_event(conn, "media.failed", job_id, payload)
            conn.execute(
                "INSERT INTO failed_jobs (job_id, completed_at_ms, noted_at, event_seq, doc) VALUES (?, ?, ?, ?, ?)",
                (job_id, completed_at, event.created_at, event.seq, doc_json),
            )
            if completed_at is not None:
                _note_seen(conn, "failed", completed_at)
        return event

    # -- events ----------------------------------------------------------------

    def append_event(self, type_: str, payload: Mapping[str, Any]) -> Event:
        """Append a ``materializer.state`` event (connection, auth, gap reports) or a ``media.failed`` one.

        ``media.materialized`` is refused: only :meth:`mark_materialized` may
        announce a job, which is what makes the announcement exactly-once.
        """
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}; expected one of {sorted(EVENT_TYPES)}")
        if type_ == "media.materialized":
            raise ValueError("media.materialized events are appended only by mark_materialized")
        payload_json = _payload_json(payload)
        with self._write() as conn:
            return self._append_event(conn, type_, None, payload_json)

    def events_after(self, after_seq: int, limit: int) -> EventPage:
        """Up to ``limit`` events with ``seq > after_seq``, oldest first.

        A client that asks for a pruned range gets what remains; the page's
        ``first_seq`` and ``gap`` tell it that it missed some.
        """
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (_count(after_seq, "after_seq"), _count(limit, "limit")),
            ).fetchall()
            first_seq = conn.execute("SELECT min(seq) FROM events").fetchone()[0]
            last_seq = _last_seq(conn)
        return EventPage(after_seq, [_event(row) for row in rows], first_seq, last_seq)

    def last_seq(self) -> int:
        """The newest event ``seq`` ever handed out (0 before the first)."""
        with self._read() as conn:
            return _last_seq(conn)

    # -- cursors ---------------------------------------------------------------

    def ensure_cursor(self, initial_ms: float, feed: Feed = "succeeded") -> float:
        """The cursor, set to ``initial_ms`` first if it has never been set (the first run's look-back)."""
        initial_ms = _finite(initial_ms, "initial_ms")
        with self._write() as conn:
            since, _ = _cursor_row(conn, feed)
            if since is None:
                conn.execute(
                    "UPDATE cursors SET since_ms = ?, updated_at = ? WHERE feed = ?", (initial_ms, self._clock(), feed)
                )
                return initial_ms
            return since

    def cursor(self, feed: Feed = "succeeded") -> float | None:
        """The feed's cursor, or None if it was never set."""
        with self._read() as conn:
            return _cursor_row(conn, feed)[0]

    def place_cursor(self, since_ms: float, feed: Feed = "succeeded") -> float:
        """Put the cursor at ``since_ms``, back or forth: only at start, where the server's clock placed it
        (a first cursor, or one dated after the server's now pulled back). Returns it."""
        since_ms = _finite(since_ms, "since_ms")
        with self._write() as conn:
            _cursor_row(conn, feed)
            conn.execute("UPDATE cursors SET since_ms = ?, updated_at = ? WHERE feed = ?",
                         (since_ms, self._clock(), feed))
        return since_ms

    def advance_cursor(
        self,
        covered_from_ms: float,
        covered_until_ms: float,
        *,
        feed: Feed = "succeeded",
        overlap_ms: float = DEFAULT_CURSOR_OVERLAP_MS,
    ) -> float:
        """Move the cursor forward as far as is safe; return it.

        The caller vouches that every job of the feed with ``completedAt`` in
        ``[covered_from_ms, covered_until_ms]`` has been observed (or noted):
        typically a complete answer to a query from ``since=covered_from_ms``
        whose newest job completed at ``covered_until_ms``. A truncated
        answer does not vouch for anything older than its oldest job, so pass
        that as ``covered_from_ms`` (or close the gap first).

        The new cursor is the oldest unfinished job's ``completedAt`` (pending
        jobs bound it; materialized and quarantined ones do not), else the
        covered bound, minus ``overlap_ms`` against clock skew. It never
        passes what was observed, never skips the uncovered range
        ``[cursor, covered_from_ms)``, and never moves backwards.
        """
        covered_from_ms = _finite(covered_from_ms, "covered_from_ms")
        covered_until_ms = _finite(covered_until_ms, "covered_until_ms")
        overlap_ms = _finite(overlap_ms, "overlap_ms")
        if overlap_ms < 0:
            raise ValueError(f"overlap_ms must not be negative, got {overlap_ms}")
        from materializer.feed import next_cursor  # here, not at import: `status` reads the ledger and needs no feed

        with self._write() as conn:
            since, seen_max = _cursor_row(conn, feed)
            if since is None:
                raise LedgerError(f"the {feed} cursor was never set; call ensure_cursor first")
            oldest_pending = None
            if feed == "succeeded" and covered_from_ms <= since:
                row = conn.execute(
                    "SELECT completed_at_ms FROM jobs WHERE status = 'pending' ORDER BY completed_at_ms LIMIT 1"
                ).fetchone()
                oldest_pending = None if row is None else row[0]
            candidate = next_cursor(since, seen_max, covered_from_ms, covered_until_ms, oldest_pending, overlap_ms)
            if candidate <= since:
                return since
            conn.execute(
                "UPDATE cursors SET since_ms = ?, updated_at = ? WHERE feed = ?", (candidate, self._clock(), feed)
            )
            return candidate

    # -- small state -----------------------------------------------------------

    def set_state(self, key: str, value: Any) -> None:
        """Keep a small JSON value (connection state, daemon pid and heartbeat, ...)."""
        value_json = _dump_json(redact_value(value), f"state {key!r}")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (_text(key), value_json, self._clock()),
            )

    def get_state(self, key: str, default: Any = None) -> Any:
        with self._read() as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (_text(key),)).fetchone()
        if row is None:
            return default
        try:
            return json.loads(row[0])
        except ValueError as exc:
            _warn("ledger state %r does not decode (%s); using its default", key, exc)
            return default

    # -- reports ---------------------------------------------------------------

    def gallery_entries(self, limit: int) -> list[GalleryEntry]:
        """The newest ``limit`` materialized jobs by completion, with their files.

        Index-driven: as fast with a million jobs as with ten.
        """
        heads, entries = self.gallery_changes(limit, ())
        return [entries[head] for head in heads]

    def gallery_changes(self, limit: int, known: Container[GalleryHead]) -> tuple[list[GalleryHead],
                                                                                  dict[GalleryHead, GalleryEntry]]:
        """The newest ``limit`` materialized jobs (as :meth:`gallery_entries`), for a reader that keeps them.

        Returns their heads (job id and ``materialized_at``, newest first) and the entries of
        those not in ``known``, in one snapshot: a job materialized again has a new head, so
        whatever a reader kept under its old one is never taken for it. Reading only the heads
        of a thousand jobs costs a fraction of reading their entries and files.
        """
        with self._read() as conn:
            heads = [GalleryHead(job_id, materialized_at) for job_id, materialized_at in conn.execute(
                "SELECT job_id, materialized_at FROM jobs"
                " WHERE status = 'materialized' ORDER BY completed_at_ms DESC, job_id DESC LIMIT ?",
                (_count(limit, "limit"),),
            )]
            wanted = {head.job_id: head for head in heads if head not in known}
            entries: dict[GalleryHead, GalleryEntry] = {}
            if wanted:
                files = _outputs_of(conn, list(wanted))
                for chunk in _chunks(list(wanted)):
                    for row in conn.execute(
                        "SELECT job_id, capability, profile, prompt, completed_at_ms, materialized_at FROM jobs"
                        f" WHERE job_id IN ({', '.join('?' * len(chunk))})", chunk,
                    ):
                        entries[wanted[row[0]]] = GalleryEntry(*row, files=files.get(row[0], []))  # type: ignore[misc]
        return heads, entries

    def failed_entries(self, limit: int) -> list[FailedEntry]:
        """The newest ``limit`` jobs noted as failed upstream (newest noted first), with their documents."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT job_id, completed_at_ms, noted_at, event_seq, doc FROM failed_jobs"
                " ORDER BY noted_at DESC, job_id DESC LIMIT ?",
                (_count(limit, "limit"),),
            ).fetchall()
        return [FailedEntry(job_id, completed_at_ms, noted_at, event_seq, json.loads(doc))
                for job_id, completed_at_ms, noted_at, event_seq, doc in rows]

    def status(self, quarantined_limit: int = 100) -> LedgerStatus:
        """Counts, quarantined jobs with reasons, cursors, last event and state, in one snapshot."""
        with self._read() as conn:
            counts: dict[str, int] = dict.fromkeys(_STATUSES, 0)
            counts.update(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
            failed = conn.execute("SELECT count(*) FROM failed_jobs").fetchone()[0]
            quarantined = [
                QuarantinedJob(*row)
                for row in conn.execute(
                    "SELECT job_id, last_error, attempts, completed_at_ms FROM jobs WHERE status = 'quarantined'"
                    " ORDER BY completed_at_ms DESC, job_id DESC LIMIT ?",
                    (_count(quarantined_limit, "quarantined_limit"),),
                )
            ]
            cursors = dict(conn.execute("SELECT feed, since_ms FROM cursors ORDER BY feed").fetchall())
            last = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            state = {}
            for key, value in conn.execute("SELECT key, value FROM kv ORDER BY key"):
                with contextlib.suppress(ValueError):  # a garbled value is left out, not fatal
                    state[key] = json.loads(value)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        return LedgerStatus(counts, failed, quarantined, cursors, _event(last) if last else None, state, version)

# -- helpers ---------------------------------------------------------------------


def _decode_object(raw: Any) -> dict[str, Any]:
    """A stored JSON object (read as bytes), or ValueError saying why it is not one."""
    if not isinstance(raw, bytes):
        raise ValueError(f"it is stored as {type(raw).__name__}, not as text")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(value, dict):
        raise ValueError(f"it is a JSON {type(value).__name__}, not an object")
    return value


def _event(row: Sequence[Any]) -> Event:
    """One event row (``_EVENT_COLUMNS``); a payload that does not decode makes an unreadable event, not an error."""
    seq, type_, raw, created_at = row
    try:
        return Event(seq, type_, _decode_object(raw), created_at)
    except ValueError as exc:
        return Event(seq, type_, {}, created_at, unreadable=f"its stored payload does not decode: {exc}")


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    return row[0] if row else 0


def _cursor_row(conn: sqlite3.Connection, feed: str) -> tuple[float | None, float | None]:
    if feed not in _FEEDS:
        raise ValueError(f"unknown feed {feed!r}; expected one of {_FEEDS}")
    since, seen_max = conn.execute("SELECT since_ms, seen_max_ms FROM cursors WHERE feed = ?", (feed,)).fetchone()
    return since, seen_max


def _note_seen(conn: sqlite3.Connection, feed: Feed, completed_at_ms: float) -> None:
    """Raise the feed's high-water mark of observed completions (the cursor never passes it)."""
    conn.execute(
        "UPDATE cursors SET seen_max_ms = :ms WHERE feed = :feed AND (seen_max_ms IS NULL OR seen_max_ms < :ms)",
        {"ms": completed_at_ms, "feed": feed},
    )


def _require_job(conn: sqlite3.Connection, job_id: str) -> None:
    if conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone() is None:
        raise UnknownJobError(f"job {job_id!r} was never observed")


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _observed(docs: Iterable[Mapping[str, Any]]) -> dict[str, tuple[Mapping[str, Any], float]]:
    """Each document by job id (a later document of a job wins) with its ``completedAt``; ValueError naming the
    first without a usable ``jobId`` or ``completedAt``."""
    observed: dict[str, tuple[Mapping[str, Any], float]] = {}
    for doc in docs:
        if not isinstance(doc, Mapping):
            raise ValueError(f"a job document must be an object, got {type(doc).__name__}")
        job_id = _job_id(doc)
        completed_at = finite_number(doc.get("completedAt"))
        if completed_at is None:
            got = type(doc.get("completedAt")).__name__
            raise ValueError(f"job {job_id!r}: completedAt must be a finite number, got {got}")
        observed[job_id] = (doc, completed_at)
    return observed


def _claim_due(conn: sqlite3.Connection, now: float, limit: int, owner: str, lease: float) -> list[Any]:
    """Lease up to ``limit`` due jobs (``_DUE_JOBS``) in this transaction; their rows, as leased."""
    return _lease_rows(conn, conn.execute(_DUE_JOBS, {"now": now, "limit": limit}).fetchall(), owner, now + lease)


#: Where ``_JOB_COLUMNS`` puts the lease's owner and expiry (after the rowid).
_LEASE_OWNER_COLUMN, _LEASE_EXPIRY_COLUMN = 13, 14


def _lease_rows(conn: sqlite3.Connection, rows: list[Any], owner: str, until: float) -> list[Any]:
    """Lease the jobs of ``rows`` (selected as ``_JOB_COLUMNS``) to ``owner`` until ``until``; the rows as leased."""
    conn.executemany("UPDATE jobs SET lease_owner = ?, lease_expires_at = ? WHERE rowid = ?",
                     [(owner, until, row[0]) for row in rows])
    return [(*row[:_LEASE_OWNER_COLUMN], owner, until, *row[_LEASE_EXPIRY_COLUMN + 1:]) for row in rows]


def _statuses(conn: sqlite3.Connection, job_ids: list[str]) -> dict[str, str]:
    """The status of each of ``job_ids`` the ledger knows."""
    found: dict[str, str] = {}
    for chunk in _chunks(job_ids):
        marks = ", ".join("?" * len(chunk))
        found.update(conn.execute(f"SELECT job_id, status FROM jobs WHERE job_id IN ({marks})", chunk).fetchall())
    return found


def _outputs_of(conn: sqlite3.Connection, job_ids: list[str]) -> dict[str, list[OutputFile]]:
    files: dict[str, list[OutputFile]] = {}
    for chunk in _chunks(job_ids):
        marks = ", ".join("?" * len(chunk))
        for job_id, *fields in conn.execute(
            f"SELECT {_OUTPUT_COLUMNS} FROM outputs WHERE job_id IN ({marks}) ORDER BY job_id, idx", chunk
        ):
            files.setdefault(job_id, []).append(OutputFile(*fields))
    return files


def _text(value: str) -> str:
    """The string as SQLite can store it: lone surrogates (possible in hostile JSON) become '?'."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _reason(value: str) -> str:
    """Text from a server or a job, as stored: redacted (see :mod:`materializer.redaction`), then storable."""
    return _text(redact(value))


#: A string that is one ``http(s)`` URL with a query or fragment (text that merely mentions a URL is not).
_URL_WITH_QUERY = re.compile(r"(?i)(https?://[^?#\s]*)[?#]\S*")


def _finished_document(doc: Any) -> Any:
    """A finished job's document as the record keeps it: URLs without query or fragment, secrets redacted.

    Every ``http(s)`` URL anywhere in the document loses what follows its path (a CDN's signature,
    credential and expiry). A finished job downloads from it again only when its files vanish
    (:meth:`mark_vanished`): URLs that needed their signature then fail, are retried and, at last,
    quarantined; ``replay`` lists the job afresh and fetches it with its current URLs.
    """
    if isinstance(doc, str):
        url = _URL_WITH_QUERY.fullmatch(doc)
        return redact(url[1] if url else doc)
    if isinstance(doc, dict):
        return {key: _finished_document(value) for key, value in doc.items()}
    if isinstance(doc, list):
        return [_finished_document(value) for value in doc]
    return doc


def _finite(value: Any, name: str) -> float:
    """``value`` as a float, or ValueError naming the argument when it is not a finite number."""
    number = finite_number(value)
    if number is None:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _lease(owner: str, lease_seconds: float) -> tuple[str, float]:
    """A claim's owner (as stored) and lease, or ValueError: an owner is never empty, a lease always positive."""
    if not owner:
        raise ValueError("a lease owner must be a non-empty string")
    lease = _finite(lease_seconds, "lease_seconds")
    if lease <= 0:
        raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
    return _text(owner), lease


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _dump_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not plain JSON: {exc}") from exc


def _payload_json(payload: Any) -> str:
    if not isinstance(payload, Mapping):
        raise ValueError(f"an event payload must be an object, got {type(payload).__name__}")
    return _dump_json(redact_value(dict(payload)), "event payload")


def _job_id(doc: Mapping[str, Any]) -> str:
    job_id = doc.get("jobId")
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job document has no jobId string (got {type(job_id).__name__})")
    try:
        job_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"jobId {job_id!r} is not valid Unicode: {exc.reason}") from exc
    return job_id


def _job_fields(job_id: str, doc: Mapping[str, Any], completed_at: float) -> dict[str, Any]:
    """The columns of a succeeded job document (checked by :func:`_observed`); ValueError if it is not plain JSON."""
    request = doc.get("request")
    prompt = request.get("prompt") if isinstance(request, Mapping) else None
    capability, profile = doc.get("capability"), doc.get("profile")
    return {
        "job_id": job_id,
        "completed_at_ms": completed_at,
        "capability": _reason(capability) if isinstance(capability, str) else "",
        "profile": _reason(profile) if isinstance(profile, str) else "",
        "prompt": _reason(prompt) if isinstance(prompt, str) else None,
        "created_at_ms": finite_number(doc.get("createdAt")),
        "doc": _dump_json(doc, f"job {job_id!r}"),
    }


def _check_files(files: Sequence[OutputFile]) -> list[OutputFile]:
    """The files sorted by index, or ValueError naming the first bad field."""
    if not files:
        raise ValueError("a materialized job needs at least one output file")
    seen: set[int] = set()
    for f in files:
        if not isinstance(f, OutputFile):
            raise ValueError(f"expected OutputFile, got {type(f).__name__}")
        where = f"output {f.index!r}"
        if isinstance(f.index, bool) or not isinstance(f.index, int) or f.index < 0:
            raise ValueError(f"{where}: index must be a non-negative integer")
        if f.index in seen:
            raise ValueError(f"{where}: index appears twice")
        seen.add(f.index)
        pure = PurePosixPath(f.path) if isinstance(f.path, str) else None
        if (
            pure is None
            or not f.path
            or pure.is_absolute()
            or ".." in pure.parts
            or "\\" in f.path
            or "\x00" in f.path
            or f.path != _text(f.path)
        ):
            raise ValueError(f"{where}: path {f.path!r} must be a plain relative path inside the outputs folder")
        if not isinstance(f.mime_type, str) or not f.mime_type:
            raise ValueError(f"{where}: mime_type must be a non-empty string")
        for name in ("width", "height"):
            value = getattr(f, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{where}: {name} must be a positive integer or None, got {value!r}")
        if isinstance(f.size_bytes, bool) or not isinstance(f.size_bytes, int) or f.size_bytes < 0:
            raise ValueError(f"{where}: size_bytes must be a non-negative integer, got {f.size_bytes!r}")
        if not isinstance(f.sha256, str) or len(f.sha256) != 64 or f.sha256.strip("0123456789abcdef"):
            raise ValueError(f"{where}: sha256 must be 64 lowercase hex digits")
    return sorted(files, key=lambda f: f.index)
