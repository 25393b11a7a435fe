"""The Convex sync protocol as plain data: no sockets, no asyncio, no clock.

:class:`SyncProtocol` is the client's whole protocol state. The transport
feeds it what happened (a socket opened or closed, a text frame arrived, the
caller changed a query or the token) and sends the messages it returns, in
order. Everything the server says comes back as an event value; a frame that
breaks the protocol comes back as :class:`ProtocolError` (never an
exception), which tells the transport to drop the socket and reconnect.

Versions follow the official clients. On every socket the query set and the
identity start again from zero: the client sends ``Connect``, then
``Authenticate`` (identity 0 -> 1) when it has a token, then one
``ModifyQuerySet`` (query set 0 -> 1) re-adding every active query under its
existing ``queryId``. A ``Transition`` is applied only when its
``startVersion`` equals the version the server last confirmed.

Results are deduplicated per query: the server re-sends every value after a
reconnect, and a value equal to the one already held is not a new result.
"""

from __future__ import annotations

import copy
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, TypeAlias

from materializer.convex.values import ConvexValueError, decode_ts, encode_ts, from_convex_json, to_convex_json

__all__ = [
    "AuthRefused",
    "Event",
    "PingReceived",
    "ProtocolError",
    "QueryFailure",
    "QueryResult",
    "QueryValue",
    "ServerFatal",
    "SyncProtocol",
    "TransitionApplied",
    "Version",
]

#: How many characters of chunked transition text may be buffered before giving up.
DEFAULT_MAX_TRANSITION_CHARS = 32 * 1024 * 1024


# -- values the core hands out ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryValue:
    """A query's result: the value its function returned for ``args``."""

    query_id: int
    udf_path: str
    args: dict[str, Any]
    value: Any
    log_lines: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QueryFailure:
    """A query whose function threw. The subscription stays; a later result may be a value again.

    ``too_large``: the function did not throw, but the transition that carried its answer was too
    large to take (the transport says so, not the server); the same args bring it back.
    """

    query_id: int
    udf_path: str
    args: dict[str, Any]
    error_message: str
    error_data: Any = None
    log_lines: tuple[str, ...] = ()
    too_large: bool = False


QueryResult: TypeAlias = QueryValue | QueryFailure


@dataclass(frozen=True, slots=True)
class Version:
    """A point in the server's view of this socket: query-set version, identity version, timestamp."""

    query_set: int
    identity: int
    ts: int


@dataclass(frozen=True, slots=True)
class TransitionApplied:
    """The server moved to a new version; ``results`` are the queries whose result changed.

    ``caught_up`` means the server has applied every message the client sent
    on this socket; ``auth_confirmed`` means this transition accepted the
    latest ``Authenticate``. ``client_clock_skew_ms`` is the server's
    estimate of how far the client's clock runs ahead of its own, when sent;
    ``server_ts_ms`` the server's clock right before it sent the transition
    (its ``serverTs``, nanoseconds on the wire), when sent.
    """

    results: tuple[QueryResult, ...]
    version: Version
    caught_up: bool
    auth_confirmed: bool
    client_clock_skew_ms: float | None = None
    server_ts_ms: float | None = None


@dataclass(frozen=True, slots=True)
class AuthRefused:
    """The server refused the token (it closes the socket next).

    ``stale`` means it answered an older ``Authenticate`` than the latest one
    sent, so it says nothing about the current token.
    """

    message: str
    base_version: int
    auth_update_attempted: bool
    stale: bool


@dataclass(frozen=True, slots=True)
class ServerFatal:
    """The server gave up on this socket (it closes it next)."""

    message: str


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The server is alive; nothing else to do."""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The server broke the protocol; the socket must be dropped and a new one opened.

    ``too_large``: the frame was refused for its size alone (a transition over the limit), so
    the same query set would bring it back: the subscriptions must ask for less.
    """

    reason: str
    too_large: bool = False


Event: TypeAlias = TransitionApplied | AuthRefused | ServerFatal | PingReceived | ProtocolError


class _Malformed(Exception):
    """Internal: a server frame that does not follow the protocol."""


class _TooLarge(_Malformed):
    """Internal: a transition over the size limit."""


