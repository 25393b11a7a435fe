"""The feeds as plain data: which answers prove a gap, how the window shrinks and grows back, what dates say.

The rules follow the one query the real backend has: ``listSucceededSince`` returns the newest
``limit`` jobs since ``since`` (ruuxi/stella-v2 ``backend/convex/media_jobs.ts``), so a full
answer says nothing about jobs older than its oldest one.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from materializer.feed import (
    FUTURE_TOLERANCE_MS,
    HIDDEN_RECHECK_MS,
    REGROW_FIRST_MS,
    REGROW_MAX_MS,
    AdvanceCursor,
    Coverage,
    CursorStart,
    Decision,
    FailedFeed,
    FillGap,
    Gap,
    Narrow,
    NoteFailed,
    Observe,
    ReportAnomalies,
    ReportGap,
    StartCursor,
    SucceededFeed,
    Window,
    date_anomaly,
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


# -- the window: shrinking on bad answers, growing back ---------------------------------------------------------


def test_the_window_halves_on_bad_answers_down_to_one_job_and_doubles_back_after_a_growing_wait() -> None:
    window = Window(200)
    assert [window.failed(size, 0.0) for size in (200, 100, 50, 25)] == [100, 50, 25, 12]
    assert window.failed(200, 0.0) is None  # an answer for args already replaced changes nothing
    assert window.answered(12, 500.0) is None  # good, but too soon: the first wait is REGROW_FIRST_MS
    assert window.due_ms() == REGROW_FIRST_MS
    assert window.grow(REGROW_FIRST_MS) == 24
    assert window.failed(24, 2_000.0) == 12  # the regrowth failed: twice the wait before the next one
    assert window.answered(12, 2_000.0) is None and window.due_ms() == 2_000.0 + 2 * REGROW_FIRST_MS
    assert window.grow(4_000.0) == 24
    assert window.answered(24, 4_000.0) == 48  # a regrowth that holds grows again at once
    assert [window.answered(size, 4_000.0) for size in (48, 96, 192)] == [96, 192, 200]
    assert window.answered(200, 4_000.0) is None and window.due_ms() is None
    assert window.failed(200, 9_000.0) == 100 and window.due_ms() is None  # not before a good answer
    window.answered(100, 9_000.0)
    assert window.due_ms() == 9_000.0 + REGROW_FIRST_MS  # back to the first wait once it held 200


def test_a_feed_asks_for_half_as_many_jobs_after_a_bad_answer_with_the_reason() -> None:
    feed = SucceededFeed(limit=200)
    [narrow] = feed.failed(100.0, 200, "Too many bytes read", now_ms=1_000.0)
    assert narrow == Narrow("succeeded", 100.0, 100, "Too many bytes read; asking for the newest 100 instead")
    assert feed.failed(100.0, 200, "again", now_ms=1_000.0) == []  # for the replaced args


def test_a_feed_that_fails_even_for_one_job_reports_it_once_and_carries_on() -> None:
    feed = FailedFeed(limit=2, overlap_ms=0)
    assert feed.failed(100.0, 2, "boom", 0.0) == [Narrow("failed", 100.0, 1, "boom; asking for the newest 1 instead")]
    [report] = feed.failed(100.0, 1, "boom", 0.0)
    assert isinstance(report, ReportAnomalies)
    [anomaly] = report.anomalies
    assert anomaly.job_id is None and "cannot be answered even one job at a time (boom)" in anomaly.reason
    assert feed.failed(100.0, 1, "boom", 0.0) == []  # once
    # A good answer, once the wait is over, grows it back.
    assert feed.answer(100.0, [], now_ms=5_000.0, limit=1) == [NoteFailed(()), Narrow("failed", 100.0, 2)]


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=200),
       st.lists(st.tuples(st.sampled_from(["fail", "answer", "tick", "stale"]), st.floats(0, 400_000)), max_size=40))
def test_the_window_always_returns_to_the_configured_limit_after_errors_stop(
        configured: int, events: list[tuple[str, float]]) -> None:
    """Whatever failed before, once answers stop failing the window is back at the configured size after
    a bounded number of answers and ticks (time passing, as the daemon's timer does)."""
    feed = SucceededFeed(limit=configured)
    now, limit = 0.0, configured
    for event, step in events:
        now += step
        if event == "fail":
            decisions = feed.failed(0.0, limit, "x", now)
        elif event == "answer":
            decisions = feed.answer(0.0, limit, [], now)
        elif event == "tick":
            decisions = feed.tick(now)
        else:
            decisions = feed.failed(0.0, limit + 1, "x", now)
        limit = next((d.limit for d in decisions if isinstance(d, Narrow)), limit)
        assert 1 <= feed.window.size <= configured and limit == feed.window.size
    for _ in range(4 * configured.bit_length() + 4):  # errors stopped: good answers and ticks only
        now += REGROW_MAX_MS
        for decisions in (feed.answer(0.0, limit, [], now), feed.tick(now)):
            limit = next((d.limit for d in decisions if isinstance(d, Narrow)), limit)
    assert feed.window.size == limit == configured


# -- dates: anomalies, and honest jobs behind a window dated in the future ------------------------------------

NOW = 1_800_000_000_000.0
FUTURE = NOW + 10 * 365.25 * 86_400_000  # ten years ahead (a ms/us mix-up, a bad clock)


def test_a_job_dated_after_the_servers_now_or_not_after_1970_is_an_anomaly_reported_once() -> None:
    assert date_anomaly(NOW + 60_000, NOW) is None  # clocks differ a little
    assert date_anomaly(NOW + FUTURE_TOLERANCE_MS + 3_600_000, NOW) == "completedAt is 1.1 hours after the server's now"
    assert date_anomaly(0.0, NOW) == "completedAt is 0, not a moment after 1970"
    assert date_anomaly(-5.0, NOW) == "completedAt is -5, not a moment after 1970"
    feed = SucceededFeed(limit=10, anomalies=["known"])
    docs = [{"jobId": "future", "completedAt": FUTURE}, {"jobId": "zero", "completedAt": 0.0},
            {"jobId": "known", "completedAt": FUTURE}, {"jobId": "honest", "completedAt": NOW - 5.0}]
    [observe, report] = feed.answer(NOW - 1_000.0, 10, docs, now_ms=NOW)
    assert observe == Observe(tuple(docs))  # all of them are materialized
    assert isinstance(report, ReportAnomalies)
    assert [(a.job_id, a.completed_at_ms, a.server_now_ms) for a in report.anomalies] == [
        ("future", FUTURE, NOW), ("zero", 0.0, NOW)]
    assert "days after the server's now" in report.anomalies[0].reason
    assert feed.answer(NOW - 1_000.0, 10, docs, now_ms=NOW + 1) == [Observe(())]  # once
    # A job dated in the future does not carry the coverage (and so the cursor) past the server's now.
    assert feed.coverage.range == (NOW - 1_000.0, NOW + 1)


def pages_since(jobs: dict[str, float], since: float, until: float | None) -> list[dict[str, Any]]:
    """What the page query lists: oldest first from ``since``, up to the first job past ``until`` (None: all)."""
    ordered = sorted((t, j) for j, t in jobs.items() if t >= since)
    listed = []
    for t, j in ordered:
        listed.append({"jobId": j, "completedAt": t})
        if until is not None and t >= until:
            break
    return listed


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=6), st.integers(min_value=0, max_value=6),
       st.lists(st.sampled_from(["complete", "tick", "answer", "fail-listing"]), min_size=1, max_size=40))
