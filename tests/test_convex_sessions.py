"""Who the sync client says it is, what it does when the server refuses the upgrade, and tokens that expire.

The rules come from the real systems: the client-version middleware of
get-convex/convex-backend (``crates/common/src/http/mod.rs``), the lazy expiry
check of its sync worker (``crates/sync/src/state.rs``), the JS client's refresh
schedule (get-convex/convex-js ``src/browser/sync/authentication_manager.ts``)
and Stella's five-minute tokens (ruuxi/stella-v2 ``backend/convex/auth.ts``),
compressed here to a few seconds.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from materializer import __version__
from materializer.convex.identity import CLIENT_ID
from materializer.convex.protocol import QueryValue
from materializer.convex.transport import BackoffPolicy, ConnectionState, SyncClient
from materializer.tokens import CommandTokenProvider, FdTokenProvider, StaticTokenProvider
from stella_devbackend.control import DevBackend
from stella_devbackend.jwt import sign_hs256

from helpers import async_wait_until

LIST = "media_jobs:listSucceededSince"
ALL = {"since": 0, "limit": 200}
FAST = BackoffPolicy(clean_initial=0.005, error_initial=0.05, overload_initial=0.05, maximum=0.2)
DEADLINE = 30.0
UNSUPPORTED = ("The Convex npm package at version 0.1.0 is no longer supported. Update your Convex npm version "
               "with `npx convex update` or `npm update`.")


def unsigned_token(ttl: float = 3600.0) -> str:
    """A JWT our client can read the lifetime of (a scripted server checks no signature)."""
    now = int(time.time())
    return sign_hs256({"sub": "u", "iat": now, "exp": now + ttl}, b"not-checked")


# -- identity on the upgrade ---------------------------------------------------------------------------------


@pytest.fixture
async def upgrade_server() -> AsyncIterator[tuple[str, list[Request], dict[str, Any]]]:
    """A WebSocket server that records each upgrade request and refuses it while ``refusal`` is set."""
    requests: list[Request] = []
    control: dict[str, Any] = {"refusal": None}

    def process_request(_connection: ServerConnection, request: Request) -> Response | None:
        requests.append(request)
        refusal = control["refusal"]
        if refusal is None:
            return None
        body = json.dumps({"code": "ClientVersionUnsupported", "message": refusal}).encode()
        return Response(http.HTTPStatus.BAD_REQUEST.value, "Bad Request",
                        Headers({"Content-Type": "application/json", "Content-Length": str(len(body))}), body)

    async def handler(connection: ServerConnection) -> None:
        async for _frame in connection:
            pass

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", requests, control


async def test_every_upgrade_names_our_client_and_keeps_the_version_out_of_the_path(
        upgrade_server: tuple[str, list[Request], dict[str, Any]]) -> None:
    """A path version would be read as the npm client's and refused (``client_version_from_req_parts``)."""
    url, requests, _ = upgrade_server
    async with SyncClient(url, None, backoff=FAST) as client:
        client.subscribe(LIST, ALL)
        await async_wait_until(lambda: requests, DEADLINE, "an upgrade request")
    [request] = requests
    assert request.path == "/api/sync"
    assert request.headers["Convex-Client"] == CLIENT_ID == f"stella-materializer-{__version__}"


