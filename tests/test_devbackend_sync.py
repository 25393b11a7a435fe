"""The local backend's Convex sync protocol, judged by the official client and by raw frames.

Each rule names the get-convex/convex-backend file it mirrors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from convex import ConvexClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from materializer.convex.values import decode_ts, encode_ts
from materializer.jwt import unverified_claims
from stella_devbackend.control import DevBackend
from stella_devbackend.options import add_arguments, options_from_args

from convex_oracle import OfficialSubscription
from helpers import async_wait_until, wait_until


def parse_backend_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def ids(value: list[dict[str, Any]]) -> set[str]:
    return {doc["jobId"] for doc in value}


def test_official_client_receives_each_job_as_it_succeeds(backend: DevBackend) -> None:
    watcher = OfficialSubscription(backend.url, "media_jobs:listSucceededSince", {"since": 0, "limit": 50},
                                   backend.token)
    assert watcher.until(lambda v: True) == []
    submitted: list[str] = []
    for prompt in ("one", "two", "three"):
        submitted.append(backend.generate({"capability": "icon", "prompt": prompt}).json()["jobId"])
        seen = watcher.until(lambda v: submitted[-1] in ids(v))
        assert [doc["jobId"] for doc in seen] == submitted[::-1]
        assert all(doc["status"] == "succeeded" for doc in seen)
    watcher.close()
    client = ConvexClient(backend.url)
    client.set_auth(backend.token)
    assert client.query("media_jobs:getByJobId", {"jobId": submitted[0]})["jobId"] == submitted[0]


def test_official_client_sees_only_its_owner(backend: DevBackend) -> None:
    job_id = backend.generate({"capability": "icon"}).json()["jobId"]
    backend.wait_for_job(job_id)
    intruder = ConvexClient(backend.url)
    intruder.set_auth(backend.mint_token("intruder", 600))
    assert intruder.query("media_jobs:getByJobId", {"jobId": job_id}) is None
    assert intruder.query("media_jobs:listSucceededSince", {"since": 0}) == []
    anonymous = ConvexClient(backend.url)
    assert anonymous.query("media_jobs:listSucceededSince", {"since": 0}) == []


def test_official_client_subscription_survives_a_backend_restart(backend: DevBackend) -> None:
    watcher = OfficialSubscription(backend.url, "media_jobs:listSucceededSince", {"since": 0}, backend.token)
    first = backend.generate({"capability": "icon", "prompt": "before"}).json()["jobId"]
    watcher.until(lambda v: first in ids(v))
    backend.restart()
    second = backend.generate({"capability": "icon", "prompt": "after"}).json()["jobId"]
    assert ids(watcher.until(lambda v: second in ids(v))) == {first, second}
    watcher.close()


# -- raw frames ---------------------------------------------------------------------------------


class Raw:
    """A hand-driven sync socket."""

    def __init__(self, backend: DevBackend, path: str = "/api/sync", headers: dict[str, str] | None = None) -> None:
        self._connection = connect(backend.url.replace("http://", "ws://") + path, additional_headers=headers,
                                   max_size=None)
        self.ws: ClientConnection = self._connection.__enter__()

    def send(self, message: dict[str, Any] | str) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            message = json.loads(self.ws.recv(timeout=timeout))
            if message["type"] != "Ping":
                return message

    def connect(self) -> None:
        self.send({"type": "Connect", "sessionId": str(uuid.uuid4()), "connectionCount": 0,
                   "lastCloseReason": None, "clientTs": time.time() * 1000})

    def authenticate(self, token: str, base: int = 0) -> None:
        self.send({"type": "Authenticate", "tokenType": "User", "value": token, "baseVersion": base})

    def add(self, query_id: int, path: str, args: dict[str, Any], base: int = 0) -> None:
        self.send({"type": "ModifyQuerySet", "baseVersion": base, "newVersion": base + 1,
                   "modifications": [{"type": "Add", "queryId": query_id, "udfPath": path, "args": [args]}]})

    def transition_at(self, query_set: int) -> dict[str, Any]:
        """The first Transition that has applied query set ``query_set`` (the identity change may come alone)."""
        while True:
            message = self.recv()
            if message["type"] == "Transition" and message["endVersion"]["querySet"] >= query_set:
                return message

    def close_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; the code of its close frame (1005: a frame without a code)."""
        try:
            while True:
                self.ws.recv(timeout=timeout)
        except ConnectionClosed as closed:
            return None if closed.rcvd is None else closed.rcvd.code

    def transition_or_chunks(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The next transition that applied a query set, and the chunks it came in (none if it came whole)."""
        while True:
            message = self.recv()
            parts = []
            while message["type"] == "TransitionChunk":
                parts.append(message)
                if len(parts) == message["totalParts"]:
                    message = json.loads("".join(p["chunk"] for p in parts))
                    break
                message = self.recv()
            if message["type"] == "Transition" and message["endVersion"]["querySet"] >= 1:
                return message, parts


NO_STATUS = 1005  # what a client reports for a close frame that carries no code


@pytest.fixture
def raw(backend: DevBackend) -> Iterator[Raw]:
    socket = Raw(backend)
    yield socket
    socket.ws.close()


def test_transitions_chain_versions_and_timestamps(backend: DevBackend, raw: Raw) -> None:
    raw.connect()
    raw.authenticate(backend.token)
    raw.add(7, "media_jobs.js:listSucceededSince", {"since": 0.0, "limit": 50.0})
    version = {"querySet": 0, "identity": 0, "ts": encode_ts(0)}
    values: dict[int, Any] = {}
    job_id = backend.generate({"capability": "icon"}).json()["jobId"]
    while job_id not in ids(values.get(7, [])):
        transition = raw.recv()
        assert transition["type"] == "Transition"
        assert transition["startVersion"] == version
        assert decode_ts(transition["endVersion"]["ts"]) >= decode_ts(version["ts"])
        assert isinstance(transition["serverTs"], int)
        version = transition["endVersion"]
        for modification in transition["modifications"]:
            assert modification["type"] == "QueryUpdated" and modification["queryId"] == 7
            assert modification["logLines"] == [] and "journal" in modification
            values[7] = modification["value"]
    assert version["querySet"] == 1 and version["identity"] == 1

    raw.send({"type": "ModifyQuerySet", "baseVersion": 1, "newVersion": 2,
              "modifications": [{"type": "Remove", "queryId": 7},
                                {"type": "Add", "queryId": 8, "udfPath": "media_jobs:getByJobId",
                                 "args": [{"jobId": 12}]}]})
    transition = raw.recv()
    assert transition["startVersion"] == version and transition["endVersion"]["querySet"] == 2
    by_type = {m["type"]: m for m in transition["modifications"]}
    assert by_type["QueryRemoved"]["queryId"] == 7
    assert by_type["QueryFailed"]["queryId"] == 8
    assert "ArgumentValidationError" in by_type["QueryFailed"]["errorMessage"]


def test_client_clock_skew_is_measured_once_at_connect(backend: DevBackend, raw: Raw) -> None:
    """crates/sync/src/worker.rs, ClientMessage::Connect: clientClockSkew = clientTs - the server's clock at
    Connect, computed once and sent with every Transition (not recomputed as the session ages)."""
    raw.send({"type": "Connect", "sessionId": str(uuid.uuid4()), "connectionCount": 0, "lastCloseReason": None,
              "clientTs": time.time() * 1000 - 60_000})  # a client clock a minute behind
    raw.authenticate(backend.token)
    raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
    first = raw.transition_at(1)
    backend.create_jobs(count=1)
    second = raw.recv()
    assert second["type"] == "Transition"
    assert -61_000 < first["clientClockSkew"] < -59_000
    assert second["clientClockSkew"] == first["clientClockSkew"]


def test_refused_token_gets_auth_error_and_a_close_without_code(backend: DevBackend, raw: Raw) -> None:
    """crates/local_backend/src/subs/mod.rs: AuthUpdateFailed -> AuthError (attempted), then Close(None)."""
    raw.connect()
    raw.authenticate("not.a.token")
    error = raw.recv()
    assert error == {"type": "AuthError", "error": error["error"], "baseVersion": 0, "authUpdateAttempted": True}
    assert "Could not verify token" in error["error"]
    assert raw.close_code() == NO_STATUS


def test_already_expired_token_is_refused_when_it_is_presented(backend: DevBackend, raw: Raw) -> None:
    """crates/sync/src/worker.rs Authenticate: fetch_identity refuses it -> AuthError with authUpdateAttempted."""
    raw.connect()
    raw.authenticate(backend.mint_token("demo-user", -5))
    error = raw.recv()
    assert error["type"] == "AuthError" and error["authUpdateAttempted"] is True and error["baseVersion"] == 0
    assert raw.close_code() == NO_STATUS


def expire_mid_session(backend: DevBackend, raw: Raw, owner: str = "demo-user") -> None:
    """Authenticate with a one-second token, subscribe, and wait until the token is past its ``exp``."""
    token = backend.mint_token(owner, 1)
    raw.connect()
    raw.authenticate(token)
    raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
    raw.transition_at(1)
    claims = unverified_claims(token)
    assert claims is not None
    exp = claims["exp"]
    wait_until(lambda: time.time() > exp + 0.05, what="the token's exp")


def test_token_expiry_is_noticed_lazily_at_the_next_rerun(backend: DevBackend, raw: Raw) -> None:
    """crates/sync/src/state.rs identity(): "TokenExpired" is checked when queries re-run, not on a timer."""
    expire_mid_session(backend, raw)
    with pytest.raises(TimeoutError):
        raw.recv(timeout=0.5)  # nothing re-ran, so nothing noticed
    backend.create_jobs(count=1, share_files=True)  # a write in the session's read set re-runs its query
    error = raw.recv()
    assert error == {"type": "AuthError", "error": "Convex token identity expired", "baseVersion": 1,
                     "authUpdateAttempted": False}
    assert raw.close_code() == NO_STATUS


def test_writes_outside_the_read_set_do_not_rerun_and_a_query_change_does(backend: DevBackend, raw: Raw) -> None:
    """crates/sync/src/worker.rs: only an invalidated query or a ModifyQuerySet schedules the re-run that checks."""
    expire_mid_session(backend, raw)
    backend.create_jobs(count=1, share_files=True, owner="someone-else")
    with pytest.raises(TimeoutError):
        raw.recv(timeout=0.5)
    raw.add(1, "media_jobs:listFailedSince", {"since": 0}, base=1)
    error = raw.recv()
    assert error["type"] == "AuthError" and error["error"] == "Convex token identity expired"
    assert error["authUpdateAttempted"] is False
    assert raw.close_code() == NO_STATUS


def test_unauthenticated_list_is_empty_not_an_error(backend: DevBackend, raw: Raw) -> None:
    backend.create_jobs(count=2, share_files=True)
    raw.connect()
    raw.send({"type": "Authenticate", "tokenType": "None", "baseVersion": 0})
    raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
    transition = raw.transition_at(1)
    assert transition["modifications"] == [
        {"type": "QueryUpdated", "queryId": 0, "value": [], "logLines": [], "journal": None}
    ]


CHUNKY = ["--chunk-threshold", "2000", "--chunk-size", "700"]


@pytest.fixture(scope="module")
def chunky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBackend]:
    """A backend that splits transitions over 2,000 bytes into parts of 700 (the real rule's sizes, shrunk).

    One for the module: its tests only subscribe to the same 30 jobs and read the first transition.
    """
    with DevBackend.start(tmp_path_factory.mktemp("chunky"), extra_args=CHUNKY) as backend:
        backend.create_jobs(count=30, share_files=True, prompt="un café \U0001f642 bien chaud")
        yield backend


def subscribed(backend: DevBackend, path: str, headers: dict[str, str] | None = None) -> Raw:
    raw = Raw(backend, path, headers)
    raw.connect()
    raw.authenticate(backend.token)
    raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
    return raw


@pytest.mark.parametrize(("path", "headers"), [
    ("/api/1.45.0/sync", None),
    ("/api/1.28.0/sync", None),
    ("/api/sync", {"Convex-Client": "npm-1.45.0"}),
])
def test_npm_clients_from_1_28_get_large_transitions_in_utf8_safe_chunks(
    chunky: DevBackend, path: str, headers: dict[str, str] | None
) -> None:
    """crates/local_backend/src/subs/mod.rs maybe_split_transition and MIN_NPM_VERSION_FOR_TRANSITION_CHUNKS."""
    raw = subscribed(chunky, path, headers)
    transition, parts = raw.transition_or_chunks()
    assert len(parts) > 1
    assert [p["partNumber"] for p in parts] == list(range(len(parts)))
    assert {p["totalParts"] for p in parts} == {len(parts)}
    text = "".join(p["chunk"] for p in parts)
    assert {p["transitionId"] for p in parts} == {str(len(text.encode()))}  # the JSON's length in bytes
    assert all(len(p["chunk"].encode()) <= 700 for p in parts)
    assert len(transition["modifications"][0]["value"]) == 30
    raw.ws.close()


@pytest.mark.parametrize(("path", "headers"), [
    ("/api/1.27.9/sync", None),
    ("/api/1.28.0-alpha.1/sync", None),
    ("/api/sync", {"Convex-Client": "python-convex-0.8.1"}),
    ("/api/sync", {"Convex-Client": "rust-0.5.0"}),
    ("/api/sync", {"Convex-Client": "stella-materializer-0.1.0"}),
    ("/api/1.45.0/sync", {"Convex-Client": "stella-materializer-0.1.0"}),  # the header wins over the path
    ("/api/sync", None),
])
def test_other_clients_always_get_whole_transitions(
    chunky: DevBackend, path: str, headers: dict[str, str] | None
) -> None:
    """crates/local_backend/src/subs/mod.rs new_sync_worker_config: supports_transition_chunks only for npm."""
    raw = subscribed(chunky, path, headers)
    transition, parts = raw.transition_or_chunks()
    assert parts == [] and len(transition["modifications"][0]["value"]) == 30
    raw.ws.close()


def test_small_transitions_stay_whole_for_npm_clients(backend: DevBackend) -> None:
    """crates/local_backend/src/subs/mod.rs: only a transition over MAX_MESSAGE_SIZE (5,000,000) is split."""
    backend.create_jobs(count=30, share_files=True)
    raw = subscribed(backend, "/api/1.45.0/sync")
    transition, parts = raw.transition_or_chunks()
    assert parts == [] and len(transition["modifications"][0]["value"]) == 30
    raw.ws.close()


CONNECT = {"type": "Connect", "sessionId": str(uuid.uuid4()), "connectionCount": 0, "lastCloseReason": None}


@pytest.mark.parametrize(
    ("before", "message", "named"),
    [
        ([], "{nope", "not JSON"),
        ([], "[1]", "JSON object"),
        ([], {"type": "Teleport"}, "unknown message type"),
        ([], {"type": "Authenticate", "tokenType": "None", "baseVersion": 0}, "before Connect"),
        ([], {**CONNECT, "sessionId": "not-a-uuid"}, "sessionId"),
        ([], {**CONNECT, "connectionCount": -1}, "connectionCount"),
        ([], {**CONNECT, "connectionCount": 1.5}, "connectionCount"),
        ([], {**CONNECT, "maxObservedTimestamp": "AAAA"}, "maxObservedTimestamp"),
        ([], {**CONNECT, "surprise": 1}, "unexpected field"),
        ([CONNECT], CONNECT, "Connect sent twice"),
        ([CONNECT], {"type": "Authenticate", "tokenType": "None", "baseVersion": 3}, "baseVersion 3"),
        ([CONNECT], {"type": "Authenticate", "tokenType": "Magic", "baseVersion": 0}, "tokenType"),
        ([CONNECT], {"type": "ModifyQuerySet", "baseVersion": 0, "newVersion": 2, "modifications": []},
         "newVersion"),
        ([CONNECT], {"type": "ModifyQuerySet", "baseVersion": 1, "newVersion": 2, "modifications": []},
         "baseVersion 1"),
        ([CONNECT], {"type": "ModifyQuerySet", "baseVersion": 0, "newVersion": 1,
                     "modifications": [{"type": "Add", "queryId": 0, "udfPath": "media_jobs:getByJobId",
                                        "args": {"jobId": "x"}}]}, "array holding one object"),
        ([CONNECT], {"type": "ModifyQuerySet", "baseVersion": 0, "newVersion": 1,
                     "modifications": [{"type": "Add", "queryId": 0, "udfPath": "media_jobs:getByJobId",
                                        "args": [{"$weird": 1}]}]}, "Convex JSON"),
        ([CONNECT], {"type": "ModifyQuerySet", "baseVersion": 0, "newVersion": 1,
                     "modifications": [{"type": "Remove", "queryId": 4}]}, "not in the query set"),
        ([CONNECT], {"type": "ModifyQuerySet", "baseVersion": 0, "newVersion": 1,
                     "modifications": [{"type": "Add", "queryId": 0, "udfPath": "a:b", "args": [{}]},
                                       {"type": "Add", "queryId": 0, "udfPath": "a:b", "args": [{}]}]},
         "already in the query set"),
        ([CONNECT], {"type": "ModifyQuerySet", "baseVersion": 0, "newVersion": 1,
                     "modifications": [{"type": "Swap", "queryId": 0}]}, "unknown modification type"),
    ],
)
def test_malformed_client_messages_get_fatal_error(raw: Raw, before: list[dict[str, Any]],
                                                   message: dict[str, Any] | str, named: str) -> None:
    """crates/local_backend/src/subs/mod.rs: a BadRequest ends with FatalError and a close frame with no code."""
    for earlier in before:
        raw.send(earlier)
    raw.send(message)
    fatal = raw.recv()
    assert fatal["type"] == "FatalError"
    assert named in fatal["error"]
    assert raw.close_code() == NO_STATUS


def test_binary_frames_are_refused(raw: Raw) -> None:
    """crates/local_backend/src/subs/mod.rs receive_messages: only text frames carry messages."""
    raw.ws.send(b"\x00\x01")
    fatal = raw.recv()
    assert fatal["type"] == "FatalError" and "binary" in fatal["error"]
    assert raw.close_code() == NO_STATUS


def test_a_timestamp_from_the_future_is_an_internal_error(backend: DevBackend, raw: Raw) -> None:
    """crates/sync/src/worker.rs Connect: maxObservedTimestamp ahead of the latest ts bails (1011, no message)."""
    ahead = encode_ts(backend.stats()["ts"] + 10**12)
    raw.send({**CONNECT, "maxObservedTimestamp": ahead})
    with pytest.raises(ConnectionClosed) as closed:
        raw.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "InternalServerError")


def test_drop_and_overload_faults(backend: DevBackend, raw: Raw) -> None:
    raw.connect()
    raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
    raw.recv()
    assert backend.drop_connections() == 1
    assert raw.close_code() is None  # cut, no close frame at all
    backend.set_faults([{"kind": "refuse_sync", "reason": "TooManyConcurrentRequests", "times": 1}])
    refused = Raw(backend)
    with pytest.raises(ConnectionClosed) as closed:
        refused.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.reason == "TooManyConcurrentRequests"


def test_withheld_transitions_arrive_when_released(backend: DevBackend, raw: Raw) -> None:
    raw.connect()
    raw.authenticate(backend.token)
    raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
    raw.transition_at(1)
    backend.set_faults([{"kind": "withhold_transitions"}])
    job = backend.create_jobs(count=1, share_files=True)[0]
    with pytest.raises(TimeoutError):
        raw.recv(timeout=0.5)
    backend.clear_faults()
    assert ids(raw.recv()["modifications"][0]["value"]) == {job}


def test_sync_ping_comes_after_a_quiet_period_not_on_a_fixed_tick(tmp_path: Path) -> None:
    """crates/sync/src/worker.rs HEARTBEAT_INTERVAL: the Ping timer restarts whenever the worker sends anything."""
    interval = 1.0
    with DevBackend.start(tmp_path / "b", extra_args=["--ping-interval", str(interval)]) as backend:
        raw = Raw(backend)
        raw.connect()
        raw.authenticate(backend.token)
        raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
        arrivals: list[tuple[float, str]] = []

        def receive() -> str:
            kind = json.loads(raw.ws.recv(timeout=10))["type"]
            arrivals.append((time.monotonic(), kind))
            return kind

        burst_end = time.monotonic() + 3 * interval
        while time.monotonic() < burst_end:  # keep transitions coming faster than the interval
            if receive() == "Transition":
                backend.create_jobs(count=1, share_files=True)
        while receive() != "Ping":
            pass
        gaps = [(kind, later - earlier) for (earlier, _), (later, kind) in zip(arrivals, arrivals[1:], strict=False)]
        # During the burst no gap reached the interval, so a fixed tick would have pinged inside it.
        assert [kind for kind, _ in gaps[:-1]] == ["Transition"] * (len(gaps) - 1)
        assert max(gap for _, gap in gaps[:-1]) < interval
        assert gaps[-1][1] >= interval * 0.9
        raw.ws.close()


async def test_websocket_pings_and_the_client_timeout(tmp_path: Path) -> None:
    """crates/local_backend/src/subs/mod.rs: ping frames on a tick (the first at once); a silent client is
    dropped with 1000 ClientDisconnected once CLIENT_TIMEOUT has passed, one that answers is kept."""
    args = ["--ws-ping-interval", "0.5", "--client-timeout", "1.2"]
    with DevBackend.start(tmp_path / "b", extra_args=args) as backend:
        url = backend.url + "/api/sync"
        async with aiohttp.ClientSession() as http:
            silent = await http.ws_connect(url, autoping=False, autoclose=False)
            started = time.monotonic()
            first = await silent.receive(timeout=10)
            assert first.type is aiohttp.WSMsgType.PING and time.monotonic() - started < 0.4
            pings = 1
            while (message := await silent.receive(timeout=10)).type is aiohttp.WSMsgType.PING:
                pings += 1
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert (message.data, message.extra) == (1000, "ClientDisconnected")
            assert time.monotonic() - started >= 1.2 and pings >= 3
            await silent.close()

            answering = await http.ws_connect(url, autoping=True)
            kept_until = time.monotonic() + 3.0

            async def stays_open() -> bool:
                with pytest.raises(asyncio.TimeoutError):
                    await answering.receive(timeout=0.1)  # pings are answered inside; nothing else arrives
                return time.monotonic() > kept_until

            await async_wait_until(stays_open, timeout=10, what="3 s on an answering socket")
            assert not answering.closed
            await answering.close()


def test_a_query_that_reads_more_than_its_budget_fails_as_convex_fails_it(tmp_path: Path) -> None:
    """crates/database/src/reads.rs record_read_document: every document read counts against
    TRANSACTION_MAX_READ_SIZE_BYTES (16 MiB, crates/common/src/knobs.rs) and the function fails with
    TooManyBytesRead once the total passes it, whatever ``limit`` asked for: a QueryFailed on the socket,
    an error answer over HTTP. A smaller window of the same jobs is answered. (``--max-read-bytes`` makes
    the budget small enough for a test; the default is Convex's.)"""
    with DevBackend.start(tmp_path / "b", extra_args=["--max-read-bytes", "200000"]) as backend:
        backend.create_jobs(count=5, share_files=True, width=8, height=8, prompt="p" * 50_000)
        raw = Raw(backend)
        raw.connect()
        raw.authenticate(backend.token)
        raw.add(0, "media_jobs:listSucceededSince", {"since": 0, "limit": 5})
        [failed] = raw.transition_at(1)["modifications"]
        assert failed["type"] == "QueryFailed"
        assert failed["errorMessage"].startswith(
            "Too many bytes read in a single function execution (limit: 200000 bytes). Consider using smaller limits")
        raw.send({"type": "ModifyQuerySet", "baseVersion": 1, "newVersion": 2, "modifications": [
            {"type": "Remove", "queryId": 0},
            {"type": "Add", "queryId": 1, "udfPath": "media_jobs:listSucceededSince",
             "args": [{"since": 0, "limit": 3}]}]})
        answered = [m for m in raw.transition_at(2)["modifications"] if m["queryId"] == 1]
        assert answered[0]["type"] == "QueryUpdated" and len(answered[0]["value"]) == 3
        raw.ws.close()
        over_http = backend.query("media_jobs:listSucceededSince", {"since": 0, "limit": 200}).json()
        assert over_http["status"] == "error" and "Too many bytes read" in over_http["errorMessage"]
    assert options_from_args(parse_backend_args([]), tmp_path).max_read_bytes == 16 * 1024 * 1024


def test_the_backend_clock_offset_moves_every_server_stamp(tmp_path: Path) -> None:
    """A deployment keeps its own time. ``--clock-offset`` moves the backend's clock; what it stamps follows:
    ``serverTs`` (nanoseconds, stamped right before the message goes out: crates/local_backend/src/subs/mod.rs
    ``inject_server_ts(generate_timestamp())``), ``clientClockSkew`` (clientTs minus the server's clock,
    crates/sync/src/worker.rs), token ``iat``, and jobs' ``completedAt``."""
    year = 365.25 * 86_400
    with DevBackend.start(tmp_path / "b", extra_args=["--clock-offset", str(-year)]) as backend:
        local_ms = time.time() * 1000
        server_ms = local_ms - year * 1000
        raw = Raw(backend)
        raw.connect()
        raw.authenticate(backend.token)
        raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
        first = raw.transition_at(1)
        assert abs(first["serverTs"] / 1e6 - server_ms) < 600_000
        assert abs(first["clientClockSkew"] - year * 1000) < 600_000
        [job_id] = backend.create_jobs(count=1, share_files=True, width=8, height=8)
        second = raw.recv()
        assert second["type"] == "Transition" and second["serverTs"] > first["serverTs"]
        [doc] = second["modifications"][0]["value"]
        assert doc["jobId"] == job_id and abs(doc["completedAt"] - server_ms) < 600_000
        claims = unverified_claims(backend.token) or {}
        assert abs(claims["iat"] * 1000 - server_ms) < 600_000
        raw.ws.close()
