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

Nothing may block a feed for good:

- **Size.** An answer that does not come (the function failed, as Convex's
  16 MiB read limit fails a window of large jobs; the transition was too
  large to take; the value was not a list) shrinks the window (:class:`Window`),
  halving ``limit`` down to one job; good answers grow it back, doubling
  toward the configured limit, first after :data:`REGROW_FIRST_MS` and
  twice as long after each regrowth that failed again.
- **Dates.** Time is the server's (the daemon passes ``now_ms`` from the
  sync protocol's ``serverTs``). A job dated more than
  :data:`FUTURE_TOLERANCE_MS` after it, or at or before 1970, is reported
  once as an :class:`Anomaly` (and materialized like any other). The newest
  ``limit`` jobs being all dated in the future hides every honest job behind
  them from ``listSucceededSince`` (it has no upper bound): the feed then
  lists the honest range with the page query on every answer and every
  :data:`HIDDEN_RECHECK_MS` (:meth:`SucceededFeed.tick`), or, where there is
  no page query, reports it once.
- **The first cursor** comes from the server's clock too: a feed started
  with a :class:`CursorStart` checks its first answer's ``since`` against
  the server's now minus the look-back (and a stored cursor dated after the
  server's now is pulled back), re-subscribing where they differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from materializer.finite import is_finite_number

__all__ = [
    "AdvanceCursor",
    "Anomaly",
    "AnswerVerdict",
    "Coverage",
    "CursorStart",
    "Decision",
    "FailedFeed",
    "FillGap",
    "Gap",
    "GapOutcome",
    "Narrow",
    "NoteFailed",
    "Observe",
    "ReportAnomalies",
    "ReportGap",
    "StartCursor",
    "SucceededFeed",
    "Window",
    "date_anomaly",
    "next_cursor",
    "unreported_part",
]

#: The succeeded subscription moves its ``since`` up to the cursor once that would drop this
#: fraction (1/n) of its limit from its window: well before the window fills up, not on every job
#: (new args make the server send the whole window again).
NARROW_FRACTION = 16
#: A window made smaller may grow back this long after the failure that shrank it; each regrowth
#: that fails again doubles the wait, up to REGROW_MAX_MS (a window too large to answer costs the
#: server a full read each time it is asked for).
REGROW_FIRST_MS = 1_000.0
REGROW_MAX_MS = 300_000.0
#: How far after the server's now a ``completedAt`` may lie and still be honest: the machines that
#: stamp jobs (the backend, a provider's webhook) keep clocks that differ by a little.
FUTURE_TOLERANCE_MS = 5 * 60_000.0
#: While the window is full of jobs dated in the future, the honest range behind them is listed again
#: this often (their completions change no answer, so no transition would ever tell of them).
HIDDEN_RECHECK_MS = 2_000.0


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
        """The gap's jobs were listed (page query) or given up (reported): the range now spans it.

        A gap below the window (the usual one) extends the range down; a hidden range listed up to
        now (:meth:`SucceededFeed.tick`) extends it up, or starts it.
        """
        if self.range is None:
            self.range = (gap.from_ms, gap.until_ms)
            return self.range
        start = min(self.range[0], gap.from_ms)
        before = self._before_gap
        if before is not None and before[1] >= gap.from_ms:
            start = min(start, before[0])
        end = gap.until_ms if gap.from_ms <= self.range[1] < gap.until_ms else self.range[1]
        self.range, self._before_gap = (start, end), None
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


# -- the window, dates and the first cursor -----------------------------------------------------------------