async def test_a_refused_upgrade_is_logged_once_per_change_kept_as_the_detail_and_retried_on_backoff(
        upgrade_server: tuple[str, list[Request], dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    url, requests, control = upgrade_server
    control["refusal"] = UNSUPPORTED
    caplog.set_level(logging.ERROR, logger="materializer.convex")
    async with SyncClient(url, None, backoff=FAST) as client:
        client.subscribe(LIST, ALL)
        # Between attempts (DISCONNECTED), not during the next one (CONNECTING, no detail yet).
        await async_wait_until(lambda: len(requests) >= 4 and client.state is ConnectionState.DISCONNECTED,
                               DEADLINE, "a few refused upgrades")
        assert client.state_detail == f"HTTP 400 ClientVersionUnsupported: {UNSUPPORTED}"
        refusals = [r.getMessage() for r in caplog.records if "refused the WebSocket upgrade" in r.getMessage()]
        assert refusals == [f"convex sync: {client.url} refused the WebSocket upgrade: "
                            f"HTTP 400 ClientVersionUnsupported: {UNSUPPORTED}"]
        control["refusal"] = "something else"
        await async_wait_until(lambda: client.state_detail == "HTTP 400 ClientVersionUnsupported: something else",
                               DEADLINE, "the new refusal")
        refusals = [r.getMessage() for r in caplog.records if "refused the WebSocket upgrade" in r.getMessage()]
        assert len(refusals) == 2
        # On the backoff, not in a hot loop: waits of 25 ms and more, doubling, jittered.
        stamps = len(requests)
        started = time.monotonic()
        await async_wait_until(lambda: time.monotonic() - started > 1.0, DEADLINE, "a one-second window")
        assert len(requests) - stamps <= 1.0 / 0.025


# -- tokens that expire --------------------------------------------------------------------------------------


@pytest.fixture
def short_token_backend(tmp_path: Path) -> Iterator[DevBackend]:
    """A local backend whose tokens live 3 seconds (the real ones: 5 minutes)."""
    with DevBackend.start(tmp_path / "backend", token_ttl=3, extra_args=["--job-delay", "0.01"]) as backend:
        yield backend


class AppPipe:
    """The launching app's side of ``--token-fd``: a pipe it writes fresh tokens to."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self.written = 0

    def hand(self, token: str) -> None:
        os.write(self.write_end, f"{token}\n".encode())
        self.written += 1

    def close(self) -> None:
        for fd in (self.read_end, self.write_end):
            try:
                os.close(fd)
            except OSError:
                pass


async def test_tokens_refreshed_through_the_fd_keep_one_socket_alive_across_several_lifetimes(
        short_token_backend: DevBackend) -> None:
    backend = short_token_backend
    app = AppPipe()
    provider = FdTokenProvider(app.read_end)

    async def refresh_like_the_app() -> None:
        while True:  # the desktop's cadence: a new token well before the old one expires
            app.hand(await asyncio.to_thread(backend.mint_token, "demo-user", 3))
            await asyncio.sleep(1.0)

    refresher = asyncio.create_task(refresh_like_the_app())
    try:
        async with SyncClient(backend.url, provider, backoff=FAST) as client:
            values: list[Any] = []

            async def read() -> None:
                async for result in client.subscribe(LIST, ALL):
                    if isinstance(result, QueryValue):
                        values.append(result.value)

            reader = asyncio.create_task(read())
            created: list[str] = []
            # Jobs keep completing (each one makes the server re-run the query, where it checks the
            # token) until at least three lifetimes' worth of tokens went by.
            while app.written < 10:
                created += await asyncio.to_thread(backend.create_jobs, count=1)
                await async_wait_until(lambda: set(created) <= {j["jobId"] for v in values for j in v},
                                       DEADLINE, "the new job")
            assert client.connection_attempts == 1  # never refused, never closed for an expired token
            assert client.state is ConnectionState.CONNECTED
            reader.cancel()
    finally:
        refresher.cancel()
        await provider.aclose()
        app.close()


async def test_a_token_that_runs_out_with_nothing_newer_closes_the_socket_and_waits_in_token_needed(
        short_token_backend: DevBackend) -> None:
    backend = short_token_backend
    app = AppPipe()
    provider = FdTokenProvider(app.read_end)
    app.hand(await asyncio.to_thread(backend.mint_token, "demo-user", 3))
    try:
        async with SyncClient(backend.url, provider, backoff=FAST) as client:
            subscription = client.subscribe(LIST, ALL)
            await client.wait_for_state(ConnectionState.CONNECTED)
            await asyncio.wait_for(client.wait_for_state(ConnectionState.TOKEN_NEEDED), DEADLINE)
            assert client.state_detail is not None and "expired" in client.state_detail
            assert client.connection_attempts == 1
            [job] = await asyncio.to_thread(backend.create_jobs, count=1)
            app.hand(await asyncio.to_thread(backend.mint_token, "demo-user", 60))
            await asyncio.wait_for(client.wait_for_state(ConnectionState.CONNECTED), DEADLINE)

            async def delivered() -> None:
                async for result in subscription:
                    if isinstance(result, QueryValue) and job in [j["jobId"] for j in result.value]:
                        return

            await asyncio.wait_for(delivered(), DEADLINE)
            assert client.connection_attempts == 2
    finally:
        await provider.aclose()
        app.close()


@pytest.fixture
async def expiring_server() -> AsyncIterator[tuple[str, list[list[dict[str, Any]]]]]:
    """A server that accepts the token, then, like a real one whose clock ran past ``exp`` when it
    re-runs the queries (``crates/sync/src/state.rs``, "TokenExpired"), sends ``AuthError`` with
    ``authUpdateAttempted: false`` and its identity version (``crates/local_backend/src/subs/mod.rs``)."""
    received: list[list[dict[str, Any]]] = []
    zero = "AAAAAAAAAAA="

    async def handler(connection: ServerConnection) -> None:
        messages: list[dict[str, Any]] = []
        received.append(messages)
        async for frame in connection:
            messages.append(json.loads(frame))
            if messages[-1]["type"] == "ModifyQuerySet" and len(received) == 1:
                await connection.send(json.dumps({
                    "type": "Transition", "startVersion": {"querySet": 0, "identity": 0, "ts": zero},
                    "endVersion": {"querySet": 1, "identity": 1, "ts": zero},
                    "modifications": [{"type": "QueryUpdated", "queryId": 0, "value": [], "logLines": [],
                                       "journal": None}]}))
                await connection.send(json.dumps({"type": "AuthError",
                                                  "error": "TokenExpired: Convex token identity expired",
                                                  "baseVersion": 1, "authUpdateAttempted": False}))
                await connection.close()
                return

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", received


async def test_the_servers_lazy_expiry_notice_asks_the_source_for_a_fresh_token_not_for_sign_in(
        expiring_server: tuple[str, list[list[dict[str, Any]]]], tmp_path: Path) -> None:
    url, received = expiring_server
    first, fresh = unsigned_token(), unsigned_token(7200)
    source = tmp_path / "current"
    source.write_text(first)
    command = [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(source)!r}); print(p.read_text()); "
                                     f"p.write_text({fresh!r})"]
    provider = CommandTokenProvider(command)
    async with SyncClient(url, provider, backoff=FAST) as client:
        client.subscribe(LIST, ALL)
        await async_wait_until(lambda: len(received) >= 2 and any(m["type"] == "ModifyQuerySet" for m in received[1]),
                               DEADLINE, "a second socket")
        assert client.state is not ConnectionState.AUTH_REQUIRED
    tokens = [m.get("value") for socket in received for m in socket if m["type"] == "Authenticate"]
    assert tokens == [first, fresh]


async def test_the_servers_lazy_expiry_notice_with_no_newer_token_waits_in_token_needed(
        expiring_server: tuple[str, list[list[dict[str, Any]]]]) -> None:
    url, received = expiring_server
    async with SyncClient(url, StaticTokenProvider(unsigned_token()), backoff=FAST) as client:
        client.subscribe(LIST, ALL)
        await asyncio.wait_for(client.wait_for_state(ConnectionState.TOKEN_NEEDED), DEADLINE)
        assert len(received) == 1