def test_an_honest_job_behind_a_window_full_of_future_dated_ones_is_observed(
        limit: int, extra_future: int, actions: list[str]) -> None:
    """The newest ``limit`` jobs are dated ten years ahead, so no answer of listSucceededSince ever shows an
    honest job again, nor changes when one completes. The feed lists the honest range with the page query at
    every answer and at its timer's ticks; a listing may fail (a passing fault) and is tried again. Every
    honest job is observed, each future-dated job is reported once, and the cursor never passes the
    server's now."""
    future = {f"f{n}": FUTURE + n for n in range(limit + extra_future)}
    honest: dict[str, float] = {}
    since, now = NOW - 86_400_000, NOW
    ledger = LedgerModel(cursor=since, overlap_ms=0)
    feed = SucceededFeed(limit)
    reported: list[str] = []
    fail_next = False

    def window() -> list[dict[str, Any]]:
        jobs = {**future, **honest}
        return [{"jobId": j, "completedAt": t} for t, j in sorted(((t, j) for j, t in jobs.items() if t >= since),
                                                                  reverse=True)[:limit]]

    def run(decisions: list[Decision]) -> None:
        nonlocal fail_next
        queue = list(decisions)
        while queue:
            decision = queue.pop(0)
            if isinstance(decision, Observe):
                queue += feed.observed(ledger.observe(decision.docs))
            elif isinstance(decision, ReportAnomalies):
                reported.extend(a.job_id for a in decision.anomalies if a.job_id is not None)
            elif isinstance(decision, FillGap):
                assert decision.hidden
                if fail_next:
                    fail_next = False
                    queue += feed.hidden_outcome(decision.gap, "failed")
                    continue
                page = pages_since({**future, **honest}, decision.gap.from_ms,
                                   None if decision.list_all else decision.gap.until_ms)
                ledger.observe(tuple(page))
                queue += [*feed.listed(page, now), *feed.hidden_outcome(decision.gap, "filled")]
            elif isinstance(decision, AdvanceCursor):
                queue += feed.cursor_moved(ledger.advance(decision.covered_from_ms, decision.covered_until_ms))
            elif not isinstance(decision, Narrow):
                raise AssertionError(decision)
        ledger.pending.clear()  # workers keep up
        assert ledger.cursor <= now

    run(feed.answer(since, limit, window(), now))
    for action in [*actions, "tick", "tick"]:
        now += HIDDEN_RECHECK_MS
        if action == "complete":
            honest[f"h{len(honest)}"] = now - 10  # no answer changes: it is hidden behind the future ones
        elif action == "answer":
            run(feed.answer(since, limit, window(), now))
        elif action == "fail-listing":
            fail_next = True
        else:
            run(feed.tick(now))
    assert set(honest) | set(future) == set(ledger.observed)  # the future-dated jobs are materialized too
    assert sorted(reported) == sorted(future)  # each reported once


