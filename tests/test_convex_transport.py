"""The WebSocket sync client against the real local backend (and, for hostile frames, a scripted server)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from convex import ConvexClient
from websockets.asyncio.server import ServerConnection, serve

from materializer.convex.protocol import QueryFailure, QueryResult, QueryValue
from materializer.convex.transport import (
    Backoff,
    BackoffPolicy,
    ConnectionState,
    RetryKind,
    StateChange,
    Subscription,
    SyncClient,
    retry_kind,
    sync_url,
)
from materializer.convex.values import encode_ts
from materializer.tokens import CommandTokenProvider, FileTokenProvider, StaticTokenProvider
from stella_devbackend.control import DevBackend

from helpers import async_wait_until

LIST = "media_jobs:listSucceededSince"
ALL: dict[str, Any] = {"since": 0, "limit": 200}
#: Small waits so reconnect-heavy tests stay fast; the shape (doubling, cap, kinds) is the default's.
FAST = BackoffPolicy(clean_initial=0.005, error_initial=0.01, overload_initial=0.02, maximum=0.05)
DEADLINE = 30.0  # seconds; a deadline against hangs, never a performance threshold


async def eventually(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Poll ``predicate`` until it holds; fail after ``deadline`` seconds."""
    await async_wait_until(predicate, deadline, what)


async def happens_within(predicate: Callable[[], bool], seconds: float) -> bool:
    """Whether ``predicate`` becomes true within an observation window (to assert that something does NOT happen)."""
    try:
        await eventually(predicate, "", deadline=seconds)
    except AssertionError:
        return False
    return True


class Collector:
    """Reads a subscription in the background, keeping every result in order."""

    def __init__(self, subscription: Subscription) -> None:
        self.results: list[QueryResult] = []
        self.task = asyncio.create_task(self._read(subscription))

    async def _read(self, subscription: Subscription) -> None:
        async for result in subscription:
            self.results.append(result)

    @property
    def values(self) -> list[Any]:
        return [r.value for r in self.results if isinstance(r, QueryValue)]

    def job_ids(self) -> set[str]:
        return {job["jobId"] for value in self.values for job in value}

    def latest_ids(self) -> list[str]:
        return [job["jobId"] for job in self.values[-1]] if self.values else []

    async def wait_for_jobs(self, job_ids: set[str] | list[str]) -> None:
        await eventually(lambda: set(job_ids) <= self.job_ids(), f"jobs {sorted(set(job_ids) - self.job_ids())}")


def client_for(backend: DevBackend, provider: Any = None, **options: Any) -> SyncClient:
    token_provider = StaticTokenProvider(backend.token) if provider is None else provider
    return SyncClient(backend.url, token_provider, backoff=FAST, **options)


async def create_jobs(backend: DevBackend, **spec: Any) -> list[str]:
    return await asyncio.to_thread(backend.create_jobs, **spec)


async def mint(backend: DevBackend, sub: str = "demo-user", ttl: float = 3600.0) -> str:
    return await asyncio.to_thread(backend.mint_token, sub, ttl)


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


