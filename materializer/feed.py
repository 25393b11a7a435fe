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
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AnswerVerdict", "Coverage", "Gap", "unreported_part"]


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
