"""The local backend's Convex sync protocol, judged by the official client and by raw frames."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from convex import ConvexClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from materializer.convex.values import decode_ts, encode_ts
from materializer.devbackend.control import DevBackend
from materializer.devbackend.oracle import OfficialSubscription


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

    def __init__(self, backend: DevBackend, path: str = "/api/sync") -> None:
        self._connection = connect(backend.url.replace("http://", "ws://") + path)
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

    def closed(self, timeout: float = 10.0) -> bool:
        try:
            while True:
                self.ws.recv(timeout=timeout)
        except ConnectionClosed:
            return True


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


def test_refused_token_gets_auth_error_and_close(backend: DevBackend, raw: Raw) -> None:
    raw.connect()
    raw.authenticate("not.a.token")
    error = raw.recv()
    assert error == {"type": "AuthError", "error": error["error"], "baseVersion": 0, "authUpdateAttempted": True}
    assert "Could not verify token" in error["error"]
    assert raw.closed()


def test_token_expiry_mid_session_gets_auth_error(backend: DevBackend, raw: Raw) -> None:
    raw.connect()
    raw.authenticate(backend.mint_token("demo-user", 2.0))
    raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
    message = raw.recv(timeout=15)
    while message["type"] == "Transition":
        message = raw.recv(timeout=15)
    assert message["type"] == "AuthError" and message["error"] == "Token expired"
    assert message["authUpdateAttempted"] is False and message["baseVersion"] == 1
    assert raw.closed()


def test_unauthenticated_list_is_empty_not_an_error(backend: DevBackend, raw: Raw) -> None:
    backend.create_jobs(count=2, share_files=True)
    raw.connect()
    raw.send({"type": "Authenticate", "tokenType": "None", "baseVersion": 0})
    raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
    transition = raw.transition_at(1)
    assert transition["modifications"] == [
        {"type": "QueryUpdated", "queryId": 0, "value": [], "logLines": [], "journal": None}
    ]


def test_large_transitions_are_chunked_only_for_versioned_clients(tmp_path: Any) -> None:
    with DevBackend.start(tmp_path / "b", extra_args=["--chunk-size", "2000"]) as backend:
        backend.create_jobs(count=30, share_files=True)
        for path, chunked in (("/api/1.45.0/sync", True), ("/api/sync", False)):
            raw = Raw(backend, path)
            raw.connect()
            raw.authenticate(backend.token)
            raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
            first = raw.recv()
            while first["type"] == "Transition" and first["endVersion"]["querySet"] == 0:
                first = raw.recv()  # the identity change alone, before the query set arrived
            if not chunked:
                assert first["type"] == "Transition" and len(first["modifications"][0]["value"]) == 30
                raw.ws.close()
                continue
            parts = [first]
            assert first["type"] == "TransitionChunk" and first["partNumber"] == 0
            while len(parts) < first["totalParts"]:
                parts.append(raw.recv())
            assert [p["partNumber"] for p in parts] == list(range(first["totalParts"]))
            assert {p["transitionId"] for p in parts} == {first["transitionId"]}
            assert all(len(p["chunk"]) <= 2000 for p in parts)
            transition = json.loads("".join(p["chunk"] for p in parts))
            assert transition["type"] == "Transition"
            assert len(transition["modifications"][0]["value"]) == 30
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
    for earlier in before:
        raw.send(earlier)
    raw.send(message)
    fatal = raw.recv()
    assert fatal["type"] == "FatalError"
    assert named in fatal["error"]
    assert raw.closed()


def test_binary_frames_are_refused(raw: Raw) -> None:
    raw.ws.send(b"\x00\x01")
    fatal = raw.recv()
    assert fatal["type"] == "FatalError" and "binary" in fatal["error"]


def test_drop_and_overload_faults(backend: DevBackend, raw: Raw) -> None:
    raw.connect()
    raw.add(0, "media_jobs:listSucceededSince", {"since": 0})
    raw.recv()
    assert backend.drop_connections() == 1
    assert raw.closed()
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
