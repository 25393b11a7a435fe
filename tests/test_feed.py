"""The succeeded feed's coverage, as plain data: which answers prove a gap and which do not.

The rules follow the one query the real backend has: ``listSucceededSince`` returns the newest
``limit`` jobs since ``since`` (ruuxi/stella-v2 ``backend/convex/media_jobs.ts``), so a full
answer says nothing about jobs older than its oldest one.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from materializer.feed import Coverage, Gap, unreported_part


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
