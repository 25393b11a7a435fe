"""What the succeeded feed's answers prove, as plain data: no I/O, no clock.

The real backend's ``media_jobs:listSucceededSince`` returns the newest
``limit`` jobs with ``completedAt >= since`` (at most 200) and nothing else:
no upper bound, no cursor, no page query (ruuxi/stella-v2
``packages/contracts/convex-api.ts``; ``backend/convex/media_jobs.ts``,
``.gte("completedAt", since).order("desc").take(limit)``). An answer that
holds fewer than ``limit`` jobs proves that every job since ``since`` is in
it. A *full* answer proves only that every job from its oldest
``completedAt`` on is in it: older ones may exist that no public query can
list.

Connected, the subscription's answers follow every completion, so a job that
falls out of a full window had been in an earlier answer: :class:`Coverage`
keeps the one contiguous range of ``completedAt`` whose jobs have all been
observed, and a full answer that still overlaps it proves nothing is
missing. Only when a full answer starts above that range (after a restart
with a backlog larger than the window, or a burst of more than ``limit``
completions between two answers) is a range uncovered: a :class:`Gap`.

A gap is closed with a page query where the backend has one; where it has
none, the gap is reported once, with its range, and given up, so the cursor
can move on (no query could ever reach those jobs; ``replay`` cannot either).

:class:`SucceededFeed` and :class:`FailedFeed` are the feeds' whole state, in
the manner of :mod:`materializer.convex.protocol`: the daemon tells them what
happened (an answer came, the ledger took these documents, a gap was or was
not filled, the cursor moved, a socket connected) and carries out the
decisions they return, in order. :func:`next_cursor` is the rule the ledger
applies when it moves a cursor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from materializer.finite import is_finite_number

__all__ = [
    "AdvanceCursor",
    "AnswerVerdict",
    "Coverage",
    "Decision",
    "FailedFeed",
    "FillGap",
    "Gap",
    "GapOutcome",
    "Narrow",
    "NoteFailed",
    "Observe",
    "ReportGap",
    "SucceededFeed",
    "next_cursor",
    "unreported_part",
]

#: The succeeded subscription moves its ``since`` up to the cursor once that would drop this
#: fraction (1/n) of its limit from its window: well before the window fills up, not on every job
#: (new args make the server send the whole window again).
NARROW_FRACTION = 16


@dataclass(frozen=True, slots=True)
class Gap:
    """Jobs that completed in ``[from_ms, until_ms)`` may exist that were never listed.

    ``jobs_at_least`` is what the full answer proves: at least that many jobs
    completed from ``from_ms`` on (the backend listed only the newest of them,
    all at or after ``until_ms``). How many of them are missing no public
    query can tell.
    """

    from_ms: float
    until_ms: float
    jobs_at_least: int


@dataclass(frozen=True, slots=True)
class AnswerVerdict:
    """What one answer changed: the range now known observed, and the gap it revealed, if any."""

    covered: tuple[float, float] | None
    gap: Gap | None


class Coverage:
    """The contiguous range of ``completedAt`` whose jobs have all been observed (or given up)."""

    def __init__(self) -> None:
        self.range: tuple[float, float] | None = None
        self._before_gap: tuple[float, float] | None = None

    def answer(self, since: float, limit: int, listed: int, completed: list[float],
               vouched_until: float) -> AnswerVerdict:
        """Take one answer to ``listSucceededSince(since, limit)``.

        ``listed`` is how many items the answer held, ``completed`` the
        ``completedAt`` of the usable ones, ``vouched_until`` the newest moment
        the answer speaks for (its newest job, never past now). The caller
        observes the answer's jobs before it acts on the verdict.
        """
        if not completed:
            return AnswerVerdict(self.range, None)
        oldest = min(completed)
        full = listed >= limit and oldest > since
        start = oldest if full else since
        previous = self.range
        gap = None
        if full and (previous is None or previous[1] < oldest or previous[0] > oldest):
            gap_from = since if previous is None or not since < previous[1] < oldest else previous[1]
            gap = Gap(gap_from, oldest, listed)
            self._before_gap = previous
        if previous is not None and previous[0] <= vouched_until and previous[1] >= start:
            start, end = min(previous[0], start), max(previous[1], vouched_until)
        else:
            end = vouched_until
        self.range = (start, end)
        return AnswerVerdict(self.range, gap)

    def close(self, gap: Gap) -> tuple[float, float]:
        """The gap's jobs were listed (page query) or given up (reported): the range now spans it."""
        assert self.range is not None, "a gap comes from an answer, which sets the range"
        start = min(self.range[0], gap.from_ms)
        before = self._before_gap
        if before is not None and before[1] >= gap.from_ms:
            start = min(start, before[0])
        self.range, self._before_gap = (start, self.range[1]), None
        return self.range