# -- the state machine ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Query:
    udf_path: str
    args: dict[str, Any]
    wire_args: dict[str, Any]


@dataclass(slots=True)
class _ChunkBuffer:
    transition_id: str
    total_parts: int
    parts: list[str]
    size: int


@dataclass(frozen=True, slots=True)
class _Stored:
    """The latest result of a query, with the wire form it was decoded from (for deduplication)."""

    result: QueryResult
    wire: Any


_ZERO = Version(0, 0, 0)


class SyncProtocol:
    """The client side of one Convex sync session, across any number of sockets."""

    def __init__(self, *, session_id: str | None = None, max_transition_chars: int = DEFAULT_MAX_TRANSITION_CHARS):
        self.session_id = session_id or str(uuid.uuid4())
        self.max_transition_chars = max_transition_chars
        self._queries: dict[int, _Query] = {}
        self._stored: dict[int, _Stored] = {}
        self._next_query_id = 0
        self._token: str | None = None
        self._socket_open = False
        self._sockets_opened = 0
        self._max_observed_ts: int | None = None
        self._reset_socket_state()

    def _reset_socket_state(self) -> None:
        self._sent_query_set = 0
        self._sent_identity = 0
        self._server = _ZERO
        self._auth_pending = False
        self._chunks: _ChunkBuffer | None = None

    # -- read-only state ---------------------------------------------------------------------

    @property
    def server_version(self) -> Version:
        """The version the server last confirmed on this socket."""
        return self._server

    @property
    def max_observed_ts(self) -> int | None:
        """The largest server timestamp seen on any socket (None before the first)."""
        return self._max_observed_ts

    @property
    def caught_up(self) -> bool:
        """Whether the server has applied everything sent on this socket."""
        return self._server.query_set == self._sent_query_set and self._server.identity == self._sent_identity

    @property
    def active_query_ids(self) -> tuple[int, ...]:
        return tuple(self._queries)

    def query_args(self, query_id: int) -> dict[str, Any]:
        """The args an active query is subscribed with (a copy)."""
        return copy.deepcopy(self._queries[query_id].args)

    def latest(self, query_id: int) -> QueryResult | None:
        """The latest result of an active query, or None before the first."""
        stored = self._stored.get(query_id)
        return stored.result if stored else None

    # -- socket lifecycle ----------------------------------------------------------------------

    def socket_opened(self, now_ms: float, last_close_reason: str | None) -> list[dict[str, Any]]:
        """A new socket is open: versions restart at zero; return Connect, Authenticate, ModifyQuerySet."""
        self._reset_socket_state()
        self._socket_open = True
        connect: dict[str, Any] = {
            "type": "Connect",
            "sessionId": self.session_id,
            "connectionCount": self._sockets_opened,
            "lastCloseReason": last_close_reason,
            "clientTs": int(now_ms),
        }
        if self._max_observed_ts is not None:
            connect["maxObservedTimestamp"] = encode_ts(self._max_observed_ts)
        self._sockets_opened += 1
        messages = [connect]
        if self._token is not None:
            messages.append(self._authenticate())
        if self._queries:
            messages.append(
                self._modify([self._add_modification(query_id, query) for query_id, query in self._queries.items()])
            )
        return messages

    def socket_closed(self) -> None:
        """The socket is gone; anything half-received on it is dropped. Queries and results stay."""
        self._socket_open = False
        self._reset_socket_state()

    # -- caller actions ----------------------------------------------------------------------------

    def add_query(self, udf_path: str, args: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        """Subscribe to ``udf_path`` with ``args``; returns the new query id and what to send."""
        query = self._new_query(udf_path, args)
        query_id = self._allocate(query)
        return query_id, self._send_modify([self._add_modification(query_id, query)])

    def remove_query(self, query_id: int) -> list[dict[str, Any]]:
        """Stop a subscription; returns what to send."""
        self._forget(query_id)
        return self._send_modify([{"type": "Remove", "queryId": query_id}])

    def replace_query(self, query_id: int, args: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        """Change a subscription's args: Remove the old query and Add a new one in one ModifyQuerySet."""
        old = self._queries.get(query_id)
        if old is None:
            raise KeyError(f"query {query_id} is not active")
        query = self._new_query(old.udf_path, args)
        self._forget(query_id)
        new_id = self._allocate(query)
        return new_id, self._send_modify(
            [{"type": "Remove", "queryId": query_id}, self._add_modification(new_id, query)]
        )

    def set_auth(self, token: str | None) -> list[dict[str, Any]]:
        """Use ``token`` (None: no identity) from now on; returns the Authenticate to send, if a socket is open."""
        self._token = token
        if not self._socket_open:
            return []
        return [self._authenticate()]

    # -- server frames ------------------------------------------------------------------------------

    def receive(self, text: str | bytes) -> Event | None:
        """Take one server frame; return what it means (None: a chunk was buffered)."""
        if not self._socket_open:
            return ProtocolError("a frame arrived with no socket open")
        try:
            if isinstance(text, bytes):
                raise _Malformed("server sent a binary frame; the protocol uses text frames")
            message, plain = _loads(text)
            if not isinstance(message, dict):
                raise _Malformed("server message is not a JSON object")
            kind = message.get("type")
            if kind == "TransitionChunk":
                return self._receive_chunk(message)
            if kind == "Transition":
                if self._chunks is not None:
                    raise _Malformed("a Transition arrived in the middle of a chunked transition")
                return self._apply_transition(message, plain)
            if kind == "Ping":
                return PingReceived()
            if kind == "AuthError":
                return self._auth_refused(message)
            if kind == "FatalError":
                return ServerFatal(_field(message, "error", str))
            raise _Malformed(f"unexpected server message type {kind!r}")
        except (_Malformed, ConvexValueError) as exc:
            self._chunks = None
            return ProtocolError(str(exc), too_large=isinstance(exc, _TooLarge))
        except RecursionError:
            self._chunks = None
            return ProtocolError("server message is nested too deeply")

    # -- internals -------------------------------------------------------------------------------------------

    def _new_query(self, udf_path: str, args: dict[str, Any]) -> _Query:
        if not isinstance(udf_path, str) or not udf_path:
            raise ValueError("udf_path must be a non-empty string such as 'module:function'")
        if not isinstance(args, dict):
            raise ConvexValueError(f"query args must be an object (dict), got {type(args).__name__}")
        return _Query(udf_path, copy.deepcopy(args), to_convex_json(args))

    def _allocate(self, query: _Query) -> int:
        query_id = self._next_query_id
        self._next_query_id += 1
        self._queries[query_id] = query
        return query_id

    def _forget(self, query_id: int) -> None:
        if query_id not in self._queries:
            raise KeyError(f"query {query_id} is not active")
        del self._queries[query_id]
        self._stored.pop(query_id, None)

    @staticmethod
    def _add_modification(query_id: int, query: _Query) -> dict[str, Any]:
        return {"type": "Add", "queryId": query_id, "udfPath": query.udf_path, "args": [query.wire_args]}

    def _send_modify(self, modifications: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._modify(modifications)] if self._socket_open else []

    def _modify(self, modifications: list[dict[str, Any]]) -> dict[str, Any]:
        base = self._sent_query_set
        self._sent_query_set += 1
        return {
            "type": "ModifyQuerySet",
            "baseVersion": base,
            "newVersion": self._sent_query_set,
            "modifications": modifications,
        }

    def _authenticate(self) -> dict[str, Any]:
        base = self._sent_identity
        self._sent_identity += 1
        self._auth_pending = self._token is not None
        if self._token is None:
            return {"type": "Authenticate", "tokenType": "None", "baseVersion": base}
        return {"type": "Authenticate", "tokenType": "User", "value": self._token, "baseVersion": base}

    def _auth_refused(self, message: dict[str, Any]) -> AuthRefused:
        # Both are optional in the server's own message type and omitted when unset
        # (get-convex/convex-backend crates/convex/sync_types/src/types/mod.rs, ServerMessage::AuthError:
        # baseVersion is sent as null when unset, authUpdateAttempted is left out).
        base_version = _field(message, "baseVersion", int) if message.get("baseVersion") is not None else (
            self._sent_identity - 1)
        attempted = (_field(message, "authUpdateAttempted", bool)
                     if message.get("authUpdateAttempted") is not None else False)
        # As the JS client: an answer to an older Authenticate than the latest says nothing
        # about the current token, nor does an expiry notice while a new token awaits confirmation.
        stale = base_version + 1 < self._sent_identity or (not attempted and self._auth_pending)
        return AuthRefused(_field(message, "error", str), base_version, attempted, stale)

    def _receive_chunk(self, message: dict[str, Any]) -> Event | None:
        chunk = _field(message, "chunk", str)
        part = _field(message, "partNumber", int)
        total = _field(message, "totalParts", int)
        transition_id = _field(message, "transitionId", str)
        if total < 1 or not 0 <= part < total:
            raise _Malformed(f"TransitionChunk part {part} of {total} is out of range")
        buffer = self._chunks
        if buffer is None:
            if part != 0:
                raise _Malformed(f"TransitionChunk starts at part {part}, expected part 0")
            buffer = self._chunks = _ChunkBuffer(transition_id, total, [], 0)
        elif buffer.transition_id != transition_id or buffer.total_parts != total:
            raise _Malformed("TransitionChunk belongs to a different transition than the one being assembled")
        elif part != len(buffer.parts):
            raise _Malformed(f"TransitionChunk out of order: expected part {len(buffer.parts)}, got {part}")
        buffer.size += len(chunk)
        if buffer.size > self.max_transition_chars:
            raise _TooLarge(f"chunked transition exceeds {self.max_transition_chars} characters")
        buffer.parts.append(chunk)
        if len(buffer.parts) < total:
            return None
        self._chunks = None
        transition, plain = _loads("".join(buffer.parts))
        if not isinstance(transition, dict) or transition.get("type") != "Transition":
            raise _Malformed("reassembled chunks are not a Transition")
        return self._apply_transition(transition, plain)

    def _apply_transition(self, message: dict[str, Any], plain: bool) -> TransitionApplied:
        """Apply a Transition; ``plain``: its values are already Python values (see :func:`_loads`)."""
        start = _version(_field(message, "startVersion", dict), "startVersion")
        end = _version(_field(message, "endVersion", dict), "endVersion")
        for name in ("serverTs", "clientClockSkew"):
            # Both are Option<i64> in the server's message type (crates/convex/sync_types/src/types/json.rs),
            # sent as null when unset.
            if message.get(name) is not None and not (_is_number(message[name]) and math.isfinite(message[name])):
                raise _Malformed(f"Transition {name} must be a finite number")
        if start != self._server:
            raise _Malformed(
                f"Transition startVersion {_show(start)} does not match the client's {_show(self._server)}")
        if end.query_set < start.query_set or end.identity < start.identity or end.ts < start.ts:
            raise _Malformed(f"Transition endVersion {_show(end)} goes back from {_show(start)}")
        if end.query_set > self._sent_query_set or end.identity > self._sent_identity:
            raise _Malformed(
                f"Transition endVersion {_show(end)} is ahead of what the client sent "
                f"(querySet {self._sent_query_set}, identity {self._sent_identity})"
            )
        modifications = _field(message, "modifications", list)
        # Parse everything before changing anything, so a bad transition leaves no trace.
        parsed = [self._parse_modification(item, plain) for item in modifications]
        changed: dict[int, QueryResult] = {}
        for query_id, stored in parsed:
            if query_id not in self._queries:
                continue  # removed by the client since; the server had not seen the Remove yet
            if stored is None:
                self._stored.pop(query_id, None)
                changed.pop(query_id, None)
                continue
            previous = self._stored.get(query_id)
            if previous is not None and _same_json(previous.wire, stored.wire):
                continue
            self._stored[query_id] = stored
            changed[query_id] = stored.result
        self._server = end
        if self._max_observed_ts is None or end.ts > self._max_observed_ts:
            self._max_observed_ts = end.ts
        auth_confirmed = self._auth_pending and end.identity >= self._sent_identity
        if auth_confirmed:
            self._auth_pending = False
        skew, server_ts = message.get("clientClockSkew"), message.get("serverTs")
        return TransitionApplied(tuple(changed.values()), end, self.caught_up, auth_confirmed,
                                 float(skew) if skew is not None else None,
                                 server_ts / 1_000_000 if server_ts is not None else None)

    def _parse_modification(self, item: Any, plain: bool) -> tuple[int, _Stored | None]:
        if not isinstance(item, dict):
            raise _Malformed("Transition modification is not an object")
        kind = item.get("type")
        query_id = _field(item, "queryId", int)
        if kind == "QueryRemoved":
            return query_id, None
        log_lines = tuple(_string_list(item.get("logLines", []), "logLines"))
        if "journal" in item and item["journal"] is not None and not isinstance(item["journal"], str):
            raise _Malformed("journal must be a string or null")
        query = self._queries.get(query_id)
        udf_path, args = (query.udf_path, query.args) if query else ("", {})
        if kind == "QueryUpdated":
            if "value" not in item:
                raise _Malformed("QueryUpdated has no value")
            wire = item["value"]
            value = wire if plain else from_convex_json(wire)
            return query_id, _Stored(QueryValue(query_id, udf_path, args, value, log_lines), {"value": wire})
        if kind == "QueryFailed":
            message = _field(item, "errorMessage", str)
            wire_data = item.get("errorData")
            data = wire_data if plain else from_convex_json(wire_data)
            result = QueryFailure(query_id, udf_path, args, message, data, log_lines)
            return query_id, _Stored(result, {"error": [message, wire_data]})
        raise _Malformed(f"unknown Transition modification type {kind!r}")


# -- parsing helpers ------------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise _Malformed(f"server message contains the non-JSON number {name}")


def _finite_float(text: str) -> float:
    """JSON has no infinities: ``1e999`` would otherwise decode as one (an infinite clock skew, say)."""
    number = float(text)
    if not math.isfinite(number):
        raise _Malformed(f"server message contains a number out of range ({text[:40]})")
    return number


def _int_as_float(text: str) -> float:
    """A JSON integer as the float64 it is in Convex (what :func:`from_convex_json` makes of it)."""
    try:
        return float(int(text))
    except OverflowError:
        raise _Malformed(f"server message contains a number out of range ({text[:40]})") from None


def _loads(text: str) -> tuple[Any, bool]:
    """A server frame parsed, and whether it is *plain*: its Convex values need no :func:`from_convex_json`.

    A frame with no ``$`` in it, written or escaped (``\\u0024``), can hold no tagged value
    (``$integer``, ``$float``, ``$bytes``) and no reserved key (in Convex JSON only an object with
    a ``$`` key is tagged, every other value is itself: get-convex/convex-js ``src/values/value.ts``,
    ``jsonToConvex``; :mod:`materializer.convex.values`), so the only conversion left, every
    number to a float, is done while parsing; the envelope's integers come out as whole floats,
    which every field read takes (:func:`_field`). Parsing a window of 200 jobs so takes a third of
    the time of parsing, then walking it in Python.
    """
    plain = "$" not in text and "\\u0024" not in text
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          parse_int=_int_as_float if plain else None), plain
    except ValueError as exc:  # not JSON (JSONDecodeError), or an integer of more digits than Python converts
        raise _Malformed(f"server message is not JSON: {str(exc)[:200]}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field(message: dict[str, Any], name: str, kind: type) -> Any:
    """A required field of a given JSON type (a whole float counts as an int, as JSON numbers do)."""
    if name not in message:
        raise _Malformed(f"{message.get('type', 'message')} is missing {name!r}")
    value = message[name]
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
        raise _Malformed(f"{message.get('type', 'message')} field {name!r} must be {kind.__name__}")
    return value


def _string_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Malformed(f"{name} must be a list of strings")
    return value


def _same_json(a: Any, b: Any) -> bool:
    """Equality of JSON values where ``true`` is not ``1`` (Python's ``==`` says it is)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_json, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if _is_number(a):
        return _is_number(b) and a == b
    return type(a) is type(b) and a == b


def _version(raw: dict[str, Any], name: str) -> Version:
    query_set = _field(raw, "querySet", int)
    identity = _field(raw, "identity", int)
    if query_set < 0 or identity < 0:
        raise _Malformed(f"{name} has a negative version")
    return Version(query_set, identity, decode_ts(_field(raw, "ts", str)))


def _show(version: Version) -> str:
    return f"(querySet {version.query_set}, identity {version.identity}, ts {version.ts})"
