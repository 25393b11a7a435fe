"""The sans-I/O sync protocol core: plain data in, plain data out, no sockets."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from materializer.convex.protocol import (
    AuthRefused,
    PingReceived,
    ProtocolError,
    QueryFailure,
    QueryValue,
    ServerFatal,
    SyncProtocol,
    TransitionApplied,
    Version,
)
from materializer.convex.values import Int64, encode_ts

# -- frame builders -------------------------------------------------------------------------------


def version(query_set: int, identity: int, ts: int) -> dict[str, Any]:
    return {"querySet": query_set, "identity": identity, "ts": encode_ts(ts)}


def transition(start: tuple[int, int, int], end: tuple[int, int, int], *modifications: dict[str, Any],
               **extra: Any) -> str:
    return json.dumps({"type": "Transition", "startVersion": version(*start), "endVersion": version(*end),
                       "modifications": list(modifications), **extra})


def updated(query_id: int, value: Any) -> dict[str, Any]:
    return {"type": "QueryUpdated", "queryId": query_id, "value": value, "logLines": [], "journal": None}


def failed(query_id: int, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "QueryFailed", "queryId": query_id, "errorMessage": message, "logLines": [], "journal": None,
            **extra}


def chunks(text: str, parts: int, transition_id: str = "t1") -> list[str]:
    size = -(-len(text) // parts)
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    assert len(pieces) == parts
    return [json.dumps({"type": "TransitionChunk", "chunk": piece, "partNumber": n, "totalParts": parts,
                        "transitionId": transition_id}) for n, piece in enumerate(pieces)]


def connected(token: str | None = "jwt", queries: int = 1) -> tuple[SyncProtocol, list[int]]:
    """A core with ``queries`` subscriptions on an open socket, everything sent but nothing confirmed."""
    core = SyncProtocol()
    core.set_auth(token)
    ids = [core.add_query("media_jobs:listSucceededSince", {"since": n})[0] for n in range(queries)]
    core.socket_opened(now_ms=1000.0, last_close_reason="InitialConnect")
    return core, ids


def applied(event: Any) -> TransitionApplied:
    assert isinstance(event, TransitionApplied), event
    return event


# -- what the client sends ------------------------------------------------------------------------------


def test_first_socket_sends_connect_authenticate_and_the_query_set() -> None:
    core = SyncProtocol()
    core.set_auth("the-jwt")
    query_id, sent = core.add_query("media_jobs:listSucceededSince", {"since": 1.5, "limit": 50, "n": Int64(7)})
    assert (query_id, sent) == (0, [])  # no socket yet: nothing to send
    connect, authenticate, modify = core.socket_opened(now_ms=1234.9, last_close_reason="InitialConnect")
    assert connect == {"type": "Connect", "sessionId": core.session_id, "connectionCount": 0,
                       "lastCloseReason": "InitialConnect", "clientTs": 1234}
    uuid.UUID(core.session_id)
    assert authenticate == {"type": "Authenticate", "tokenType": "User", "value": "the-jwt", "baseVersion": 0}
    assert modify == {
        "type": "ModifyQuerySet", "baseVersion": 0, "newVersion": 1,
        "modifications": [{"type": "Add", "queryId": 0, "udfPath": "media_jobs:listSucceededSince",
                           "args": [{"since": 1.5, "limit": 50.0, "n": {"$integer": "BwAAAAAAAAA="}}]}],
    }


def test_without_token_or_queries_only_connect_is_sent_and_nothing_is_outstanding() -> None:
    core = SyncProtocol()
    [connect] = core.socket_opened(now_ms=0, last_close_reason=None)
    assert connect["type"] == "Connect" and connect["lastCloseReason"] is None
    assert "maxObservedTimestamp" not in connect
    assert core.caught_up


def test_query_changes_on_a_live_socket_count_the_query_set_version_up() -> None:
    core, [first] = connected()
    second, [add] = core.add_query("media_jobs:getByJobId", {"jobId": "job_1"})
    assert add == {"type": "ModifyQuerySet", "baseVersion": 1, "newVersion": 2,
                   "modifications": [{"type": "Add", "queryId": second, "udfPath": "media_jobs:getByJobId",
                                      "args": [{"jobId": "job_1"}]}]}
    assert core.remove_query(second) == [{"type": "ModifyQuerySet", "baseVersion": 2, "newVersion": 3,
                                          "modifications": [{"type": "Remove", "queryId": second}]}]
    new_id, [replace] = core.replace_query(first, {"since": 99})
    assert new_id not in (first, second)
    assert replace == {
        "type": "ModifyQuerySet", "baseVersion": 3, "newVersion": 4,
        "modifications": [{"type": "Remove", "queryId": first},
                          {"type": "Add", "queryId": new_id, "udfPath": "media_jobs:listSucceededSince",
                           "args": [{"since": 99.0}]}],
    }
    assert core.active_query_ids == (new_id,)


def test_set_auth_on_a_live_socket_counts_the_identity_version_up() -> None:
    core, _ = connected(token="first")
    assert core.set_auth("second") == [{"type": "Authenticate", "tokenType": "User", "value": "second",
                                        "baseVersion": 1}]
    assert core.set_auth(None) == [{"type": "Authenticate", "tokenType": "None", "baseVersion": 2}]


def test_bad_caller_input_raises_at_once() -> None:
    core = SyncProtocol()
    with pytest.raises(ValueError, match="Convex"):
        core.add_query("m:f", {"bad": object()})
    with pytest.raises(ValueError, match="object"):
        core.add_query("m:f", ["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="udf_path"):
        core.add_query("", {})
    with pytest.raises(KeyError):
        core.remove_query(42)
    with pytest.raises(KeyError):
        core.replace_query(42, {})
    assert core.active_query_ids == ()


# -- transitions ------------------------------------------------------------------------------------------


def test_transition_delivers_values_confirms_auth_and_catches_up() -> None:
    core, [query] = connected()
    event = applied(core.receive(transition((0, 0, 0), (1, 1, 7), updated(query, [{"jobId": "a", "n": 1}]),
                                             serverTs=7, clientClockSkew=-3)))
    [result] = event.results
    assert result == QueryValue(query, "media_jobs:listSucceededSince", {"since": 0}, [{"jobId": "a", "n": 1.0}], ())
    assert event.caught_up and event.auth_confirmed
    assert event.version == Version(1, 1, 7) == core.server_version
    assert core.latest(query) == result


def test_server_ts_is_the_servers_clock_in_ms_and_may_be_null() -> None:
    """serverTs is nanoseconds (convex-js web_socket_manager.ts divides it by 1_000_000); both it and
    clientClockSkew are Option<i64> in the server's message type, null when unset."""
    core, [query] = connected()
    event = applied(core.receive(transition((0, 0, 0), (1, 1, 7), serverTs=1_700_000_000_123_000_000,
                                             clientClockSkew=None)))
    assert event.server_ts_ms == 1_700_000_000_123.0 and event.client_clock_skew_ms is None
    assert applied(core.receive(transition((1, 1, 7), (1, 1, 8), serverTs=None))).server_ts_ms is None
    assert core.query_args(query) == {"since": 0}


