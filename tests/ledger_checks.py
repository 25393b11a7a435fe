"""Test-side checks of a ledger: its invariants and what it holds, read with a connection of their own.

The product never reads these (``materializer status`` has :meth:`Ledger.status`);
the ledger, chaos, crash and bench tests use them to judge a ledger after the fact.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from materializer.ledger import Feed, Ledger

__all__ = ["check_integrity", "cursor_of", "flip_stored_byte"]

_OUTPUT_COLUMNS = "job_id, idx, path, mime_type, width, height, size_bytes, sha256"

#: One sentence per broken invariant ({} is the job id); the parameter says whether the
#: query takes the oldest kept event's seq (announcements older than it were pruned, not lost).
_CHECKS: tuple[tuple[str, str, bool], ...] = (
    (
        "materialized job {} has no output files",
        "SELECT job_id FROM jobs j WHERE status = 'materialized'"
        " AND NOT EXISTS (SELECT 1 FROM outputs o WHERE o.job_id = j.job_id)",
        False,
    ),
    (
        "job {} has output files but is not materialized",
        "SELECT DISTINCT o.job_id FROM outputs o JOIN jobs j USING (job_id) WHERE j.status != 'materialized'",
        False,
    ),
    (
        "output files of unknown job {}",
        "SELECT DISTINCT job_id FROM outputs WHERE job_id NOT IN (SELECT job_id FROM jobs)",
        False,
    ),
    (
        "materialized job {} lacks its materialization time or event seq",
        "SELECT job_id FROM jobs WHERE status = 'materialized' AND (materialized_at IS NULL OR event_seq IS NULL)",
        False,
    ),
    (
        "job {} was announced more than once",
        "SELECT job_id FROM events WHERE type = 'media.materialized' GROUP BY job_id HAVING count(*) > 1",
        False,
    ),
    (
        "announcement of job {} does not match a materialized job",
        "SELECT e.job_id FROM events e LEFT JOIN jobs j ON j.job_id = e.job_id"
        " WHERE e.type = 'media.materialized'"
        " AND (j.job_id IS NULL OR j.status != 'materialized' OR j.event_seq != e.seq)",
        False,
    ),
    (
        "materialized job {} was never announced",
        "SELECT job_id FROM jobs j WHERE status = 'materialized' AND event_seq >= ?"
        " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.seq = j.event_seq"
        " AND e.type = 'media.materialized' AND e.job_id = j.job_id)",
        True,
    ),
    (
        "failed job {} was never announced",
        "SELECT job_id FROM failed_jobs f WHERE event_seq >= ?"
        " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.seq = f.event_seq"
        " AND e.type = 'media.failed' AND e.job_id = f.job_id)",
        True,
    ),
    (
        "finished job {} still holds a lease",
        "SELECT job_id FROM jobs WHERE status != 'pending' AND lease_owner IS NOT NULL",
        False,
    ),
)


@contextmanager
def _snapshot(ledger: Ledger) -> Iterator[sqlite3.Connection]:
    """A read transaction on the ledger's file: one consistent snapshot, never blocking writers (WAL)."""
    with closing(sqlite3.connect(ledger.path, isolation_level=None)) as conn:
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")


def check_integrity(ledger: Ledger, outputs_dir: Path | None = None) -> list[str]:
    """Every broken invariant, as one sentence each; empty when the ledger is sound.

    Checks SQLite's own structure, that materialized jobs (and only they) have
    files, that each was announced exactly once (as far as the kept log
    reaches), that each noted failure was announced, and that finished jobs
    hold no lease. With ``outputs_dir``, also that every recorded file is
    there, a regular file, with its recorded size and SHA-256.
    """
    with _snapshot(ledger) as conn:
        problems = [f"sqlite: {row[0]}" for row in conn.execute("PRAGMA quick_check") if row[0] != "ok"]
        last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        first_kept = conn.execute("SELECT coalesce(min(seq), ?) FROM events", ((last[0] if last else 0) + 1,))
        first_kept_seq = first_kept.fetchone()[0]
        for message, sql, takes_first_kept in _CHECKS:
            params = (first_kept_seq,) if takes_first_kept else ()
            problems += [message.format(repr(row[0])) for row in conn.execute(sql, params)]
        recorded = conn.execute(f"SELECT {_OUTPUT_COLUMNS} FROM outputs ORDER BY job_id, idx").fetchall()
    if outputs_dir is not None:
        problems += [problem for row in recorded if (problem := _check_file_on_disk(outputs_dir, row))]
    return problems


def _check_file_on_disk(outputs_dir: Path, row: Sequence[Any]) -> str | None:
    job_id, index, path, _mime, _width, _height, size_bytes, sha256 = row
    where = outputs_dir / path
    try:
        info = os.lstat(where)
    except OSError as exc:
        return f"output {index} of job {job_id!r} is missing at {where}: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):  # lstat: a planted symlink is not followed
        return f"output {index} of job {job_id!r} at {where} is not a regular file"
    if info.st_size != size_bytes:
        return f"output {index} of job {job_id!r} at {where} has {info.st_size} bytes, the ledger says {size_bytes}"
    digest = hashlib.sha256()
    with open(where, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != sha256:
        return f"output {index} of job {job_id!r} at {where} does not match its recorded SHA-256"
    return None


def cursor_of(ledger: Ledger, feed: Feed = "succeeded") -> float | None:
    """The feed's ``since`` (Unix ms) as the ledger keeps it, or None before the first run."""
    return ledger.status(quarantined_limit=0).cursors[feed]


def flip_stored_byte(path: Path, marker: bytes, offset: int = 0, mask: int = 0x01) -> None:
    """Damage one byte of the ledger file on disk: the one ``offset`` bytes into the only copy of ``marker``.

    The write-ahead log is checkpointed into the file first (the ledger must be closed), so the
    bytes are where SQLite reads them; the damage is inside a record, which SQLite's
    ``quick_check`` does not read (asserted), as a bit flipped on a disk would be.
    """
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    assert data.count(marker) == 1, f"{marker!r} appears {data.count(marker)} times in {path}"
    data[data.index(marker) + offset] ^= mask
    path.write_bytes(bytes(data))
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