def unreported_part(gap: Gap, reported: list[tuple[float, float]]) -> Gap | None:
    """What of ``gap`` no earlier report covers, or None when it was all reported already.

    ``reported`` holds, per earlier report, the range it gave up together with what its answer
    listed. The cursor stays a little behind the newest finished job (its overlap against clock
    skew), so after a restart a window can come back full over such a range: the same jobs, not a
    new gap. Ranges that overlap the start of the gap move its start up.
    """
    start = gap.from_ms
    for from_ms, until_ms in sorted(reported):
        if from_ms <= start < until_ms:
            start = until_ms
    if start >= gap.until_ms:
        return None
    return Gap(start, gap.until_ms, gap.jobs_at_least)


def next_cursor(since: float, seen_max: float | None, covered_from: float, covered_until: float,
                oldest_pending: float | None, overlap_ms: float) -> float:
    """Where a cursor may move: never past what was observed, an unfinished job or an uncovered range.

    ``[covered_from, covered_until]`` is vouched for (every job in it observed); ``seen_max`` is the
    newest ``completedAt`` observed; ``oldest_pending`` the oldest job not yet finished. The cursor
    stays ``overlap_ms`` behind the bound against clock skew and never moves back.
    """
    if covered_from > since or seen_max is None:
        return since  # [since, covered_from) is not vouched for
    bound = min(covered_until, seen_max)
    if oldest_pending is not None:
        bound = min(bound, oldest_pending)
    return max(since, bound - overlap_ms)


# -- decisions the daemon carries out ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observe:
    """Record these job documents in the ledger, then tell the feed with :meth:`SucceededFeed.observed`."""

    docs: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class NoteFailed:
    """Record these failed or ``unknown`` job documents (one notice per job)."""

    docs: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True, slots=True)
class FillGap:
    """List the gap's jobs with the page query and observe them; then :meth:`SucceededFeed.gap_outcome`."""

    gap: Gap


@dataclass(frozen=True, slots=True)
class ReportGap:
    """Tell the person (log, ``status``, the sidebar) that ``gap`` cannot be listed, and keep the report."""

    gap: Gap
    reason: str
    covered_until_ms: float


@dataclass(frozen=True, slots=True)
class AdvanceCursor:
    """Move the feed's cursor as far as ``[covered_from_ms, covered_until_ms]`` allows (:func:`next_cursor`)."""

    feed: Literal["succeeded", "failed"]
    covered_from_ms: float
    covered_until_ms: float


@dataclass(frozen=True, slots=True)
class Narrow:
    """Subscribe with these args instead."""

    feed: Literal["succeeded", "failed"]
    since_ms: float
    limit: int


Decision: TypeAlias = Observe | NoteFailed | FillGap | ReportGap | AdvanceCursor | Narrow
#: How filling a gap went: its jobs were listed, the backend has no page query (with the reason),
#: or a passing fault stopped it (tried again with the next answer).
GapOutcome: TypeAlias = Literal["filled", "absent", "failed"]


def _job_ids(docs: Sequence[Any]) -> dict[str, Any]:
    return {d["jobId"]: d for d in docs if isinstance(d, dict) and isinstance(d.get("jobId"), str)}