def test_a_partial_transition_is_not_caught_up() -> None:
    core, [query] = connected()
    event = applied(core.receive(transition((0, 0, 0), (0, 1, 3))))
    assert event.auth_confirmed and not event.caught_up and event.results == ()
    event = applied(core.receive(transition((0, 1, 3), (1, 1, 4), updated(query, []))))
    assert event.caught_up and not event.auth_confirmed


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ((1, 0, 0), (1, 1, 1)),  # start query set differs from the client's 0
        ((0, 1, 0), (1, 1, 1)),  # start identity differs
        ((0, 0, 5), (1, 1, 6)),  # start ts differs
    ],
)
def test_version_mismatch_is_a_protocol_error_and_changes_nothing(start: tuple[int, int, int],
                                                                  end: tuple[int, int, int]) -> None:
    core, [query] = connected()
    event = core.receive(transition(start, end, updated(query, "x")))
    assert isinstance(event, ProtocolError) and "startVersion" in event.reason
    assert core.latest(query) is None
    assert core.server_version == Version(0, 0, 0)


def test_end_version_ahead_of_what_was_sent_or_going_back_is_a_protocol_error() -> None:
    core, [query] = connected()
    assert isinstance(core.receive(transition((0, 0, 0), (2, 1, 1))), ProtocolError)  # only querySet 1 sent
    assert isinstance(core.receive(transition((0, 0, 0), (1, 2, 1))), ProtocolError)  # only identity 1 sent
    applied(core.receive(transition((0, 0, 0), (1, 1, 10), updated(query, 1))))
    assert isinstance(core.receive(transition((1, 1, 10), (1, 1, 9))), ProtocolError)  # ts back