# -- pure parts: backoff and URLs ------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(BackoffPolicy(), random.Random(7))
    delays = [backoff.next_delay(RetryKind.ERROR) for _ in range(8)]
    bases = [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0, 16.0]
    assert all(0.5 * base <= delay <= 1.5 * base for delay, base in zip(delays, bases, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not lock-step
    backoff.reset()
    assert 0.05 <= backoff.next_delay(RetryKind.CLEAN) <= 0.15
    backoff.reset()
    assert 1.5 <= backoff.next_delay(RetryKind.OVERLOAD) <= 4.5


def test_retry_kind_recognises_overload_names() -> None:
    assert retry_kind("TooManyConcurrentRequests", RetryKind.CLEAN) is RetryKind.OVERLOAD
    assert retry_kind("SubscriptionsWorkerFullError: try later", RetryKind.ERROR) is RetryKind.OVERLOAD
    assert retry_kind("InternalServerError", RetryKind.ERROR) is RetryKind.ERROR
    assert retry_kind(None, RetryKind.CLEAN) is RetryKind.CLEAN


def test_sync_url_follows_the_deployment_scheme_and_carries_no_version() -> None:
    """A path version is read as the npm client's and refused (convex-backend crates/common/src/http/mod.rs)."""
    assert sync_url("http://127.0.0.1:3210") == "ws://127.0.0.1:3210/api/sync"
    assert sync_url("https://happy-otter-1.convex.cloud/") == "wss://happy-otter-1.convex.cloud/api/sync"
    assert sync_url("https://example.com/prefix") == "wss://example.com/prefix/api/sync"
    for bad in ("ftp://example.com", "example.com", "ws://example.com"):
        with pytest.raises(ValueError, match="http"):
            sync_url(bad)


# -- subscriptions against the local backend -----------------------------------------------------------------


async def test_subscription_delivers_every_new_job_in_order(backend: DevBackend) -> None:
    async with client_for(backend) as client:
        collector = Collector(client.subscribe(LIST, ALL))
        await eventually(lambda: collector.values == [[]], "the empty first result")
        created: list[str] = []
        for _ in range(3):
            created += await create_jobs(backend, count=1)
            await eventually(lambda: collector.latest_ids() == created[::-1], "the job")  # newest first
        assert [len(value) for value in collector.values] == [0, 1, 2, 3]
        assert all(r.args == ALL and r.udf_path == LIST for r in collector.results)
        assert client.state is ConnectionState.CONNECTED
        assert client.connection_attempts == 1


async def test_subscription_lives_through_20_forced_disconnects_and_a_restart(backend: DevBackend) -> None:
    async with client_for(backend) as client:
        collector = Collector(client.subscribe(LIST, ALL))
        created: list[str] = []
        for round_number in range(20):
            await client.wait_for_state(ConnectionState.CONNECTED)
            attempts = client.connection_attempts
            created += await create_jobs(backend, count=1)
            assert await asyncio.to_thread(backend.drop_connections) == 1
            created += await create_jobs(backend, count=1)  # completes while (or just after) the socket is down
            await eventually(lambda: client.connection_attempts > attempts, f"reconnect {round_number}")
        await asyncio.to_thread(backend.restart)  # same port, same data folder
        created += await create_jobs(backend, count=2)
        await collector.wait_for_jobs(created)
        await eventually(lambda: collector.latest_ids() == created[::-1], "the final full list")
        # No job ever vanished from a later result, and no result was a repeat of the one before.
        seen: set[str] = set()
        for value in collector.values:
            ids = {job["jobId"] for job in value}
            assert seen <= ids
            seen = ids
        assert all(a != b for a, b in zip(collector.values, collector.values[1:], strict=False))
        assert client.connection_attempts >= 22
        assert not collector.task.done()


async def test_update_args_moves_the_subscription_without_reconnecting(backend: DevBackend) -> None:
    first, second, third = await create_jobs(backend, count=3, completedAt=1000, completedAtStep=1000)
    async with client_for(backend) as client:
        subscription = client.subscribe(LIST, {"since": 0})
        collector = Collector(subscription)
        await eventually(lambda: collector.latest_ids() == [third, second, first], "all three jobs")
        subscription.update_args({"since": 2000})
        await eventually(lambda: collector.latest_ids() == [third, second], "the jobs since 2000")
        subscription.update_args({"since": 2500, "limit": 1})
        await eventually(lambda: collector.latest_ids() == [third], "the job since 2500")
        assert [r.args for r in collector.results] == [{"since": 0}, {"since": 2000}, {"since": 2500, "limit": 1}]
        # The strict backend would have answered a wrong ModifyQuerySet with FatalError and a close.
        assert client.connection_attempts == 1
        assert isinstance(subscription.latest, QueryValue) and subscription.latest.args["since"] == 2500


async def test_query_failure_then_recovery(backend: DevBackend) -> None:
    async with client_for(backend) as client:
        subscription = client.subscribe(LIST, {"since": "yesterday"})
        collector = Collector(subscription)
        await eventually(lambda: len(collector.results) == 1, "the failure")
        [failure] = collector.results
        assert isinstance(failure, QueryFailure) and "ArgumentValidationError" in failure.error_message
        subscription.update_args({"since": 0})
        await eventually(lambda: collector.values == [[]], "a value again")
        assert client.connection_attempts == 1


async def test_unsubscribe_and_close_end_iteration(backend: DevBackend) -> None:
    client = client_for(backend)
    client.start()
    first = client.subscribe(LIST, ALL)
    second = client.subscribe(LIST, {"since": 1})
    assert isinstance(await asyncio.wait_for(anext(first), DEADLINE), QueryValue)
    first.unsubscribe()
    assert [result async for result in first] == []
    with pytest.raises(RuntimeError):
        first.update_args({"since": 5})
    [job] = await create_jobs(backend, count=1)
    value = await asyncio.wait_for(anext(second), DEADLINE)
    assert isinstance(value, QueryValue)
    if value.value == []:  # the empty result may arrive before the job
        value = await asyncio.wait_for(anext(second), DEADLINE)
    assert isinstance(value, QueryValue) and [j["jobId"] for j in value.value] == [job]
    await client.close()
    assert client.state is ConnectionState.CLOSED
    assert [result async for result in second] == []
    with pytest.raises(RuntimeError):
        client.subscribe(LIST, ALL)


async def test_large_results_arrive_whole_to_our_client_and_match_http(tmp_path: Path) -> None:
    """A deployment chunks transitions only for npm clients at 1.28.0 or later (convex-backend
    crates/local_backend/src/subs/mod.rs, maybe_split_transition): ours names itself otherwise."""
    extra = ["--job-delay", "0.01", "--chunk-threshold", "300", "--chunk-size", "300"]
    with DevBackend.start(tmp_path / "chunky", extra_args=extra) as backend:
        await create_jobs(backend, count=5, images=2)
        async with client_for(backend) as client:
            collector = Collector(client.subscribe(LIST, ALL))
            await eventually(lambda: len(collector.values) == 1, "the large result")
            expected = (await asyncio.to_thread(backend.query, LIST, ALL)).json()["value"]
            assert collector.values == [expected]
            assert len(json.dumps(expected)) > 5 * 300  # over the threshold, yet whole
            assert client.connection_attempts == 1


async def test_state_changes_are_observable(backend: DevBackend) -> None:
    client = client_for(backend)
    changes: list[StateChange] = []

    async def watch() -> None:
        async for change in client.state_changes():
            changes.append(change)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: len(changes) == 1, "the current state")
    client.start()
    client.subscribe(LIST, ALL)
    await client.wait_for_state(ConnectionState.CONNECTED)
    await asyncio.to_thread(backend.drop_connections)
    await eventually(lambda: client.connection_attempts == 2 and client.state is ConnectionState.CONNECTED,
                     "the reconnect")
    await client.close()
    await asyncio.wait_for(watcher, DEADLINE)  # ends with CLOSED
    states = [change.state for change in changes]
    assert states == [
        ConnectionState.DISCONNECTED, ConnectionState.CONNECTING, ConnectionState.CONNECTED,
        ConnectionState.DISCONNECTED, ConnectionState.CONNECTING, ConnectionState.CONNECTED,
        ConnectionState.CLOSED,
    ]
    assert changes[3].detail == "ConnectionLost"


async def test_overloaded_server_is_retried_until_it_accepts(backend: DevBackend) -> None:
    await asyncio.to_thread(backend.set_faults,
                            [{"kind": "refuse_sync", "times": 3, "reason": "TooManyConcurrentRequests"}])
    async with client_for(backend) as client:
        details: list[str | None] = []

        async def watch() -> None:
            async for change in client.state_changes():
                details.append(change.detail)

        watcher = asyncio.create_task(watch())
        collector = Collector(client.subscribe(LIST, ALL))
        await eventually(lambda: collector.values == [[]], "a result once the server accepts")
        assert client.connection_attempts == 4
        assert details.count("TooManyConcurrentRequests") == 3
        watcher.cancel()


async def test_silent_server_is_dropped_after_the_inactivity_limit(tmp_path: Path) -> None:
    with DevBackend.start(tmp_path / "quiet", extra_args=["--ping-interval", "3600"]) as backend:
        async with client_for(backend, inactivity_timeout=0.2) as client:
            details: list[str | None] = []

            async def watch() -> None:
                async for change in client.state_changes():
                    details.append(change.detail)

            watcher = asyncio.create_task(watch())
            collector = Collector(client.subscribe(LIST, ALL))
            await eventually(lambda: details.count("InactiveServer") >= 2, "two inactivity reconnects")
            [job] = await create_jobs(backend, count=1)
            await collector.wait_for_jobs([job])
            watcher.cancel()


async def test_pings_keep_a_quiet_connection_alive(tmp_path: Path) -> None:
    with DevBackend.start(tmp_path / "pinging", extra_args=["--ping-interval", "0.05"]) as backend:
        async with client_for(backend, inactivity_timeout=1.0) as client:
            collector = Collector(client.subscribe(LIST, ALL))
            await eventually(lambda: collector.values == [[]], "the first result")
            stats_before = await asyncio.to_thread(backend.stats)
            # Observation window of several inactivity limits, kept alive only by the server's pings.
            assert not await happens_within(lambda: client.connection_attempts > 1, seconds=3.0)
            assert (await asyncio.to_thread(backend.stats))["sync_connections"] == stats_before["sync_connections"]


# -- auth -------------------------------------------------------------------------------------------------------


async def test_refused_token_enters_auth_required_without_a_reconnect_storm(own_backend: DevBackend,
                                                                            tmp_path: Path) -> None:
    backend = own_backend  # it counts the backend's sync connections: a process of its own
    token_file = tmp_path / "token"
    token_file.write_text("not-a-jwt")
    provider = FileTokenProvider(token_file)
    async with client_for(backend, provider) as client:
        collector = Collector(client.subscribe(LIST, ALL))
        await client.wait_for_state(ConnectionState.AUTH_REQUIRED)
        assert client.connection_attempts == 2  # the token, then the provider's fresh (same) one
        assert client.state_detail is not None and "refused" in client.state_detail
        assert "not-a-jwt" not in client.state_detail
        # With waits of at most 50 ms, a timer-driven retry would reconnect dozens of times in this window.
        assert not await happens_within(lambda: client.connection_attempts > 2, seconds=1.0)
        assert (await asyncio.to_thread(backend.stats))["sync_connections"] == 2
        assert client.state is ConnectionState.AUTH_REQUIRED
        # Sign-in changes: exactly one new socket, and the subscription delivers.
        [job] = await create_jobs(backend, count=1)
        write_atomically(token_file, backend.token)
        await collector.wait_for_jobs([job])
        assert client.connection_attempts == 3
        assert client.state is ConnectionState.CONNECTED
    await provider.aclose()


async def test_expired_token_is_replaced_through_the_provider(backend: DevBackend, tmp_path: Path) -> None:
    """The command first hands out an expired token: the client sees its ``exp`` and asks again before
    opening any socket, so the server never has to refuse it."""
    expired, fresh = await mint(backend, ttl=-60), await mint(backend, ttl=3600)
    token_source = tmp_path / "current"
    token_source.write_text(expired)
    command = [sys.executable, "-c",
               f"import pathlib; p = pathlib.Path({str(token_source)!r}); print(p.read_text()); "
               f"p.write_text({fresh!r})"]  # hands out the expired token once, then the fresh one
    [job] = await create_jobs(backend, count=1)
    async with client_for(backend, CommandTokenProvider(command)) as client:
        collector = Collector(client.subscribe(LIST, ALL))
        await collector.wait_for_jobs([job])
        assert client.connection_attempts == 1
        assert client.state is ConnectionState.CONNECTED


async def test_token_is_refreshed_before_it_expires_on_the_live_socket(backend: DevBackend, tmp_path: Path) -> None:
    """A command mints 3-second tokens; the client swaps them in before ``exp`` without reconnecting."""
    runs = tmp_path / "runs"
    script = tmp_path / "mint.py"
    script.write_text(
        "import httpx, pathlib\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "runs.write_text(str(int(runs.read_text()) + 1) if runs.exists() else '1')\n"
        f"answer = httpx.post({backend.url + '/_dev/token'!r}, json={{'sub': 'demo-user', 'ttl': 3}},\n"
        f"                    headers={{'X-Dev-Admin-Key': {backend.admin_key!r}}})\n"
        "print(answer.json()['token'])\n"
    )
    # A fast poll interval would show up as a flood of runs if the connected client polled the command.
    provider = CommandTokenProvider([sys.executable, str(script)], poll_interval=0.01)
    async with client_for(backend, provider) as client:
        collector = Collector(client.subscribe(LIST, ALL))
        await eventually(lambda: collector.values == [[]], "the first result")
        await eventually(lambda: runs.exists() and int(runs.read_text() or 0) >= 3, "two refreshes")
        assert int(runs.read_text()) <= 4  # refreshed for exp, not polled
        [job] = await create_jobs(backend, count=1)
        await collector.wait_for_jobs([job])
        # Every token expired along the way, yet the server never had to refuse one.
        assert client.connection_attempts == 1
        assert client.state is ConnectionState.CONNECTED


async def test_changed_token_file_re_authenticates_on_the_live_socket(backend: DevBackend, tmp_path: Path) -> None:
    alice, bob = await mint(backend, sub="alice"), await mint(backend, sub="bob")
    [alice_job] = await create_jobs(backend, count=1, owner="alice")
    [bob_job] = await create_jobs(backend, count=1, owner="bob")
    token_file = tmp_path / "token"
    token_file.write_text(alice)
    provider = FileTokenProvider(token_file)
    async with client_for(backend, provider) as client:
        collector = Collector(client.subscribe(LIST, ALL))
        await eventually(lambda: collector.latest_ids() == [alice_job], "alice's job")
        write_atomically(token_file, bob + "\n")
        await eventually(lambda: collector.latest_ids() == [bob_job], "bob's job after the token changed")
        assert client.connection_attempts == 1
    await provider.aclose()


async def test_no_token_waits_in_token_needed_until_the_file_appears(backend: DevBackend, tmp_path: Path) -> None:
    provider = FileTokenProvider(tmp_path / "token")
    async with client_for(backend, provider) as client:
        collector = Collector(client.subscribe(LIST, ALL))
        await client.wait_for_state(ConnectionState.TOKEN_NEEDED)
        assert client.connection_attempts == 0
        assert client.state_detail == f"token file {tmp_path / 'token'} does not exist"
        write_atomically(tmp_path / "token", backend.token)
        await eventually(lambda: collector.values == [[]], "a result once signed in")
        assert client.connection_attempts == 1
    await provider.aclose()


# -- the official client, side by side ----------------------------------------------------------------------


async def test_same_results_as_the_official_client(backend: DevBackend) -> None:
    official = ConvexClient(backend.url)
    official.set_auth(backend.token)
    official_values: list[Any] = []

    async def read_official() -> None:
        # The official client's blocking iterator holds the GIL while it waits, so it cannot
        # run in a thread beside the event loop; its async iterator can.
        async for value in official.subscribe(LIST, ALL):
            official_values.append(value)

    official_task = asyncio.create_task(read_official())

    def official_latest_ids() -> list[str]:
        return [job["jobId"] for job in official_values[-1]] if official_values else []

    async with client_for(backend) as client:
        collector = Collector(client.subscribe(LIST, ALL))
        await eventually(lambda: collector.values == [[]] and official_values == [[]], "both first results")
        created: list[str] = []
        for step in range(4):
            created += await create_jobs(backend, count=1, images=1 + step % 3)
            if step == 2:
                await asyncio.to_thread(backend.drop_connections)  # both clients reconnect
            await eventually(lambda: collector.latest_ids() == official_latest_ids() == created[::-1],
                             f"both clients at step {step}")
    official_task.cancel()
    # The official client may repeat a value (after its reconnect); the distinct results are the same.
    distinct_official = [v for i, v in enumerate(official_values) if i == 0 or v != official_values[i - 1]]
    assert distinct_official == collector.values
    assert len(collector.values) == 5


# -- hostile servers (frames the real backend never sends) ---------------------------------------------------------


@pytest.fixture
async def scripted_server() -> AsyncIterator[tuple[str, list[list[dict[str, Any]]], list[Any]]]:
    """A WebSocket server that plays one script per connection and records what each client sent."""
    scripts: list[Any] = []
    received: list[list[dict[str, Any]]] = []

    async def handler(connection: ServerConnection) -> None:
        messages: list[dict[str, Any]] = []
        received.append(messages)
        script = scripts.pop(0) if scripts else None
        async for frame in connection:
            messages.append(json.loads(frame))
            if script is not None and messages[-1]["type"] == "ModifyQuerySet":
                for frame_out in script:
                    await connection.send(frame_out)
                script = None

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", received, scripts


def transition_frame(start: int, end: int, value: Any, identity: int = 0) -> str:
    return json.dumps({
        "type": "Transition",
        "startVersion": {"querySet": start, "identity": identity, "ts": encode_ts(start)},
        "endVersion": {"querySet": end, "identity": identity, "ts": encode_ts(end)},
        "modifications": [{"type": "QueryUpdated", "queryId": 0, "value": value, "logLines": [], "journal": None}],
    })


async def test_a_transition_in_chunks_is_reassembled_on_a_real_socket(
    scripted_server: tuple[str, list[list[dict[str, Any]]], list[Any]],
) -> None:
    """Chunks are the npm client's (they never reach ours from a real deployment), but a client that
    gets them anyway assembles them rather than dropping the socket."""
    url, _, scripts = scripted_server
    text = transition_frame(0, 1, {"big": "x" * 1000})
    pieces = [text[i:i + 300] for i in range(0, len(text), 300)]
    scripts.append([json.dumps({"type": "TransitionChunk", "chunk": piece, "partNumber": n,
                                "totalParts": len(pieces), "transitionId": "t1"}) for n, piece in enumerate(pieces)])
    async with SyncClient(url, None, backoff=FAST) as client:
        result = await asyncio.wait_for(anext(client.subscribe("m:f", {})), DEADLINE)
        assert isinstance(result, QueryValue) and result.value == {"big": "x" * 1000}
        assert client.connection_attempts == 1


async def test_hostile_frames_and_fatal_errors_lead_to_a_reconnect_never_a_crash(
    scripted_server: tuple[str, list[list[dict[str, Any]]], list[Any]],
) -> None:
    url, received, scripts = scripted_server
    scripts += [
        ["this is not json"],
        [transition_frame(5, 6, "wrong start version")],
        [json.dumps({"type": "TransitionChunk", "chunk": "{", "partNumber": 1, "totalParts": 2,
                     "transitionId": "x"})],
        [json.dumps({"type": "FatalError", "error": "InternalServerError"})],
        [transition_frame(0, 1, "finally")],
    ]
    async with SyncClient(url, None, backoff=FAST) as client:
        subscription = client.subscribe("m:f", {"a": 1})
        result = await asyncio.wait_for(anext(subscription), DEADLINE)
        assert isinstance(result, QueryValue) and result.value == "finally"
        assert client.connection_attempts == 5
    connects = [messages[0] for messages in received]
    assert [c["lastCloseReason"] for c in connects] == [
        "InitialConnect", "InvalidServerMessage", "InvalidServerMessage", "InvalidServerMessage",
        "InternalServerError",
    ]
    assert [c["connectionCount"] for c in connects] == [0, 1, 2, 3, 4]
    assert len({c["sessionId"] for c in connects}) == 1
    for messages in received:  # no token: Connect then the query set from version 0, every time
        assert [m["type"] for m in messages[:2]] == ["Connect", "ModifyQuerySet"]
        assert messages[1]["modifications"] == [{"type": "Add", "queryId": 0, "udfPath": "m:f", "args": [{"a": 1.0}]}]


async def test_server_now_follows_the_servers_clock_not_ours(tmp_path: Path) -> None:
    """A backend whose clock is a year behind ours: server_now_ms is its clock (from the transitions'
    serverTs, carried on by the monotonic clock), not time.time(). (The token lives two years: one of five
    minutes, stamped by the server's clock, looks expired to a clock a year ahead before any skew is known.)"""
    year_ms = 365.25 * 86_400_000
    with DevBackend.start(tmp_path / "b", extra_args=["--clock-offset", str(-year_ms / 1000)]) as backend:
        token = await mint(backend, ttl=2 * year_ms / 1000)
        async with client_for(backend, StaticTokenProvider(token)) as client:
            assert client.server_now_ms() is None  # no word from the server yet
            collector = Collector(client.subscribe(LIST, ALL))
            await eventually(lambda: len(collector.values) == 1, "the first answer")
            told = client.server_now_ms()
            assert told is not None and abs(told - (time.time() * 1000 - year_ms)) < 600_000
            later = client.server_now_ms()
            assert later is not None and later >= told


async def test_an_answer_too_large_to_take_is_heard_by_every_subscription_and_asking_for_less_recovers(
        backend: DevBackend) -> None:
    """A transition over max_message_bytes ends the socket (websockets closes it with 1009); the same query
    set would bring it back, so each subscription hears a QueryFailure with too_large, and one that asks for
    fewer jobs gets its answer on the next socket."""
    job_ids = await create_jobs(backend, count=6, share_files=True, width=8, height=8, prompt="p" * 40_000)
    async with client_for(backend, max_message_bytes=150_000) as client:
        big = Collector(client.subscribe(LIST, {"since": 0, "limit": 6}))
        small = Collector(client.subscribe("media_jobs:listFailedSince", {"since": 0}))
        await eventually(lambda: any(isinstance(r, QueryFailure) for r in big.results), "the too-large notice")
        # The same query set fails again on each reconnect, so a loaded machine may hear it more than once.
        notices = [r for r in big.results if isinstance(r, QueryFailure)]
        notice = notices[0]
        assert all(n.too_large and n.query_id == notice.query_id for n in notices)
        assert notice.too_large and notice.args == {"since": 0, "limit": 6}
        assert "too large to take" in notice.error_message and "exceeds limit" in notice.error_message
        assert any(isinstance(r, QueryFailure) and r.too_large for r in small.results)
        big_subscription = client._subscriptions[notice.query_id]
        big_subscription.update_args({"since": 0, "limit": 2})
        await eventually(lambda: big.latest_ids() == job_ids[:-3:-1], "the two newest jobs")
        assert client.connection_attempts >= 2
