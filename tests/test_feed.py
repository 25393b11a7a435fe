"""The succeeded feed's coverage, as plain data: which answers prove a gap and which do not.

The rules follow the one query the real backend has: ``listSucceededSince`` returns the newest
``limit`` jobs since ``since`` (ruuxi/stella-v2 ``backend/convex/media_jobs.ts``), so a full
answer says nothing about jobs older than its oldest one.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from materializer.feed import (
    AdvanceCursor,
    Coverage,
    Decision,
    FailedFeed,
    FillGap,
    Gap,
    Narrow,
    NoteFailed,
    Observe,
    ReportGap,
    SucceededFeed,
    next_cursor,
    unreported_part,
)


def answer(coverage: Coverage, since: float, limit: int, completed: list[float]):
    return coverage.answer(since, limit, len(completed), completed, max(completed, default=since))


def test_an_answer_under_the_limit_covers_everything_since_its_since() -> None:
    coverage = Coverage()
    verdict = answer(coverage, 100, 5, [300, 200])
    assert verdict.gap is None and verdict.covered == (100, 300)


def test_a_full_first_answer_reveals_the_range_below_its_oldest_job() -> None:
    coverage = Coverage()
    verdict = answer(coverage, 100, 3, [500, 400, 300])
    assert verdict.gap == Gap(100, 300, 3)
    assert verdict.covered == (300, 500)  # nothing older is vouched for until the gap is closed or given up
    assert coverage.close(verdict.gap) == (100, 500)


def test_a_full_window_that_filled_while_connected_is_no_gap() -> None:
    """Every job that fell out of the window had been in an earlier answer."""
    coverage = Coverage()
    seen = [110.0]
    assert answer(coverage, 100, 3, seen).gap is None
    for t in (120.0, 130.0, 140.0, 150.0):
        seen = sorted([*seen, t], reverse=True)[:3]
        verdict = answer(coverage, 100, 3, seen)
        assert verdict.gap is None
    assert coverage.range == (100, 150)


def test_a_burst_larger_than_the_window_between_two_answers_is_a_gap_from_the_last_covered_moment() -> None:
    coverage = Coverage()
    answer(coverage, 100, 3, [150, 110])
    verdict = answer(coverage, 100, 3, [400, 300, 200])  # 160..190 may have come and gone unseen
    assert verdict.gap == Gap(150, 200, 3)
    assert coverage.close(verdict.gap) == (100, 400)


def test_narrowing_the_window_keeps_the_range_contiguous() -> None:
    coverage = Coverage()
    answer(coverage, 100, 10, [150, 110])
    verdict = answer(coverage, 140, 10, [160, 150])
    assert verdict.gap is None and verdict.covered == (100, 160)


def test_an_answer_without_usable_jobs_changes_nothing() -> None:
    coverage = Coverage()
    answer(coverage, 100, 10, [150])
    assert coverage.answer(100, 10, 3, [], 100).covered == (100, 150)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=400), max_size=60, unique=True),
       st.integers(min_value=1, max_value=8), st.data())
def test_every_job_in_the_covered_range_was_listed_or_lies_in_a_reported_gap(
        completions: list[int], limit: int, data: st.DataObject) -> None:
    """Jobs complete one by one, in ``completedAt`` order (the backend stamps ``Date.now()`` as it
    commits; jitter beyond that is what the ledger's cursor overlap is for); answers arrive after
    some of them (a disconnect skips answers), and always once at the end (the reconnected socket).

    Whatever the interleaving, each job whose completedAt lies in the covered range was in some
    answer, unless it lies in a gap that was reported.
    """
    since = 0
    coverage = Coverage()
    existing: list[int] = []
    listed: set[int] = set()
    gaps: list[Gap] = []
    for number, t in enumerate(sorted(completions)):
        existing.append(t)
        if number < len(completions) - 1 and not data.draw(st.booleans(), label="answer now"):
            continue
        window = sorted((c for c in existing if c >= since), reverse=True)[:limit]
        verdict = coverage.answer(since, limit, len(window), [float(c) for c in window], float(max(window)))
        listed.update(window)
        if verdict.gap is not None:
            gaps.append(verdict.gap)
            coverage.close(verdict.gap)
    if coverage.range is None:
        return
    lo, hi = coverage.range
    for t in existing:
        if lo <= t <= hi and t not in listed:
            assert any(g.from_ms <= t < g.until_ms for g in gaps), (t, coverage.range, gaps)


def test_a_gap_reported_before_is_not_reported_again_and_an_overlap_only_for_its_new_part() -> None:
    gap = Gap(100, 300, 20)
    assert unreported_part(gap, [(100, 300)]) is None
    assert unreported_part(gap, [(50, 350)]) is None
    assert unreported_part(gap, [(100, 200)]) == Gap(200, 300, 20)
    assert unreported_part(gap, [(150, 200)]) == gap  # a report inside the gap does not cover its start
    assert unreported_part(gap, [(100, 150), (150, 250)]) == Gap(250, 300, 20)


# -- the feeds as state machines -------------------------------------------------------------------------------


class LedgerModel:
    """The ledger's part, as plain data: observed jobs, which are pending, and the cursor (next_cursor)."""

    def __init__(self, cursor: float, overlap_ms: float) -> None:
        self.cursor = cursor
        self.overlap_ms = overlap_ms
        self.seen_max: float | None = None
        self.observed: dict[str, float] = {}
        self.pending: dict[str, float] = {}

    def observe(self, docs: tuple[Any, ...]) -> int:
        new = 0
        for doc in docs:
            if doc["jobId"] not in self.observed:
                self.observed[doc["jobId"]] = doc["completedAt"]
                self.pending[doc["jobId"]] = doc["completedAt"]
                new += 1
            self.seen_max = max(self.seen_max or doc["completedAt"], doc["completedAt"])
        return new

    def advance(self, covered_from: float, covered_until: float) -> float:
        oldest = min(self.pending.values(), default=None)
        self.cursor = next_cursor(self.cursor, self.seen_max, covered_from, covered_until, oldest, self.overlap_ms)
        return self.cursor


def carry_out(feed: SucceededFeed, ledger: LedgerModel, decisions: list[Decision], args: dict[str, float],
              reports: list[ReportGap]) -> None:
    queue = list(decisions)
    while queue:
        decision = queue.pop(0)
        if isinstance(decision, Observe):
            queue += feed.observed(ledger.observe(decision.docs))
        elif isinstance(decision, FillGap):
            queue += feed.gap_outcome(decision.gap, "absent", "no page query")
        elif isinstance(decision, ReportGap):
            reports.append(decision)
        elif isinstance(decision, AdvanceCursor):
            queue += feed.cursor_moved(ledger.advance(decision.covered_from_ms, decision.covered_until_ms))
        elif isinstance(decision, Narrow):
            args["since"] = decision.since_ms
        else:
            raise AssertionError(decision)


ACTIONS = st.lists(st.sampled_from(["complete", "complete", "answer", "finish", "finish", "disconnect"]),
                   min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(ACTIONS, st.integers(min_value=1, max_value=6), st.integers(min_value=0, max_value=2), st.data())
def test_the_succeeded_feed_never_passes_an_unfinished_job_or_hides_one_and_reports_each_gap_once(
        actions: list[str], limit: int, overlap_steps: int, data: st.DataObject) -> None:
    """Jobs complete ten units apart; answers follow while connected (a disconnect skips them until
    the next answer, as a reconnect re-delivers the window); workers finish pending jobs in any order."""
    overlap = overlap_steps * 10.0
    ledger = LedgerModel(cursor=0.0, overlap_ms=overlap)
    feed = SucceededFeed(limit)
    args = {"since": 0.0}
    jobs: dict[str, float] = {}
    reports: list[ReportGap] = []
    connected = True
    for action in [*actions, "answer"]:
        if action == "complete":
            jobs[f"j{len(jobs)}"] = 10.0 * (len(jobs) + 1)
            action = "answer" if connected else action
        if action == "disconnect":
            connected = False
        elif action == "answer":
            connected = True
            window = sorted(((t, j) for j, t in jobs.items() if t >= args["since"]), reverse=True)[:limit]
            docs = [{"jobId": j, "completedAt": t, "status": "succeeded"} for t, j in window]
            carry_out(feed, ledger, feed.answer(args["since"], limit, docs, now_ms=1e9), args, reports)
        elif action == "finish" and ledger.pending:
            job = data.draw(st.sampled_from(sorted(ledger.pending)), label="finished job")
            del ledger.pending[job]
            carry_out(feed, ledger, feed.progress(), args, reports)
        # The cursor never passes an unfinished job (minus the overlap it keeps).
        assert all(ledger.cursor <= t - overlap or ledger.cursor == 0.0 for t in ledger.pending.values())
        # Nothing the cursor has passed is unobserved, unless it lies in a reported gap.
        for job, t in jobs.items():
            if job not in ledger.observed and t < ledger.cursor:
                assert any(r.gap.from_ms <= t < r.gap.until_ms for r in reports), (job, t, ledger.cursor, reports)
    # And the feed never stalls: once every job is finished, the cursor reaches the newest one.
    ledger.pending.clear()
    carry_out(feed, ledger, feed.progress(), args, reports)
    if jobs:
        assert ledger.cursor == max(0.0, max(jobs.values()) - overlap)
    # A gap is reported once: no two reports overlap.
    ranges = sorted((r.gap.from_ms, r.gap.until_ms) for r in reports)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_the_failed_feed_notes_jobs_moves_its_cursor_and_follows_it_past_the_overlap() -> None:
    feed = FailedFeed(limit=50, overlap_ms=2000)
    first: dict[str, Any] = {"jobId": "a", "completedAt": 5000.0, "status": "failed"}
    second: dict[str, Any] = {"jobId": "b", "completedAt": 9000.0, "status": "unknown"}
    decisions = feed.answer(1000, [first, "not a job", second], now_ms=8000)
    assert decisions == [NoteFailed((first, second)), AdvanceCursor("failed", 1000, 8000)]  # never past now
    assert feed.cursor_moved(2500) == []
    assert feed.cursor_moved(6000) == [Narrow("failed", 6000, 50)]


def test_the_page_query_is_learned_once_per_connection() -> None:
    feed = SucceededFeed(limit=2)
    full = [{"jobId": "b", "completedAt": 300.0}, {"jobId": "a", "completedAt": 200.0}]
    assert feed.answer(100, 2, full, now_ms=1000) == [Observe(tuple(full))]
    [fill] = feed.observed(2)
    assert fill == FillGap(Gap(100, 200, 2))
    [report, _advance] = feed.gap_outcome(fill.gap, "absent", "no page query here")
    assert isinstance(report, ReportGap) and report.reason == "no page query here" and feed.page_query is False
    # Later gaps on the same connection are reported without asking again ...
    feed.answer(100, 2, [{"jobId": "d", "completedAt": 900.0}, {"jobId": "c", "completedAt": 800.0}], now_ms=1000)
    assert [type(d) for d in feed.observed(2)] == [ReportGap]
    # ... and a new connection asks again.
    feed.connected()
    feed.answer(100, 2, [{"jobId": "f", "completedAt": 1500.0}, {"jobId": "e", "completedAt": 1400.0}], now_ms=2000)
    assert [type(d) for d in feed.observed(2)] == [FillGap]


def test_next_cursor_waits_for_what_is_not_vouched_for_and_for_pending_jobs() -> None:
    assert next_cursor(100, 500, covered_from=150, covered_until=500, oldest_pending=None, overlap_ms=0) == 100
    assert next_cursor(100, None, covered_from=100, covered_until=500, oldest_pending=None, overlap_ms=0) == 100
    assert next_cursor(100, 400, covered_from=100, covered_until=500, oldest_pending=None, overlap_ms=10) == 390
    assert next_cursor(100, 400, covered_from=50, covered_until=500, oldest_pending=250, overlap_ms=10) == 240
    assert next_cursor(300, 400, covered_from=50, covered_until=500, oldest_pending=250, overlap_ms=10) == 300