def test_query_failed_then_recovery() -> None:
    core, [query] = connected()
    event = applied(core.receive(transition((0, 0, 0), (1, 1, 1),
                                            failed(query, "Uncaught Error: boom", errorData={"code": "X"}))))
    [failure] = event.results
    assert isinstance(failure, QueryFailure)
    assert (failure.error_message, failure.error_data) == ("Uncaught Error: boom", {"code": "X"})
    assert core.latest(query) == failure
    event = applied(core.receive(transition((1, 1, 1), (1, 1, 2), updated(query, ["ok"]))))
    assert [r.value for r in event.results if isinstance(r, QueryValue)] == [["ok"]]
    assert core.latest(query) == event.results[0]


def test_identical_results_are_not_new_results() -> None:
    core, [query] = connected()
    applied(core.receive(transition((0, 0, 0), (1, 1, 1), updated(query, {"a": 1}))))
    assert applied(core.receive(transition((1, 1, 1), (1, 1, 2), updated(query, {"a": 1.0})))).results == ()
    changed = applied(core.receive(transition((1, 1, 2), (1, 1, 3), updated(query, {"a": True}))))
    assert [r.value for r in changed.results if isinstance(r, QueryValue)] == [{"a": True}]  # true is not 1
    applied(core.receive(transition((1, 1, 3), (1, 1, 4), failed(query, "boom"))))
    assert applied(core.receive(transition((1, 1, 4), (1, 1, 5), failed(query, "boom")))).results == ()
    again = applied(core.receive(transition((1, 1, 5), (1, 1, 6), failed(query, "boom", errorData="more"))))
    assert len(again.results) == 1


def test_results_for_removed_queries_are_ignored_and_query_removed_clears_nothing_active() -> None:
    core, [keep, drop] = connected(queries=2)
    core.remove_query(drop)  # querySet 2 sent; the server has not seen it yet
    event = applied(core.receive(transition((0, 0, 0), (1, 1, 1), updated(keep, 1), updated(drop, 2))))
    assert [r.query_id for r in event.results] == [keep]
    event = applied(core.receive(transition((1, 1, 1), (2, 1, 2), {"type": "QueryRemoved", "queryId": drop})))
    assert event.results == () and event.caught_up
    assert core.latest(drop) is None and core.latest(keep) is not None


def test_changing_args_moves_the_subscription_to_a_new_query() -> None:
    core, [old] = connected()
    applied(core.receive(transition((0, 0, 0), (1, 1, 1), updated(old, ["old"]))))
    new, _ = core.replace_query(old, {"since": 5})
    assert core.latest(old) is None
    event = applied(core.receive(transition((1, 1, 1), (2, 1, 2), {"type": "QueryRemoved", "queryId": old},
                                            updated(new, ["new"]))))
    [result] = event.results
    assert isinstance(result, QueryValue) and result.args == {"since": 5} and result.value == ["new"]


# -- chunked transitions ------------------------------------------------------------------------------------


def big_transition(query: int) -> str:
    return transition((0, 0, 0), (1, 1, 1), updated(query, ["x" * 50, "y" * 50, "z" * 50]))


def test_chunks_in_order_reassemble_into_one_transition() -> None:
    core, [query] = connected()
    first, second, third = chunks(big_transition(query), 3)
    assert core.receive(first) is None
    assert isinstance(core.receive(json.dumps({"type": "Ping"})), PingReceived)  # pings may interleave
    assert core.receive(second) is None
    event = applied(core.receive(third))
    assert [r.value for r in event.results if isinstance(r, QueryValue)] == [["x" * 50, "y" * 50, "z" * 50]]


