"""The local backend's ``media_jobs`` table, in SQLite, with Convex-style timestamps.

Every write advances the database timestamp (nanoseconds, like Convex's
``ts``) and wakes whoever waits on :meth:`JobTable.changed`. The table also
remembers when each owner's jobs last changed (:meth:`JobTable.owner_ts`):
every public query reads only its viewer's jobs, so a sync session re-runs
its queries only when that owner's rows moved, as a Convex subscription is
invalidated only by writes inside its read set.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

from stella_devbackend.clock import ServerClock

__all__ = ["JobTable", "PageCursorError", "ReadBudget", "TooManyBytesRead"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS media_jobs (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    completed_at REAL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS media_jobs_feed ON media_jobs (owner, status, completed_at, job_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class PageCursorError(ValueError):
    """A pagination cursor this table did not issue."""


class TooManyBytesRead(Exception):
    """A function execution read more document bytes than its budget allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"read more than {limit} bytes of documents")
        self.limit = limit


class ReadBudget:
    """The document bytes one function execution may read.

    As ``crates/database/src/reads.rs`` ``record_read_document``: every document read counts
    (the returned ones and any read past them), and the function fails as soon as the total
    passes the limit. A document's size is its stored JSON here, which is no smaller than
    Convex's measure of it (so the budget runs out no later than on the real backend).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def read(self, text: str) -> dict[str, Any]:
        self.used += len(text.encode())
        if self.used > self.limit:
            raise TooManyBytesRead(self.limit)
        doc: dict[str, Any] = json.loads(text)
        return doc


class JobTable:
    """Job documents keyed by ``jobId`` and scoped by owner; ``clock`` is the deployment's."""

    def __init__(self, path: Path | str, clock: ServerClock | None = None) -> None:
        self.clock = clock or ServerClock()
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='ts'").fetchone()
        self.ts = int(row[0]) if row else self.clock.time_ns()
        self._owner_ts: dict[str, int] = {}
        self._changed = asyncio.Event()

    def close(self) -> None:
        self._db.close()

    # -- change notification -------------------------------------------------

    def changed(self) -> asyncio.Event:
        """An event set at the next write; take a fresh one after each wake-up."""
        return self._changed

    def owner_ts(self, owner: str) -> int:
        """The timestamp of the last write to ``owner``'s jobs since this process started (0: none)."""
        return self._owner_ts.get(owner, 0)

    def _commit_ts(self, owner: str) -> None:
        self.ts = max(self.clock.time_ns(), self.ts + 1)
        self._owner_ts[owner] = self.ts
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('ts', ?)", (str(self.ts),))
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # -- writes ----------------------------------------------------------------

    def put(self, owner: str, doc: dict[str, Any]) -> None:
        """Insert or replace a job document (the ``jobId`` field is the key)."""
        self.put_many(owner, [doc])

    def put_many(self, owner: str, docs: list[dict[str, Any]]) -> None:
        rows = [(d["jobId"], owner, d.get("status", ""), _completed_at(d), json.dumps(d)) for d in docs]
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT OR REPLACE INTO media_jobs (job_id, owner, status, completed_at, doc) VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        self._commit_ts(owner)
        self._db.execute("COMMIT")

    def clear(self) -> int:
        """Delete every job of every owner (``/_dev/reset``); the timestamp still only moves forward."""
        owners = [owner for (owner,) in self._db.execute("SELECT DISTINCT owner FROM media_jobs")]
        self._db.execute("BEGIN")
        removed = self._db.execute("DELETE FROM media_jobs").rowcount
        for owner in owners:
            self._commit_ts(owner)
        self._db.execute("COMMIT")
        return removed

    # -- reads -----------------------------------------------------------------

    def get(self, owner: str | None, job_id: str, budget: ReadBudget | None = None) -> dict[str, Any] | None:
        if owner is None:
            return None
        row = self._db.execute(
            "SELECT doc FROM media_jobs WHERE job_id = ? AND owner = ?", (job_id, owner)
        ).fetchone()
        return _read(budget, row[0]) if row else None

    def unfinished(self) -> list[tuple[str, dict[str, Any]]]:
        """Jobs still queued or running (to resume after a restart)."""
        rows = self._db.execute(
            "SELECT owner, doc FROM media_jobs WHERE status IN ('queued', 'running')"
        ).fetchall()
        return [(owner, json.loads(doc)) for owner, doc in rows]

    def newest_since(self, owner: str, statuses: tuple[str, ...], since: float, limit: int,
                     budget: ReadBudget | None = None) -> list[dict[str, Any]]:
        """Jobs with one of ``statuses`` and ``completedAt >= since``, newest first, at most ``limit``."""
        marks = ", ".join("?" * len(statuses))
        rows = self._db.execute(
            f"SELECT doc FROM media_jobs WHERE owner = ? AND status IN ({marks}) AND completed_at >= ?"
            " ORDER BY completed_at DESC, job_id DESC LIMIT ?",
            (owner, *statuses, since, limit),
        ).fetchall()
        return [_read(budget, doc) for (doc,) in rows]

    def page_succeeded(
        self, owner: str, since: float, num_items: int, cursor: str | None, budget: ReadBudget | None = None
    ) -> tuple[list[dict[str, Any]], bool, str]:
        """One page of succeeded jobs, oldest first by ``completedAt``: (page, is_done, continue_cursor)."""
        after = _decode_cursor(cursor) if cursor else None
        params: list[Any]
        if after is None:
            where, params = "completed_at >= ?", [since]
        else:
            where = "completed_at >= ? AND (completed_at > ? OR (completed_at = ? AND job_id > ?))"
            params = [since, after[0], after[0], after[1]]
        rows = self._db.execute(
            f"SELECT completed_at, job_id, doc FROM media_jobs WHERE owner = ? AND status = 'succeeded' AND {where}"
            " ORDER BY completed_at, job_id LIMIT ?",
            (owner, *params, num_items + 1),
        ).fetchall()
        page = rows[:num_items]
        is_done = len(rows) <= num_items
        if page:
            continue_cursor = _encode_cursor(page[-1][0], page[-1][1])
        else:
            continue_cursor = cursor or _encode_cursor(since, "")
        docs = [_read(budget, doc) for _, _, doc in rows]  # the row read past the page counts: stricter
        return docs[:num_items], is_done, continue_cursor


def _read(budget: ReadBudget | None, text: str) -> dict[str, Any]:
    if budget is None:
        doc: dict[str, Any] = json.loads(text)
        return doc
    return budget.read(text)


def _completed_at(doc: dict[str, Any]) -> float | None:
    value = doc.get("completedAt")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _encode_cursor(completed_at: float, job_id: str) -> str:
    raw = json.dumps([completed_at, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        completed_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
        if isinstance(completed_at, (int, float)) and isinstance(job_id, str):
            return float(completed_at), job_id
    except (ValueError, TypeError, UnicodeEncodeError):
        pass
    raise PageCursorError(f"invalid pagination cursor {cursor[:40]!r}")
