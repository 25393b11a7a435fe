"""The steady clock that retry times and leases are measured on: a wall-clock step does not move it."""

from __future__ import annotations

from pathlib import Path

from materializer.clock import SteadyClock
from materializer.layout import default_layout
from materializer.ledger import Ledger


class Hand:
    """A clock moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_steady_clock_starts_at_the_wall_clock_and_moves_only_with_the_monotonic_one() -> None:
    wall, monotonic = Hand(1_800_000_000.0), Hand(50.0)
    clock = SteadyClock(wall, monotonic)
    assert clock() == 1_800_000_000.0
    wall.now -= 86_400  # the wall clock is stepped back a day
    assert clock() == 1_800_000_000.0
    monotonic.now += 30
    assert clock() == 1_800_000_030.0


def test_a_retry_due_in_30_s_comes_in_30_s_when_the_wall_clock_is_stepped_back_a_day(tmp_path: Path) -> None:
    wall, monotonic = Hand(1_800_000_000.0), Hand(0.0)
    with Ledger(default_layout(tmp_path).ledger, clock=SteadyClock(wall, monotonic)) as ledger:
        ledger.observe_jobs([{"jobId": "j", "status": "succeeded", "completedAt": 1.0}])
        assert ledger.try_claim("j", "daemon:1", 60)
        ledger.record_failure("j", "503", ledger.now() + 30, owner="daemon:1")
        wall.now -= 86_400
        monotonic.now += 29
        assert ledger.due_jobs(1) == []
        monotonic.now += 1
        assert [job.job_id for job in ledger.due_jobs(1)] == ["j"]