@pytest.mark.parametrize(
    "frames",
    [
        lambda parts, other: [parts[1]],  # starts at part 1
        lambda parts, other: [parts[0], parts[2]],  # skips part 1
        lambda parts, other: [parts[0], parts[0]],  # repeats part 0
        lambda parts, other: [parts[0], other[1]],  # another transitionId
        lambda parts, other: [parts[0], json.dumps({**json.loads(parts[1]), "totalParts": 4})],  # totalParts changes
        lambda parts, other: [json.dumps({**json.loads(parts[0]), "partNumber": 3})],  # part outside 0..total-1
        lambda parts, other: [json.dumps({**json.loads(parts[0]), "totalParts": 0, "partNumber": 0})],
        lambda parts, other: [parts[0], transition((0, 0, 0), (1, 1, 1))],  # a Transition mid-chunks
    ],
    ids=["starts-late", "skips", "repeats", "other-id", "total-changes", "part-out-of-range", "zero-total",
         "transition-inside"],
)
def test_chunks_out_of_order_or_inconsistent_are_an_error_and_the_buffer_is_discarded(frames: Any) -> None:
    core, [query] = connected()
    parts = chunks(big_transition(query), 3)
    other = chunks(big_transition(query), 3, transition_id="t2")
    *leading, last = frames(parts, other)
    for frame in leading:
        assert core.receive(frame) is None
    assert isinstance(core.receive(last), ProtocolError)
    # Recovered: a complete, well-formed chunk sequence after the error is accepted from part 0.
    *head, tail = chunks(big_transition(query), 3, transition_id="t3")
    assert [core.receive(frame) for frame in head] == [None, None]
    assert applied(core.receive(tail)).caught_up


def test_chunked_transitions_are_bounded() -> None:
    core = SyncProtocol(max_transition_chars=150)
    query, _ = core.add_query("m:f", {})
    core.socket_opened(now_ms=0, last_close_reason=None)
    first, second, _third = chunks(big_transition(query), 3)
    assert core.receive(first) is None
    error = core.receive(second)
    assert isinstance(error, ProtocolError) and "150 characters" in error.reason
    assert error.too_large  # the same query set would bring it back: the transport tells the subscriptions
    assert not any(isinstance(event, ProtocolError) and event.too_large
                   for event in (core.receive(frame) for frame in MALFORMED.values()))


def test_reassembled_text_must_be_a_transition() -> None:
    core, _ = connected()
    for text in ("not json at all", json.dumps({"type": "Ping"}), "[1, 2]"):
        frames = chunks(text, 2)
        assert core.receive(frames[0]) is None
        assert isinstance(core.receive(frames[1]), ProtocolError)


# -- auth, fatal, ping ----------------------------------------------------------------------------------------------


def auth_error(base_version: int, attempted: bool) -> str:
    return json.dumps({"type": "AuthError", "error": "Could not verify token", "baseVersion": base_version,
                       "authUpdateAttempted": attempted})


def test_auth_error_answering_the_authenticate_is_a_refusal_of_the_current_token() -> None:
    core, _ = connected()
    assert core.receive(auth_error(0, True)) == AuthRefused("Could not verify token", 0, True, stale=False)


def test_auth_error_for_an_older_authenticate_is_stale() -> None:
    core, _ = connected(token="old")
    core.set_auth("new")  # identity 1 -> 2
    refused = core.receive(auth_error(0, True))
    assert isinstance(refused, AuthRefused) and refused.stale
    assert applied(core.receive(transition((0, 0, 0), (1, 2, 1)))).auth_confirmed  # confirms "new"
    current = core.receive(auth_error(1, True))
    assert isinstance(current, AuthRefused) and not current.stale