def test_without_a_page_query_the_range_hidden_behind_future_dated_jobs_is_reported_once() -> None:
    feed = SucceededFeed(limit=2)
    window = [{"jobId": "b", "completedAt": FUTURE + 1}, {"jobId": "a", "completedAt": FUTURE}]
    decisions = feed.answer(NOW - 1_000.0, 2, window, now_ms=NOW)
    assert [type(d) for d in decisions] == [Observe, ReportAnomalies]
    [fill] = feed.observed(2)
    assert fill == FillGap(Gap(NOW - 1_000.0, NOW, 2), hidden=True, list_all=True)
    [report] = feed.hidden_outcome(fill.gap, "absent", "no page query here")
    assert isinstance(report, ReportGap) and report.gap == Gap(NOW - 1_000.0, NOW, 2)
    assert "the newest 2 jobs are all dated after the server's now" in report.reason
    assert report.reason.endswith("no page query here")
    assert feed.tick(NOW + 60_000) == [] and feed.next_tick_ms() is None
    assert feed.answer(NOW - 1_000.0, 2, window, now_ms=NOW + 60_000) == [Observe(())]
    assert feed.observed(0) == []  # reported once; nothing vouched for, so the cursor stays
    feed.connected()  # a new connection asks for the page query again
    assert feed.next_tick_ms() == -math.inf
    [again] = feed.tick(NOW + 61_000)
    assert again == FillGap(Gap(NOW - 1_000.0, NOW + 61_000, 2), hidden=True, list_all=True)


# -- the first cursor comes from the server's clock -----------------------------------------------------------

DAY = 86_400_000.0


def test_a_first_cursor_is_the_servers_now_minus_the_look_back_whatever_the_local_clock_says() -> None:
    year = 365.25 * DAY
    start = CursorStart(None, lookback_ms=DAY)
    local_now = NOW + year  # the local clock is a year ahead
    provisional = start.provisional(local_now)
    assert provisional == local_now - DAY
    feed = SucceededFeed(limit=50, start=start)
    [placed, narrow] = feed.answer(provisional, 50, [], now_ms=NOW)
    assert isinstance(placed, StartCursor)
    assert placed == StartCursor("succeeded", NOW - DAY, placed.why)
    assert placed.why == "the local clock is 365.2 days ahead of the server's: the first cursor comes from the server's"
    assert narrow == Narrow("succeeded", NOW - DAY, 50)
    # The answer for the provisional since was dropped; the next one counts.
    assert feed.answer(NOW - DAY, 50, [{"jobId": "a", "completedAt": NOW - 5.0}], now_ms=NOW) == [
        Observe(({"jobId": "a", "completedAt": NOW - 5.0},))]


def test_a_first_cursor_keeps_the_provisional_since_when_the_clocks_agree() -> None:
    feed = FailedFeed(limit=50, overlap_ms=0, start=CursorStart(None, lookback_ms=DAY))
    since = NOW + 30_000 - DAY  # our clock half a minute ahead: within the tolerance
    assert feed.answer(since, [], now_ms=NOW) == [StartCursor("failed", since), NoteFailed(())]


def test_a_stored_cursor_after_the_servers_now_is_pulled_back_and_an_earlier_one_is_kept() -> None:
    ahead = CursorStart(NOW + 30 * DAY, lookback_ms=DAY)
    assert ahead.provisional(NOW) == NOW + 30 * DAY
    feed = SucceededFeed(limit=50, start=ahead)
    [placed, narrow] = feed.answer(NOW + 30 * DAY, 50, [], now_ms=NOW)
    assert isinstance(placed, StartCursor) and isinstance(narrow, Narrow)
    assert (placed.since_ms, narrow.since_ms) == (NOW - DAY, NOW - DAY)
    assert placed.why == "the stored cursor is 30.0 days after the server's now: pulled back to its look-back"
    kept = CursorStart(NOW - 5 * DAY, lookback_ms=DAY)  # a daemon that was down for days: nothing to pull back
    feed = SucceededFeed(limit=50, start=kept)
    assert feed.answer(NOW - 5 * DAY, 50, [], now_ms=NOW)[0] == StartCursor("succeeded", NOW - 5 * DAY)
