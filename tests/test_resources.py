"""The memory budget and the fair download slots: the sans-I/O decisions, then their asyncio wrappers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from materializer.resources import Budget, DownloadSlots, MemoryBudget, SlotShare

# -- Budget ---------------------------------------------------------------------------------------


def test_requests_within_the_budget_are_granted_at_once() -> None:
    budget: Budget[str] = Budget(100)
    assert budget.request("a", 60) and budget.request("b", 40)
    assert budget.held == 100 and budget.waiting == 0


def test_a_request_that_does_not_fit_waits_and_is_granted_on_release() -> None:
    budget: Budget[str] = Budget(100)
    assert budget.request("a", 60)
    assert not budget.request("b", 60)
    assert budget.waiting == 1
    assert budget.release(60) == ["b"]
    assert budget.held == 60 and budget.waiting == 0


def test_grants_are_first_come_first_served_so_a_large_request_is_not_overtaken() -> None:
    budget: Budget[str] = Budget(100)
    assert budget.request("a", 50)
    assert not budget.request("large", 90)
    # "small" would fit beside "a", but "large" asked first: it waits behind it.
    assert not budget.request("small", 20)
    assert budget.release(50) == ["large"]
    assert budget.release(90) == ["small"]


def test_release_grants_every_waiter_that_now_fits_in_order() -> None:
    budget: Budget[str] = Budget(100)
    assert budget.request("a", 100)
    for name in "bcd":
        assert not budget.request(name, 30)
    assert budget.release(100) == ["b", "c", "d"]
    assert budget.held == 90


def test_a_request_larger_than_the_whole_budget_runs_alone() -> None:
    budget: Budget[str] = Budget(100)
    assert budget.request("a", 10)
    assert not budget.request("huge", 400)
    assert not budget.request("b", 10)
    assert budget.release(10) == ["huge"]  # nothing else holds any: it goes, rather than never
    assert budget.held == 400
    assert budget.release(400) == ["b"]


def test_a_request_larger_than_the_budget_is_granted_at_once_when_nothing_is_held() -> None:
    budget: Budget[str] = Budget(100)
    assert budget.request("huge", 10_000)
    assert not budget.request("small", 1)  # nothing runs beside it


def test_withdrawing_a_waiter_at_the_head_lets_the_next_ones_go() -> None:
    budget: Budget[str] = Budget(100)
    assert budget.request("a", 50)
    assert not budget.request("large", 90)
    assert not budget.request("small", 10)
    assert budget.withdraw("large", 90) == ["small"]
    assert budget.held == 60


def test_withdrawing_a_granted_request_releases_it() -> None:
    budget: Budget[str] = Budget(100)
    assert budget.request("a", 80)
    assert not budget.request("b", 50)
    assert budget.withdraw("a", 80) == ["b"]
    assert budget.held == 50


def test_take_grants_only_what_request_would_grant_now_and_never_queues() -> None:
    budget: Budget[str] = Budget(100)
    assert budget.take(60) and budget.held == 60
    assert not budget.take(50) and budget.held == 60 and budget.waiting == 0  # does not fit: nothing changed
    assert not budget.request("waiter", 50)
    assert not budget.take(10)  # fits, but someone is in line: it must not overtake
    assert budget.release(60) == ["waiter"]
    assert budget.take(50) and budget.held == 100
    with pytest.raises(ValueError, match="negative"):
        budget.take(-1)


def test_budget_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="positive capacity"):
        Budget(0)
    budget: Budget[str] = Budget(10)
    with pytest.raises(ValueError, match="negative"):
        budget.request("a", -1)
    with pytest.raises(ValueError, match="cannot release 5 bytes: 0 are held"):
        budget.release(5)


# -- SlotShare ------------------------------------------------------------------------------------


def test_no_job_takes_every_slot() -> None:
    share: SlotShare[str] = SlotShare(4)
    granted = [share.request("many", f"m{n}") for n in range(3000)]
    assert granted.count(True) == 3  # slots - 1: one stays free for another job
    assert share.free == 1
    assert share.request("normal", "n0")  # a normal job behind it gets a slot at once


def test_a_normal_job_gets_the_next_free_slot_before_the_many_output_job_queued_ahead() -> None:
    share: SlotShare[str] = SlotShare(4)
    for n in range(3):
        assert share.request("many", f"m{n}")
    assert share.request("other", "o0")  # the fourth slot
    for n in range(3, 3000):
        assert not share.request("many", f"m{n}")
    assert not share.request("normal", "n0")
    # The first slot freed goes to the job holding none, not to the 2997 outputs queued before it.
    assert share.release("many") == ["n0"]
    assert share.release("other") == ["m3"]


def test_free_slots_go_to_the_job_holding_the_fewest_then_round_robin() -> None:
    share: SlotShare[str] = SlotShare(3)
    assert share.request("a", "a0") and share.request("a", "a1") and share.request("b", "b0")
    for name in ("a2", "a3"):
        assert not share.request("a", name)
    for name in ("b1", "b2"):
        assert not share.request("b", name)
    assert not share.request("c", "c0")
    assert share.release("a") == ["c0"]  # c holds none
    assert share.release("c") == ["a2"]  # a and b hold one each: a has waited longer
    assert share.release("b") == ["b1"]  # b holds none now (and a holds all it may)
    assert not share.request("c", "c1")
    assert share.release("a") == ["c1"]  # c holds none, a and b one each
    assert share.release("b") == ["b2"]  # b holds none now, a one
    assert (share.held_by("a"), share.held_by("b"), share.held_by("c")) == (1, 1, 1)
    assert share.release("c") == ["a3"]


def test_a_job_alone_with_one_slot_still_runs() -> None:
    share: SlotShare[str] = SlotShare(1)
    assert share.per_job == 1
    assert share.request("a", "a0")
    assert not share.request("a", "a1")
    assert share.release("a") == ["a1"]


def test_within_a_job_outputs_go_in_the_order_they_asked() -> None:
    share: SlotShare[str] = SlotShare(2)
    assert share.request("a", "first")
    assert not share.request("a", "second")
    assert not share.request("a", "third")
    assert share.release("a") == ["second"]
    assert share.release("a") == ["third"]


def test_withdrawing_from_slots() -> None:
    share: SlotShare[str] = SlotShare(3)
    assert share.request("a", "a0") and share.request("a", "a1") and share.request("b", "b0")
    assert not share.request("a", "a2")
    assert not share.request("c", "c0")
    assert share.withdraw("c", "c0") == []  # it was waiting: nothing changes for the others
    assert share.withdraw("a", "a0") == ["a2"]  # it held a slot: the slot goes on
    with pytest.raises(ValueError, match="holds no download slot"):
        share.release("c")


def test_slots_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one download slot"):
        SlotShare(0)


# -- the asyncio wrappers -----------------------------------------------------------------------------


async def test_memory_budget_holds_back_what_does_not_fit_until_release() -> None:
    budget = MemoryBudget(100)
    order: list[str] = []
    release_first = asyncio.Event()

    async def user(name: str, amount: int, hold: asyncio.Event | None = None) -> None:
        async with budget.reserve(amount):
            order.append(f"{name} in")
            if hold is not None:
                await hold.wait()
        order.append(f"{name} out")

    first = asyncio.create_task(user("first", 80, release_first))
    await asyncio.sleep(0)
    second = asyncio.create_task(user("second", 80))
    await asyncio.sleep(0)
    assert order == ["first in"] and budget.held == 80
    release_first.set()
    await asyncio.gather(first, second)
    assert order == ["first in", "first out", "second in", "second out"]
    assert budget.held == 0


async def test_a_cancelled_waiter_gives_its_place_and_its_bytes_back() -> None:
    budget = MemoryBudget(100)
    hold = asyncio.Event()
    entered: list[str] = []

    async def user(name: str, amount: int, wait: bool = False) -> None:
        async with budget.reserve(amount):
            entered.append(name)
            if wait:
                await hold.wait()

    holder = asyncio.create_task(user("holder", 60, wait=True))
    await asyncio.sleep(0)
    blocked = asyncio.create_task(user("blocked", 90))
    behind = asyncio.create_task(user("behind", 30))
    await asyncio.sleep(0)
    assert entered == ["holder"]
    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)
    await behind  # fits beside the holder once the head of the line left
    assert entered == ["holder", "behind"]
    hold.set()
    await holder
    assert budget.held == 0


async def test_download_slots_serve_the_normal_job_before_the_rest_of_a_big_one() -> None:
    slots = DownloadSlots(2)
    done: list[str] = []
    gate = asyncio.Event()

    async def output(job: str, name: str) -> None:
        async with slots.slot(job):
            if name == "big0":
                await gate.wait()  # holds its slot while everything below queues
            done.append(name)

    tasks = [asyncio.create_task(output("big", f"big{n}")) for n in range(50)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(output("normal", "normal0")))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    # big0 held one slot and big may hold only one (2 - 1): the normal job took the other at once.
    assert done[0] == "normal0"
    assert sorted(done) == sorted([*(f"big{n}" for n in range(50)), "normal0"])


async def test_a_thread_holds_its_share_at_once_or_not_at_all_and_its_release_wakes_the_loops_waiters() -> None:
    budget = MemoryBudget(100)
    loop = asyncio.get_running_loop()
    entered = threading.Event()
    leave = threading.Event()

    def worker() -> bool:
        with budget.hold_now(80, loop) as held:
            entered.set()
            leave.wait(timeout=30)
        return held

    thread = asyncio.create_task(asyncio.to_thread(worker))
    await asyncio.to_thread(entered.wait, 30)
    assert budget.held == 80
    with budget.hold_now(30, loop) as held:  # does not fit beside the thread's: refused, nothing held
        assert not held and budget.held == 80
    waiter_in = asyncio.Event()

    async def waiter() -> None:
        async with budget.reserve(50):
            waiter_in.set()

    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    assert not waiter_in.is_set()
    leave.set()
    assert await thread
    await asyncio.wait_for(waiting, 30)  # woken on the loop by the thread's release
    assert budget.held == 0