def test_expiry_notice_while_a_new_token_awaits_confirmation_is_stale_after_it_is_not() -> None:
    core, _ = connected(token="old")
    applied(core.receive(transition((0, 0, 0), (1, 1, 1))))
    core.set_auth("new")
    pending = core.receive(auth_error(1, False))
    assert isinstance(pending, AuthRefused) and pending.stale
    assert applied(core.receive(transition((1, 1, 1), (1, 2, 2)))).auth_confirmed
    expired = core.receive(auth_error(2, False))
    assert isinstance(expired, AuthRefused) and not expired.stale


def test_fatal_error_and_ping_are_events() -> None:
    core, _ = connected()
    assert core.receive(json.dumps({"type": "FatalError", "error": "TooManyConcurrentRequests"})) == ServerFatal(
        "TooManyConcurrentRequests")
    assert core.receive('{"type": "Ping"}') == PingReceived()


# -- reconnects -------------------------------------------------------------------------------------------------------


def test_reconnect_restarts_versions_and_re_adds_every_active_query_under_its_id() -> None:
    core, [a, b, c] = connected(token="jwt", queries=3)
    core.remove_query(b)
    applied(core.receive(transition((0, 0, 0), (2, 1, 2**40 + 5), updated(a, 1), updated(c, 3))))
    core.socket_closed()
    assert core.add_query("late:query", {"x": 1})[1] == []  # while disconnected: nothing to send
    connect, authenticate, modify = core.socket_opened(now_ms=5000, last_close_reason="InactiveServer")
    assert connect["connectionCount"] == 1 and connect["lastCloseReason"] == "InactiveServer"
    assert connect["maxObservedTimestamp"] == encode_ts(2**40 + 5)
    assert connect["sessionId"] == core.session_id
    assert authenticate["baseVersion"] == 0
    assert (modify["baseVersion"], modify["newVersion"]) == (0, 1)
    assert [m["queryId"] for m in modify["modifications"]] == [a, c, 3]
    assert all(m["type"] == "Add" for m in modify["modifications"])
    # The server starts again from zero; the old version is no longer the client's.
    assert isinstance(core.receive(transition((2, 1, 2**40 + 5), (2, 1, 2**40 + 6))), ProtocolError)
    core.socket_closed()
    core.socket_opened(now_ms=6000, last_close_reason="InvalidServerMessage")
    event = applied(core.receive(transition((0, 0, 0), (1, 1, 2**40 + 9), updated(a, 1), updated(c, 4),
                                            updated(3, "late"))))
    assert {r.query_id for r in event.results} == {c, 3}  # a's value is the one already held
    assert event.caught_up


def test_half_received_chunks_do_not_survive_a_reconnect() -> None:
    core, [query] = connected()
    first, second, third = chunks(big_transition(query), 3)
    core.receive(first)
    core.socket_closed()
    core.socket_opened(now_ms=0, last_close_reason=None)
    assert isinstance(core.receive(second), ProtocolError)


def test_frames_without_a_socket_are_protocol_errors() -> None:
    core = SyncProtocol()
    assert isinstance(core.receive('{"type": "Ping"}'), ProtocolError)


def test_timestamps_are_decoded_from_and_encoded_to_base64_u64() -> None:
    core, _ = connected(queries=0)
    big = 2**63 + 12345
    event = applied(core.receive(json.dumps({
        "type": "Transition", "startVersion": {"querySet": 0, "identity": 0, "ts": "AAAAAAAAAAA="},
        "endVersion": {"querySet": 0, "identity": 1, "ts": encode_ts(big)}, "modifications": [],
    })))
    assert event.version.ts == big == core.max_observed_ts
    core.socket_closed()
    connect = core.socket_opened(now_ms=0, last_close_reason=None)[0]
    assert connect["maxObservedTimestamp"] == "OTAAAAAAAIA="


# -- malformed frames -------------------------------------------------------------------------------------------------


def good_transition(**overrides: Any) -> str:
    message = {"type": "Transition", "startVersion": version(0, 0, 0), "endVersion": version(1, 1, 1),
               "modifications": [updated(0, 1)]}
    message.update(overrides)
    return json.dumps(message)