class SucceededFeed:
    """The succeeded subscription's bookkeeping, from its answers to its cursor.

    ``reported`` holds the earlier gap reports (their range and what their answer covered), so a
    restart does not report the same stretch again.
    """

    def __init__(self, limit: int, reported: Sequence[tuple[float, float]] = ()) -> None:
        self.limit = limit
        self.coverage = Coverage()
        self._reported = list(reported)
        self._page_query: bool | None = None
        self._open_gap: Gap | None = None
        self._gap: Gap | None = None  # found by the answer being handled
        self._last_answer: dict[str, Any] = {}
        self._subscribed_since = -math.inf
        self._window: list[float] = []

    @property
    def page_query(self) -> bool | None:
        """Whether the backend has the page query, as learned on this connection (None: not asked)."""
        return self._page_query

    def connected(self) -> None:
        """A new connection may be to a redeployed backend: ask about the page query again."""
        self._page_query = None

    def answer(self, since: float, limit: int, docs: Sequence[Any], now_ms: float) -> list[Decision]:
        """An answer of ``listSucceededSince(since, limit)``: observe what is new in it.

        Every answer repeats the whole window, so only documents that changed since the previous
        answer are handed on. Then call :meth:`observed`.
        """
        fresh = tuple(d for d in docs if not _same_doc(self._last_answer, d))
        self._last_answer = _job_ids(docs)
        completed = [float(d["completedAt"]) for d in docs if isinstance(d, dict)
                     and is_finite_number(d.get("completedAt"))]
        # A job dated in the future must not carry the cursor past jobs completing meanwhile.
        vouched = min(max(completed), now_ms) if completed else since
        verdict = self.coverage.answer(since, limit, len(docs), completed, vouched)
        self._gap = verdict.gap or self._open_gap
        self._open_gap = None
        self._window = completed
        self._subscribed_since = max(self._subscribed_since, since)
        return [Observe(fresh)]

    def observed(self, new_jobs: int) -> list[Decision]:
        """The ledger took the answer's documents, ``new_jobs`` of them new: fill a gap, move the cursor."""
        decisions: list[Decision] = []
        gap, self._gap = self._gap, None
        if gap is not None:
            if self._page_query is not False:
                return [FillGap(gap)]
            decisions += self._give_up(gap, "the backend has no page query")
        if not new_jobs:  # new jobs hold the cursor back: it moves when they are materialized
            decisions += self.progress()
        return decisions

    def gap_outcome(self, gap: Gap, outcome: GapOutcome, reason: str = "") -> list[Decision]:
        """How :class:`FillGap` went."""
        if outcome == "failed":
            self._open_gap = gap
            return []
        if outcome == "filled":
            self._page_query = True
            self.coverage.close(gap)
            return self.progress()
        self._page_query = False
        return [*self._give_up(gap, reason or "the backend has no page query"), *self.progress()]

    def progress(self) -> list[Decision]:
        """Jobs finished (or an answer came): the cursor may move as far as the coverage allows."""
        covered = self.coverage.range
        return [] if covered is None else [AdvanceCursor("succeeded", *covered)]

    def cursor_moved(self, cursor: float) -> list[Decision]:
        """The ledger's cursor is now ``cursor``: narrow the subscription once that drops a good part of it."""
        if cursor <= self._subscribed_since:
            return []
        if sum(completed < cursor for completed in self._window) < max(1, self.limit // NARROW_FRACTION):
            return []
        self._subscribed_since, self._window = cursor, []
        return [Narrow("succeeded", cursor, self.limit)]

    def _give_up(self, found: Gap, reason: str) -> list[Decision]:
        covered_until = self.coverage.range[1] if self.coverage.range is not None else found.until_ms
        gap = unreported_part(found, self._reported)
        self.coverage.close(found)
        if gap is None:
            return []
        self._reported.append((gap.from_ms, covered_until))
        return [ReportGap(gap, reason, covered_until)]


class FailedFeed:
    """The failed subscription: note each failed or ``unknown`` job once, follow with the cursor."""

    def __init__(self, limit: int, overlap_ms: float) -> None:
        self.limit = limit
        self.overlap_ms = overlap_ms
        self._since = -math.inf  # of the answer being handled

    def answer(self, since: float, docs: Sequence[Any], now_ms: float) -> list[Decision]:
        self._since = since
        jobs = tuple(d for d in docs if isinstance(d, dict))
        completed = [float(d["completedAt"]) for d in jobs if is_finite_number(d.get("completedAt"))]
        decisions: list[Decision] = [NoteFailed(jobs)]
        if completed:
            decisions.append(AdvanceCursor("failed", since, min(max(completed), now_ms)))
        return decisions

    def cursor_moved(self, cursor: float) -> list[Decision]:
        """Follow the cursor once it has moved past the overlap (each move re-sends the window)."""
        return [Narrow("failed", cursor, self.limit)] if cursor > self._since + self.overlap_ms else []


def _same_doc(answer: Mapping[str, Any], doc: Any) -> bool:
    """Whether ``doc`` is exactly as the previous answer had it (and so already in the ledger)."""
    job_id = doc.get("jobId") if isinstance(doc, dict) else None
    return isinstance(job_id, str) and answer.get(job_id) == doc