class Window:
    """How many jobs a feed's subscription asks for (its ``limit``): smaller after bad answers, back after good.

    A bad answer at the current size halves it, down to one job. A good answer at the current size
    lets it double again toward the configured size once ``now`` reaches the regrowth moment: at
    first :data:`REGROW_FIRST_MS` after the last failure, twice as long after each regrowth that
    failed again (at most :data:`REGROW_MAX_MS`), and back to the first wait once it holds the
    configured size. Answers for another size (args already replaced) change nothing.
    """

    def __init__(self, configured: int) -> None:
        self.configured = configured
        self.size = configured
        self._answered = True  # whether the current size has had a good answer
        self._last_good: int | None = None  # the size of the last good answer
        self._wait = REGROW_FIRST_MS
        self._regrow_at = -math.inf

    def failed(self, size: int, now_ms: float) -> int | None:
        """A bad answer for ``size``: the size to ask for next, or None (stale, or one job already)."""
        if size != self.size:
            return None
        if self._last_good is not None and size > self._last_good:  # a regrowth failed: wait longer next time
            self._wait = min(self._wait * 2, REGROW_MAX_MS)
        self._regrow_at = now_ms + self._wait
        self._answered = False
        if size <= 1:
            return None
        self.size = max(1, size // 2)
        return self.size

    def answered(self, size: int, now_ms: float) -> int | None:
        """A good answer for ``size``: the size to ask for next, if it is time to grow."""
        if size != self.size:
            return None
        self._answered, self._last_good = True, size
        if size >= self.configured:
            self._wait = REGROW_FIRST_MS
            return None
        return self.grow(now_ms)

    def grow(self, now_ms: float) -> int | None:
        """Time passed: the size to ask for next, if it is time to grow (a timer calls this too)."""
        if not self._answered or self.size >= self.configured or now_ms < self._regrow_at:
            return None
        self.size, self._answered = min(self.configured, self.size * 2), False
        return self.size

    def due_ms(self) -> float | None:
        """When :meth:`grow` may next say yes (None: not until another answer)."""
        return self._regrow_at if self._answered and self.size < self.configured else None


def date_anomaly(completed_at_ms: float, server_now_ms: float) -> str | None:
    """Why a ``completedAt`` cannot be an honest moment of completion, or None when it can be."""
    if completed_at_ms <= 0:
        return f"completedAt is {completed_at_ms:g}, not a moment after 1970"
    ahead = completed_at_ms - server_now_ms
    if ahead > FUTURE_TOLERANCE_MS:
        return f"completedAt is {_span(ahead)} after the server's now"
    return None


def _span(ms: float) -> str:
    for unit, size in (("days", 86_400_000), ("hours", 3_600_000), ("minutes", 60_000)):
        if ms >= size:
            return f"{ms / size:.1f} {unit}"
    return f"{ms / 1000:.1f} seconds"


@dataclass(frozen=True, slots=True)
class CursorStart:
    """A feed's cursor as the ledger held it at start (None: never set), and a first start's look-back.

    Before any answer the daemon knows only its own clock, so it subscribes from
    :meth:`provisional`; the first answer carries the server's, and :meth:`check` says where the
    cursor really starts: a first cursor is the server's now minus the look-back (the provisional
    one is kept when the two clocks agree within :data:`FUTURE_TOLERANCE_MS`), and a stored cursor
    dated after the server's now is pulled back to the same.
    """

    stored_ms: float | None
    lookback_ms: float

    def provisional(self, local_now_ms: float) -> float:
        return self.stored_ms if self.stored_ms is not None else local_now_ms - self.lookback_ms

    def check(self, feed: FeedName, since: float, server_now_ms: float) -> StartCursor:
        fresh = server_now_ms - self.lookback_ms
        if self.stored_ms is None:
            if abs(since - fresh) <= FUTURE_TOLERANCE_MS:
                return StartCursor(feed, since)
            return StartCursor(feed, fresh, f"the local clock is {_span(abs(since - fresh))} "
                                            f"{'ahead of' if since > fresh else 'behind'} the server's: the first "
                                            "cursor comes from the server's")
        if self.stored_ms > server_now_ms + FUTURE_TOLERANCE_MS:
            return StartCursor(feed, fresh, f"the stored cursor is {_span(self.stored_ms - server_now_ms)} after the "
                                            "server's now: pulled back to its look-back")
        return StartCursor(feed, self.stored_ms)


# -- decisions the daemon carries out ---------------------------------------------------------------

FeedName: TypeAlias = Literal["succeeded", "failed"]


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
    """List the gap's jobs with the page query and observe them; then :meth:`SucceededFeed.gap_outcome`.

    ``hidden``: the range is the honest one behind a window full of jobs dated in the future, listed
    again and again (tell :meth:`SucceededFeed.hidden_outcome` instead, and log it quietly);
    ``list_all``: list on past the gap's end, to the last job (the first time: the future-dated jobs
    that are in neither the window nor the honest range are found so). Hand every page listed to
    :meth:`SucceededFeed.listed`.
    """

    gap: Gap
    hidden: bool = False
    list_all: bool = False


@dataclass(frozen=True, slots=True)
class ReportGap:
    """Tell the person (log, ``status``, the sidebar) that ``gap`` cannot be listed, and keep the report."""

    gap: Gap
    reason: str
    covered_until_ms: float


@dataclass(frozen=True, slots=True)
class AdvanceCursor:
    """Move the feed's cursor as far as ``[covered_from_ms, covered_until_ms]`` allows (:func:`next_cursor`)."""

    feed: FeedName
    covered_from_ms: float
    covered_until_ms: float


@dataclass(frozen=True, slots=True)
class Narrow:
    """Subscribe with these args instead; ``why`` (when set) is worth a log line."""

    feed: FeedName
    since_ms: float
    limit: int
    why: str = ""


@dataclass(frozen=True, slots=True)
class StartCursor:
    """Put the feed's cursor at ``since_ms`` (a first start, or one pulled back); ``why`` when it moved."""

    feed: FeedName
    since_ms: float
    why: str = ""


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Something in a feed no honest backend sends, reported once: a job's date (``job_id``) or a feed
    that cannot be answered even one job at a time (``job_id`` None)."""

    job_id: str | None
    reason: str
    completed_at_ms: float | None
    server_now_ms: float


@dataclass(frozen=True, slots=True)
class ReportAnomalies:
    """Tell the person (log, the sidebar) about each anomaly, and keep the job ids reported."""

    anomalies: tuple[Anomaly, ...]


Decision: TypeAlias = (Observe | NoteFailed | FillGap | ReportGap | AdvanceCursor | Narrow | StartCursor
                       | ReportAnomalies)
#: How filling a gap went: its jobs were listed, the backend has no page query (with the reason),
#: or a passing fault stopped it (tried again with the next answer).
GapOutcome: TypeAlias = Literal["filled", "absent", "failed"]


def _job_ids(docs: Sequence[Any]) -> dict[str, Any]:
    return {d["jobId"]: d for d in docs if isinstance(d, dict) and isinstance(d.get("jobId"), str)}


def _completed(docs: Sequence[Any]) -> list[float]:
    return [float(d["completedAt"]) for d in docs if isinstance(d, dict) and is_finite_number(d.get("completedAt"))]


class _Subscribed:
    """What a feed's subscription is and how it fares: its window, the answer ``since``, failures at one job."""

    def __init__(self, feed: FeedName, limit: int, start: CursorStart | None) -> None:
        self.feed: FeedName = feed
        self.window = Window(limit)
        self.start = start
        self.since = -math.inf  # of the answer being handled
        self.stuck_reported = False

    def first_answer(self, since: float, now_ms: float) -> list[Decision] | None:
        """At the first answer: where the cursor starts, and a new subscription if not from ``since``.

        None once started; a list ending in :class:`Narrow` means this answer is for the wrong
        ``since`` and is dropped.
        """
        if self.start is None:
            return None
        start, self.start = self.start.check(self.feed, since, now_ms), None
        if start.since_ms == since:
            return [start]
        return [start, Narrow(self.feed, start.since_ms, self.window.size)]

    def good(self, since: float, limit: int, now_ms: float) -> list[Decision]:
        self.since, self.stuck_reported = since, False
        grown = self.window.answered(limit, now_ms)
        return [] if grown is None else [Narrow(self.feed, since, grown)]

    def bad(self, since: float, limit: int, reason: str, now_ms: float) -> list[Decision]:
        stale = limit != self.window.size
        smaller = self.window.failed(limit, now_ms)
        if smaller is not None:
            return [Narrow(self.feed, since, smaller, f"{reason}; asking for the newest {smaller} instead")]
        if stale or self.stuck_reported:
            return []
        self.stuck_reported = True
        return [ReportAnomalies((Anomaly(None, f"the {self.feed} feed cannot be answered even one job at a time "
                                               f"({reason}); jobs completed since then wait behind it",
                                         since, now_ms),))]

    def tick(self, now_ms: float) -> list[Decision]:
        grown = self.window.grow(now_ms) if self.since > -math.inf else None
        return [] if grown is None else [Narrow(self.feed, self.since, grown)]


class SucceededFeed:
    """The succeeded subscription's bookkeeping, from its answers to its cursor.

    ``reported`` holds the earlier gap reports (their range and what their answer covered), so a
    restart does not report the same stretch again; ``anomalies`` the job ids already reported as
    anomalies. ``start`` (when the cursor is to be checked against the server's clock) is what the
    ledger held at start; without it the cursor is taken as set.
    """

    def __init__(self, limit: int, reported: Sequence[tuple[float, float]] = (), *,
                 anomalies: Iterable[str] = (), start: CursorStart | None = None) -> None:
        self.coverage = Coverage()
        self._subscription = _Subscribed("succeeded", limit, start)
        self._reported = list(reported)
        self._anomalies = set(anomalies)
        self._page_query: bool | None = None
        self._open_gap: Gap | None = None
        self._gap: Gap | None = None  # found by the answer being handled
        self._last_answer: dict[str, Any] = {}
        self._subscribed_since = -math.inf
        self._window: list[float] = []
        self._now_ms = -math.inf  # the server's now, as of the last answer or tick
        self._hidden: int | None = None  # while the window is full of future-dated jobs: how many
        self._hidden_due = math.inf  # when to list the honest range behind them again
        self._listing = False  # a listing of it is under way
        self._listed_all = False  # it was listed to the last job once (in this episode)
        self._hidden_reported = False

    @property
    def window(self) -> Window:
        return self._subscription.window

    @property
    def page_query(self) -> bool | None:
        """Whether the backend has the page query, as learned on this connection (None: not asked)."""
        return self._page_query

    def connected(self) -> None:
        """A new connection may be to a redeployed backend: ask about the page query again."""
        self._page_query = None
        if self._hidden is not None and not self._listing:
            self._hidden_due = -math.inf  # at the next tick

    def answer(self, since: float, limit: int, docs: Sequence[Any], now_ms: float) -> list[Decision]:
        """An answer of ``listSucceededSince(since, limit)`` at the server's ``now_ms``: observe what is new in it.

        Every answer repeats the whole window, so only documents that changed since the previous
        answer are handed on. Then call :meth:`observed`.
        """
        self._now_ms = max(self._now_ms, now_ms)
        started = self._subscription.first_answer(since, now_ms)
        if started and isinstance(started[-1], Narrow):
            return started
        decisions: list[Decision] = list(started or [])
        grow = self._subscription.good(since, limit, now_ms)
        fresh = tuple(d for d in docs if not _same_doc(self._last_answer, d))
        self._last_answer = _job_ids(docs)
        completed = _completed(docs)
        decisions.append(Observe(fresh))
        anomalies = self._anomalies_in(docs, now_ms)
        if anomalies:
            decisions.append(ReportAnomalies(anomalies))
        self._subscribed_since = max(self._subscribed_since, since)
        self._gap, self._open_gap = self._open_gap, None
        self._window = completed
        if len(docs) >= limit and completed and min(completed) > now_ms + FUTURE_TOLERANCE_MS:
            # The newest `limit` jobs are all dated in the future: the answer says nothing of now.
            if not self._listing:  # every answer looks again
                self._hidden_due = -math.inf
            self._hidden = len(docs)
            return [*decisions, *grow]
        self._hidden, self._hidden_due, self._hidden_reported, self._listed_all = None, math.inf, False, False
        # A job dated in the future must not carry the cursor past jobs completing meanwhile.
        vouched = min(max(completed), now_ms) if completed else since
        verdict = self.coverage.answer(since, limit, len(docs), completed, vouched)
        self._gap = verdict.gap or self._gap
        return [*decisions, *grow]

    def failed(self, since: float, limit: int, reason: str, now_ms: float) -> list[Decision]:
        """No usable answer to ``listSucceededSince(since, limit)`` (the function failed, the answer was too
        large to take, or not a list): ask for fewer jobs."""
        self._now_ms = max(self._now_ms, now_ms)
        return self._subscription.bad(since, limit, reason, now_ms)

    def observed(self, new_jobs: int) -> list[Decision]:
        """The ledger took the answer's documents, ``new_jobs`` of them new: fill a gap, move the cursor."""
        decisions: list[Decision] = []
        gap, self._gap = self._gap, None
        if gap is not None:
            if self._page_query is not False:
                return [FillGap(gap)]
            decisions += self._give_up(gap, "the backend has no page query")
        decisions += self._examine_hidden(self._now_ms)
        if not new_jobs:  # new jobs hold the cursor back: it moves when they are materialized
            decisions += self.progress()
        return decisions

    def tick(self, now_ms: float) -> list[Decision]:
        """Time passed (the server's ``now_ms``): grow the window back, list the hidden range again."""
        self._now_ms = max(self._now_ms, now_ms)
        return [*self._subscription.tick(now_ms), *self._examine_hidden(now_ms)]

    def next_tick_ms(self) -> float | None:
        """When :meth:`tick` may next have something to do (None: not before another answer)."""
        due = [t for t in (self.window.due_ms(), self._hidden_due) if t is not None and t < math.inf]
        return min(due, default=None)

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

    def hidden_outcome(self, gap: Gap, outcome: GapOutcome, reason: str = "") -> list[Decision]:
        """How a hidden :class:`FillGap` went: listed up to its end, absent (reported once), or to be tried again."""
        self._listing = False
        if outcome == "failed":
            self._hidden_due = self._now_ms + HIDDEN_RECHECK_MS
            return []
        if outcome == "absent":
            self._page_query = False
            return self._examine_hidden(self._now_ms, reason)
        self._page_query, self._listed_all = True, True
        self._hidden_due = self._now_ms + HIDDEN_RECHECK_MS
        self.coverage.close(gap)
        return self.progress()

    def listed(self, docs: Sequence[Any], now_ms: float) -> list[Decision]:
        """A page the page query listed (for a :class:`FillGap`): the anomalies in it, once each."""
        anomalies = self._anomalies_in(docs, now_ms)
        return [ReportAnomalies(anomalies)] if anomalies else []

    def progress(self) -> list[Decision]:
        """Jobs finished (or an answer came): the cursor may move as far as the coverage allows."""
        covered = self.coverage.range
        return [] if covered is None else [AdvanceCursor("succeeded", *covered)]

    def cursor_moved(self, cursor: float) -> list[Decision]:
        """The ledger's cursor is now ``cursor``: narrow the subscription once that drops a good part of it."""
        if cursor <= self._subscribed_since:
            return []
        size = self.window.size
        if sum(completed < cursor for completed in self._window) < max(1, size // NARROW_FRACTION):
            return []
        self._subscribed_since, self._window = cursor, []
        return [Narrow("succeeded", cursor, size)]

    def _examine_hidden(self, now_ms: float, absent_reason: str = "") -> list[Decision]:
        """While the window is full of future-dated jobs: list the honest range behind it, or report it once."""
        if self._hidden is None:
            self._hidden_due = math.inf
            return []
        covered = self.coverage.range
        start = covered[1] if covered is not None and covered[1] >= self._subscribed_since else self._subscribed_since
        gap = Gap(start, now_ms, self._hidden)
        if self._page_query is False:
            self._hidden_due = math.inf  # until the next connection asks again
            if self._hidden_reported:
                return []
            self._hidden_reported = True
            why = absent_reason or "the backend has no page query"
            return [ReportGap(gap, f"the newest {self._hidden} jobs are all dated after the server's now, and the "
                                   f"jobs completed behind them cannot be listed; {why}", start)]
        if self._listing or now_ms < self._hidden_due:
            return []
        self._listing, self._hidden_due = True, math.inf  # until the outcome
        return [FillGap(gap, hidden=True, list_all=not self._listed_all)]

    def _anomalies_in(self, docs: Sequence[Any], now_ms: float) -> tuple[Anomaly, ...]:
        found = []
        for doc in docs:
            if not isinstance(doc, dict) or not is_finite_number(doc.get("completedAt")):
                continue
            job_id = doc.get("jobId")
            if not isinstance(job_id, str) or job_id in self._anomalies:
                continue
            reason = date_anomaly(float(doc["completedAt"]), now_ms)
            if reason is not None:
                self._anomalies.add(job_id)
                found.append(Anomaly(job_id, reason, float(doc["completedAt"]), now_ms))
        return tuple(found)

    def _give_up(self, found: Gap, reason: str) -> list[Decision]:
        covered_until = self.coverage.range[1] if self.coverage.range is not None else found.until_ms
        gap = unreported_part(found, self._reported)
        self.coverage.close(found)
        if gap is None:
            return []
        self._reported.append((gap.from_ms, covered_until))
        return [ReportGap(gap, reason, covered_until)]


class FailedFeed:
    """The failed subscription: note each failed or ``unknown`` job once, follow with the cursor.

    Its window shrinks and grows back as the succeeded feed's does; ``start`` as there.
    """

    def __init__(self, limit: int, overlap_ms: float, *, start: CursorStart | None = None) -> None:
        self.overlap_ms = overlap_ms
        self._subscription = _Subscribed("failed", limit, start)

    @property
    def window(self) -> Window:
        return self._subscription.window

    def answer(self, since: float, docs: Sequence[Any], now_ms: float, limit: int | None = None) -> list[Decision]:
        """An answer of ``listFailedSince(since, limit)`` at the server's ``now_ms``."""
        started = self._subscription.first_answer(since, now_ms)
        if started and isinstance(started[-1], Narrow):
            return started
        grow = self._subscription.good(since, self.window.size if limit is None else limit, now_ms)
        jobs = tuple(d for d in docs if isinstance(d, dict))
        completed = _completed(jobs)
        decisions: list[Decision] = [*(started or []), NoteFailed(jobs)]
        if completed:
            decisions.append(AdvanceCursor("failed", since, min(max(completed), now_ms)))
        return [*decisions, *grow]

    def failed(self, since: float, limit: int, reason: str, now_ms: float) -> list[Decision]:
        """No usable answer to ``listFailedSince(since, limit)``: ask for fewer jobs."""
        return self._subscription.bad(since, limit, reason, now_ms)

    def tick(self, now_ms: float) -> list[Decision]:
        return self._subscription.tick(now_ms)

    def next_tick_ms(self) -> float | None:
        return self.window.due_ms()

    def cursor_moved(self, cursor: float) -> list[Decision]:
        """Follow the cursor once it has moved past the overlap (each move re-sends the window)."""
        if cursor <= self._subscription.since + self.overlap_ms:
            return []
        return [Narrow("failed", cursor, self.window.size)]


def _same_doc(answer: Mapping[str, Any], doc: Any) -> bool:
    """Whether ``doc`` is exactly as the previous answer had it (and so already in the ledger)."""
    job_id = doc.get("jobId") if isinstance(doc, dict) else None
    return isinstance(job_id, str) and answer.get(job_id) == doc