MALFORMED = {
    "not-json": "{nope",
    "nan-literal": '{"type": "Ping", "x": NaN}',
    "infinite-number": good_transition(clientClockSkew=1e999).replace("Infinity", "1e999"),
    "integer-of-5000-digits": '{"type": "Ping", "x": ' + "1" * 5000 + "}",
    "array": "[]",
    "string": '"Transition"',
    "no-type": "{}",
    "unknown-type": '{"type": "Surprise"}',
    "mutation-response": '{"type": "MutationResponse", "requestId": 0, "success": true}',
    "fatal-no-error": '{"type": "FatalError"}',
    "auth-error-bool-as-int": '{"type": "AuthError", "error": "x", "baseVersion": true, "authUpdateAttempted": true}',
    "auth-error-attempted-int": '{"type": "AuthError", "error": "x", "baseVersion": 0, "authUpdateAttempted": 1}',
    "no-start-version": good_transition(startVersion=None),
    "version-not-object": good_transition(endVersion=[1, 1, "AAAAAAAAAAA="]),
    "ts-not-base64": good_transition(endVersion={"querySet": 1, "identity": 1, "ts": "!!"}),
    "ts-number": good_transition(endVersion={"querySet": 1, "identity": 1, "ts": 1}),
    "ts-short": good_transition(endVersion={"querySet": 1, "identity": 1, "ts": "AAAA"}),
    "query-set-string": good_transition(endVersion={"querySet": "1", "identity": 1, "ts": "AQAAAAAAAAA="}),
    "negative-version": good_transition(startVersion={"querySet": -1, "identity": 0, "ts": "AAAAAAAAAAA="}),
    "fractional-version": good_transition(endVersion={"querySet": 0.5, "identity": 1, "ts": "AQAAAAAAAAA="}),
    "modifications-not-list": good_transition(modifications={"0": 1}),
    "modification-not-object": good_transition(modifications=[1]),
    "unknown-modification": good_transition(modifications=[{"type": "QueryMoved", "queryId": 0}]),
    "no-query-id": good_transition(modifications=[{"type": "QueryUpdated", "value": 1, "logLines": []}]),
    "no-value": good_transition(modifications=[{"type": "QueryUpdated", "queryId": 0, "logLines": []}]),
    "bad-integer-value": good_transition(modifications=[updated(0, {"$integer": "AQ=="})]),
    "reserved-key-value": good_transition(modifications=[updated(0, {"$where": 1})]),
    "log-lines-not-strings": good_transition(modifications=[{**updated(0, 1), "logLines": [1]}]),
    "journal-number": good_transition(modifications=[{**updated(0, 1), "journal": 5}]),
    "failed-no-message": good_transition(modifications=[{"type": "QueryFailed", "queryId": 0, "logLines": []}]),
    "server-ts-string": good_transition(serverTs="now"),
    "server-ts-infinite": good_transition(serverTs=1).replace('"serverTs": 1', '"serverTs": 1e999'),
    "chunk-no-id": '{"type": "TransitionChunk", "chunk": "{", "partNumber": 0, "totalParts": 2}',
    "chunk-part-string": '{"type": "TransitionChunk", "chunk": "{", "partNumber": "0", "totalParts": 2, '
                         '"transitionId": "t"}',
    "deeply-nested": '{"type": "Transition", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "deep-value": good_transition(modifications=[]).replace('"modifications": []',
                                                          '"modifications": [{"type": "QueryUpdated", "queryId": 0, '
                                                          '"logLines": [], "value": ' + "[" * 5000 + "]" * 5000 + "}]"),
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_become_protocol_errors_and_leave_state_alone(frame: str) -> None:
    core, [query] = connected()
    event = core.receive(frame)
    assert isinstance(event, ProtocolError), event
    assert event.reason
    assert core.latest(query) is None and core.server_version == Version(0, 0, 0)
    applied(core.receive(good_transition()))  # the core itself is still usable


def test_binary_frames_are_protocol_errors() -> None:
    core, _ = connected()
    assert isinstance(core.receive(b'{"type": "Ping"}'), ProtocolError)


def test_whole_float_versions_count_as_integers() -> None:
    core, [query] = connected()
    frame = good_transition(endVersion={"querySet": 1.0, "identity": 1.0, "ts": encode_ts(1)})
    assert applied(core.receive(frame)).caught_up


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["Transition", "TransitionChunk", "AuthError", "FatalError", "Ping", "Other"])},
    optional={
        "startVersion": json_values | st.just(version(0, 0, 0)),
        "endVersion": json_values | st.just(version(1, 1, 1)),
        "modifications": json_values | st.lists(st.fixed_dictionaries(
            {"type": st.sampled_from(["QueryUpdated", "QueryFailed", "QueryRemoved"]),
             "queryId": st.integers(-1, 3) | json_values},
            optional={"value": json_values, "errorMessage": json_values, "logLines": json_values,
                      "journal": json_values, "errorData": json_values}), max_size=3),
        "chunk": json_values, "partNumber": json_values, "totalParts": json_values, "transitionId": json_values,
        "error": json_values, "baseVersion": json_values, "authUpdateAttempted": json_values,
        "serverTs": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frame_like.map(json.dumps) | st.text(max_size=30), min_size=1, max_size=5))
def test_no_frame_sequence_raises(frames: list[str]) -> None:
    core, _ = connected(queries=2)
    for frame in frames:
        event = core.receive(frame)
        assert event is None or isinstance(event, (TransitionApplied, AuthRefused, ServerFatal, PingReceived,
                                                   ProtocolError))


# -- plain frames (no tagged value) are parsed in one pass -------------------------------------------------------------

_KEYS = st.text(max_size=6).filter(lambda key: not key.startswith("$"))
_CONVEX_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**60, 2**60)
    | st.builds(Int64, st.integers(-2**63, 2**63 - 1)) | st.text(max_size=8) | st.binary(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=20,
)


def _strictly_equal(a: Any, b: Any) -> bool:
    """Equal values of the very same types all the way down (Int64 is not float, True is not 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_strictly_equal, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_strictly_equal(a[key], b[key]) for key in a)
    return bool(a == b)


def _as_javascript_writes(wire: Any) -> Any:
    """Convex JSON as the server writes it: a whole number without a fraction (``JSON.stringify(5)`` is ``5``)."""
    if isinstance(wire, float) and wire.is_integer():
        return int(wire)
    if isinstance(wire, list):
        return [_as_javascript_writes(item) for item in wire]
    if isinstance(wire, dict):
        return {key: _as_javascript_writes(item) for key, item in wire.items()}
    return wire


@settings(max_examples=300, deadline=None)
@given(value=_CONVEX_VALUES, as_error_data=st.booleans())
def test_a_frame_decodes_to_the_same_values_whether_or_not_it_takes_the_one_pass_path(
        value: Any, as_error_data: bool) -> None:
    """Frames without a ``$`` skip from_convex_json (numbers become floats as they are parsed); nothing else changes.

    Convex JSON tags only objects with a ``$`` key (get-convex/convex-js ``src/values/value.ts``, ``jsonToConvex``).
    """
    from materializer.convex.values import from_convex_json, to_convex_json

    wire = _as_javascript_writes(to_convex_json(value))
    core, [query] = connected()
    modification = failed(query, "boom", errorData=wire) if as_error_data else updated(query, wire)
    frame = transition((0, 0, 0), (1, 1, 7), modification, serverTs=7)
    [result] = applied(core.receive(frame)).results
    decoded = result.error_data if isinstance(result, QueryFailure) else result.value
    assert _strictly_equal(decoded, from_convex_json(json.loads(json.dumps(wire))))
    assert core.server_version == Version(1, 1, 7)


def test_an_escaped_dollar_takes_the_full_decoding() -> None:
    """``\\u0024integer`` is ``$integer`` once parsed: a frame that spells it so is not plain."""
    core, [query] = connected()
    frame = transition((0, 0, 0), (1, 1, 7), updated(query, {"$integer": "BwAAAAAAAAA="})).replace("$", "\\u0024")
    [result] = applied(core.receive(frame)).results
    assert isinstance(result, QueryValue) and result.value == Int64(7) and type(result.value) is Int64
