"""The server side of Convex's WebSocket sync protocol, for one socket.

Each session keeps the client's query set, identity and the last values it
sent. When the client changes its query set or identity, or a write touches
the jobs its queries read, the session re-runs its queries and sends one
``Transition`` from the version the client holds to the current one,
carrying only what changed. Client messages are checked as strictly as a
Convex deployment does; any deviation gets a ``FatalError`` naming it.

What it mirrors (get-convex/convex-backend):

- ``crates/sync/src/worker.rs``: a ``Ping`` after ``HEARTBEAT_INTERVAL``
  (15 s) in which the worker sent nothing else;
- ``crates/sync/src/state.rs`` ``identity()``: an expired token is noticed
  only when the queries are next re-run (or a mutation or action arrives),
  and answered ``AuthError`` "Convex token identity expired" with
  ``authUpdateAttempted: false``; there is no timer at ``exp``;
- ``crates/local_backend/src/subs/mod.rs``: WebSocket ping frames every 5 s
  (the first at once), a client not heard from for 120 s dropped with
  ``1000 ClientDisconnected``; ``maybe_split_transition`` (chunks only for
  npm clients at 1.28.0 or later, only over 5,000,000 bytes, parts cut on
  UTF-8 boundaries, ``transitionId`` the JSON's byte length); and the final
  ``AuthError``/``FatalError`` followed by a close frame *without a status
  code* (``crates/errors`` ``close_frame`` is None for BadRequest,
  Unauthenticated and AuthUpdateFailed), which a client sees as 1005;
  errors without metadata close with ``1011 InternalServerError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from materializer.convex.values import ConvexValueError, decode_ts, encode_ts, from_convex_json, to_convex_json
from stella_devbackend.auth import Authority, TokenError
from stella_devbackend.clients import ClientVersion
from stella_devbackend.db import JobTable
from stella_devbackend.faults import Faults
from stella_devbackend.functions import FunctionError, Functions
from stella_devbackend.options import BackendOptions

__all__ = ["SyncContext", "SyncSession"]

log = logging.getLogger(__name__)

#: How long a session that sent its close frame waits for the client's before cutting the connection.
CLOSE_GRACE = 10.0
TOKEN_EXPIRED = "Convex token identity expired"
PING = json.dumps({"type": "Ping"})

_ALLOWED_KEYS = {
    "Connect": {"type", "sessionId", "connectionCount", "lastCloseReason", "maxObservedTimestamp", "clientTs"},
    "Authenticate": {"type", "tokenType", "value", "baseVersion", "impersonating"},
    "ModifyQuerySet": {"type", "baseVersion", "newVersion", "modifications"},
    "Mutation": {"type", "requestId", "udfPath", "args", "componentPath"},
    "Action": {"type", "requestId", "udfPath", "args", "componentPath"},
    "Event": {"type", "eventType", "event"},
}
_ADD_KEYS = {"type", "queryId", "udfPath", "args", "journal", "componentPath"}
_REMOVE_KEYS = {"type", "queryId"}


class ProtocolViolation(Exception):
    """A client message a Convex deployment would refuse; ends the session with FatalError."""


def _field_int(message: dict[str, Any], key: str, where: str) -> int:
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolViolation(f"{where}: `{key}` must be an integer, got {json.dumps(value)[:40]}")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise ProtocolViolation(f"{where}: `{key}` must be an integer, got {value}")
    if value < 0 or value > 2**32 - 1:
        raise ProtocolViolation(f"{where}: `{key}` is out of range: {value}")
    return int(value)


def _check_keys(message: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(message) - allowed)
    if extra:
        raise ProtocolViolation(f"{where}: unexpected field(s) {', '.join(extra)}")


def _one_args_object(args: Any, where: str) -> dict[str, Any]:
    if not isinstance(args, list) or len(args) != 1 or not isinstance(args[0], dict):
        raise ProtocolViolation(f"{where}: `args` must be an array holding one object")
    try:
        return from_convex_json(args[0])
    except ConvexValueError as exc:
        raise ProtocolViolation(f"{where}: `args` is not valid Convex JSON: {exc}") from None


class _InternalError(Exception):
    """A failure without error metadata: the socket closes with 1011, no final message."""


class _AuthRefused(Exception):
    """An ``Authenticate`` whose token was refused (``AuthUpdateFailed``)."""


def split_utf8(text: str, size: int) -> list[str]:
    """``text`` in pieces of at most ``size`` UTF-8 bytes, never cutting a character (``size`` >= 4)."""
    data = text.encode()
    pieces = []
    start = 0
    while start < len(data):
        end = min(start + size, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # a continuation byte: back up
            end -= 1
        pieces.append(data[start:end].decode())
        start = end
    return pieces


@dataclass(frozen=True)
class SyncContext:
    """What a sync session uses of the backend it runs in, shared by all its sessions."""

    table: JobTable  # the jobs the queries read; its change events wake the sessions
    functions: Functions  # the query functions
    authority: Authority  # verifies the tokens of ``Authenticate``
    faults: Faults  # ``refuse_sync``, ``withhold_transitions``, ``delay_transitions``
    options: BackendOptions  # heartbeats, client timeout, transition chunks
    faults_changed: Callable[[], asyncio.Event]  # the event set at the next fault reconfiguration


class SyncSession:
    """One client socket speaking the sync protocol."""

    def __init__(self, context: SyncContext, request: web.Request, ws: web.WebSocketResponse,
                 client: ClientVersion) -> None:
        self.context = context
        self.request = request
        self.ws = ws
        self.client = client
        self.connected = False
        self.query_set_version = 0
        self.identity_version = 0
        self.owner: str | None = None
        self.token_exp: float | None = None
        self.client_clock_skew: int | None = None
        self.queries: dict[int, tuple[str, dict[str, Any]]] = {}
        self.sent_results: dict[int, tuple[str, Any]] = {}
        self.sent_version = (0, 0, 0)
        self._rerun = asyncio.Event()  # the client changed what the queries depend on
        self._owner_seen = 0  # the owner's last write covered by the last run
        self._last_sent = time.monotonic()  # the worker's last message (the Ping heartbeat counts from it)
        self._last_heard = time.monotonic()  # the client's last frame (the client timeout counts from it)
        self._ending = False  # the final message and close frame went out
        self._abort: asyncio.TimerHandle | None = None
        self._send_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        refusal = self.context.faults.take({"refuse_sync"}, self.request.path)
        if refusal is not None:
            reason = str(refusal.params.get("reason", "TooManyConcurrentRequests"))
            await self.ws.close(code=1013, message=reason[:123].encode())  # an Overloaded error: CloseCode::Again
            return
        self._tasks = [
            asyncio.create_task(self._worker()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._ws_heartbeat()),
        ]
        try:
            async for message in self.ws:
                self._last_heard = time.monotonic()
                if self._ending:
                    continue  # read on until the client answers the close frame
                if message.type == WSMsgType.PING:
                    await self.ws.pong(message.data)
                elif message.type == WSMsgType.TEXT:
                    await self._receive(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self._end({"type": "FatalError", "error": "binary frames are not part of the sync protocol"})
                elif message.type != WSMsgType.PONG:
                    break
        finally:
            await self.close()

    async def _receive(self, text: str) -> None:
        """Handle one client message; a refused one ends the session the way the real server does."""
        try:
            await self._handle_text(text)
        except ProtocolViolation as exc:
            log.info("sync: FatalError: %s", exc)
            await self._end({"type": "FatalError", "error": str(exc)})
        except _AuthRefused as exc:
            await self._end(self._auth_error(str(exc), attempted=True))
        except _InternalError as exc:
            log.info("sync: internal error: %s", exc)
            await self.ws.close(code=1011, message=b"InternalServerError")

    async def close(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        if self._ending:
            # Our close frame is out; closing the transport keeps aiohttp from sending one with a code.
            if self._abort is not None:
                self._abort.cancel()
            if self.request.transport is not None:
                self.request.transport.close()
        elif not self.ws.closed:
            await self.ws.close()

    def drop(self) -> None:
        """Cut the connection without a close handshake (a network fault)."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    def _auth_error(self, error: str, attempted: bool) -> dict[str, Any]:
        """``AuthError``; its ``baseVersion`` is the identity version of the last transition sent."""
        return {"type": "AuthError", "error": error, "baseVersion": self.sent_version[1],
                "authUpdateAttempted": attempted}

    async def _end(self, final: dict[str, Any]) -> None:
        """Send ``final`` (AuthError or FatalError), then a close frame with no status code."""
        if self._ending:
            return
        self._ending = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(final)
            async with self._send_lock:
                await self.ws.send_frame(b"", WSMsgType.CLOSE)
        self._abort = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.drop)

    def _token_expired(self) -> bool:
        return self.token_exp is not None and self.context.table.clock.time() >= self.token_exp

    # -- client messages ------------------------------------------------------------

    async def _handle_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProtocolViolation(f"message is not JSON: {exc.msg}") from None
        if not isinstance(message, dict):
            raise ProtocolViolation("message must be a JSON object")
        kind = message.get("type")
        if kind not in _ALLOWED_KEYS:
            raise ProtocolViolation(f"unknown message type {json.dumps(kind)[:40]}")
        _check_keys(message, _ALLOWED_KEYS[kind], kind)
        if kind == "Connect":
            self._on_connect(message)
            return
        if not self.connected:
            raise ProtocolViolation(f"{kind} before Connect")
        if kind == "Authenticate":
            self._on_authenticate(message)
            self._rerun.set()
        elif kind == "ModifyQuerySet":
            self._on_modify_query_set(message)
            self._rerun.set()
        elif kind in ("Mutation", "Action"):
            await self._on_function_call(kind, message)
        elif not isinstance(message.get("eventType"), str) or "event" not in message:
            raise ProtocolViolation("Event: needs `eventType` (string) and `event`")

    def _on_connect(self, message: dict[str, Any]) -> None:
        if self.connected:
            raise ProtocolViolation("Connect sent twice on one socket")
        session_id = message.get("sessionId")
        try:
            uuid.UUID(str(session_id))
        except ValueError:
            raise ProtocolViolation("Connect: `sessionId` must be a UUID string") from None
        if not isinstance(session_id, str):
            raise ProtocolViolation("Connect: `sessionId` must be a UUID string")
        _field_int(message, "connectionCount", "Connect")
        reason = message.get("lastCloseReason")
        if reason is not None and not isinstance(reason, str):
            raise ProtocolViolation("Connect: `lastCloseReason` must be a string or null")
        if "maxObservedTimestamp" in message and message["maxObservedTimestamp"] is not None:
            try:
                observed = decode_ts(message["maxObservedTimestamp"])
            except ConvexValueError as exc:
                raise ProtocolViolation(f"Connect: `maxObservedTimestamp`: {exc}") from None
            if observed > self.context.table.ts:
                # The client saw writes this deployment does not have: the worker bails out
                # without ErrorMetadata (crates/sync/src/worker.rs, Connect).
                raise _InternalError(f"client observed ts {observed}, ahead of the latest {self.context.table.ts}")
        client_ts = message.get("clientTs")
        if client_ts is not None:
            if isinstance(client_ts, bool) or not isinstance(client_ts, (int, float)):
                raise ProtocolViolation("Connect: `clientTs` must be a number")
            # Once, from the Connect: clientTs minus the server's clock as it receives it
            # (crates/sync/src/worker.rs, ClientMessage::Connect), sent with every Transition.
            self.client_clock_skew = int(client_ts - self.context.table.clock.time_ms())
        self.connected = True

    def _on_authenticate(self, message: dict[str, Any]) -> None:
        base_version = _field_int(message, "baseVersion", "Authenticate")
        if base_version != self.identity_version:
            raise ProtocolViolation(
                f"Authenticate: baseVersion {base_version} does not match the identity version {self.identity_version}"
            )
        token_type = message.get("tokenType")
        if token_type == "None":
            if "value" in message:
                raise ProtocolViolation("Authenticate: tokenType None carries no `value`")
            self.owner, self.token_exp = None, None
        elif token_type == "User":
            value = message.get("value")
            if not isinstance(value, str):
                raise ProtocolViolation("Authenticate: `value` must be a string")
            try:
                self.owner, self.token_exp = self.context.authority.verify(value)
            except TokenError as exc:
                raise _AuthRefused(f"Could not verify token: {exc}") from None
        elif token_type == "Admin":
            raise _AuthRefused("Admin keys are not accepted by this deployment")
        else:
            raise ProtocolViolation(f"Authenticate: unknown tokenType {json.dumps(token_type)[:40]}")
        self.identity_version += 1

    def _on_modify_query_set(self, message: dict[str, Any]) -> None:
        base = _field_int(message, "baseVersion", "ModifyQuerySet")
        new = _field_int(message, "newVersion", "ModifyQuerySet")
        if base != self.query_set_version:
            raise ProtocolViolation(
                f"ModifyQuerySet: baseVersion {base} does not match the query set version {self.query_set_version}"
            )
        if new != base + 1:
            raise ProtocolViolation(f"ModifyQuerySet: newVersion must be baseVersion + 1, got {base} -> {new}")
        modifications = message.get("modifications")
        if not isinstance(modifications, list):
            raise ProtocolViolation("ModifyQuerySet: `modifications` must be an array")
        queries = dict(self.queries)
        for modification in modifications:
            if not isinstance(modification, dict):
                raise ProtocolViolation("ModifyQuerySet: each modification must be an object")
            kind = modification.get("type")
            if kind == "Add":
                _check_keys(modification, _ADD_KEYS, "ModifyQuerySet Add")
                query_id = _field_int(modification, "queryId", "ModifyQuerySet Add")
                if query_id in queries:
                    raise ProtocolViolation(f"ModifyQuerySet Add: query {query_id} is already in the query set")
                udf_path = modification.get("udfPath")
                if not isinstance(udf_path, str) or not udf_path:
                    raise ProtocolViolation("ModifyQuerySet Add: `udfPath` must be a non-empty string")
                journal = modification.get("journal")
                if journal is not None and not isinstance(journal, str):
                    raise ProtocolViolation("ModifyQuerySet Add: `journal` must be a string or null")
                component = modification.get("componentPath")
                if component is not None and not isinstance(component, str):
                    raise ProtocolViolation("ModifyQuerySet Add: `componentPath` must be a string")
                queries[query_id] = (udf_path, _one_args_object(modification.get("args"), "ModifyQuerySet Add"))
            elif kind == "Remove":
                _check_keys(modification, _REMOVE_KEYS, "ModifyQuerySet Remove")
                query_id = _field_int(modification, "queryId", "ModifyQuerySet Remove")
                if queries.pop(query_id, None) is None:
                    raise ProtocolViolation(f"ModifyQuerySet Remove: query {query_id} is not in the query set")
            else:
                raise ProtocolViolation(f"ModifyQuerySet: unknown modification type {json.dumps(kind)[:40]}")
        self.queries = queries
        self.query_set_version = new

    async def _on_function_call(self, kind: str, message: dict[str, Any]) -> None:
        request_id = _field_int(message, "requestId", kind)
        udf_path = message.get("udfPath")
        if not isinstance(udf_path, str) or not udf_path:
            raise ProtocolViolation(f"{kind}: `udfPath` must be a non-empty string")
        _one_args_object(message.get("args"), kind)
        if self._token_expired():  # a mutation or action revalidates the identity first
            await self._end(self._auth_error(TOKEN_EXPIRED, attempted=False))
            return
        response: dict[str, Any] = {
            "type": f"{kind}Response",
            "requestId": request_id,
            "success": False,
            "result": f"Could not find public function for '{udf_path}'. This deployment has no {kind.lower()}s.",
            "logLines": [],
        }
        if kind == "Mutation":
            response["ts"] = None
        await self._send(response)

    # -- server messages ---------------------------------------------------------------

    def _read_set_changed(self) -> bool:
        """Whether a write touched the jobs this session's queries read (only its owner's)."""
        return self.owner is not None and self.context.table.owner_ts(self.owner) > self._owner_seen

    async def _worker(self) -> None:
        faults = self.context.faults
        changed = self.context.table.changed()
        while True:
            await _first_of(self._rerun.wait(), changed.wait())
            while faults.active("withhold_transitions") is not None:
                await self.context.faults_changed().wait()
            delay = faults.active("delay_transitions")
            if delay is not None:
                await asyncio.sleep(float(delay.params.get("ms", 100)) / 1000)
            # Take the next change event before computing, so a write that lands while this
            # transition is being sent wakes the next pass instead of being missed.
            changed = self.context.table.changed()
            if not self._rerun.is_set() and not self._read_set_changed():
                continue
            self._rerun.clear()
            if self._token_expired():
                await self._end(self._auth_error(TOKEN_EXPIRED, attempted=False))
                return
            transition = self._next_transition()
            if transition is not None:
                await self._send_transition(transition)

    def _next_transition(self) -> dict[str, Any] | None:
        """Everything that changed since the last transition, or None when nothing did."""
        table = self.context.table
        if self.owner is not None:
            self._owner_seen = table.owner_ts(self.owner)
        modifications: list[dict[str, Any]] = []
        results: dict[int, tuple[str, Any]] = {}
        for query_id, (udf_path, args) in sorted(self.queries.items()):
            try:
                result = ("value", to_convex_json(self.context.functions.run(table, self.owner, udf_path, args)))
            except FunctionError as exc:
                result = ("error", str(exc))
            results[query_id] = result
            if self.sent_results.get(query_id) == result:
                continue
            if result[0] == "value":
                modifications.append(
                    {"type": "QueryUpdated", "queryId": query_id, "value": result[1], "logLines": [], "journal": None}
                )
            else:
                modifications.append(
                    {"type": "QueryFailed", "queryId": query_id, "errorMessage": result[1], "logLines": [],
                     "journal": None}
                )
        for query_id in sorted(set(self.sent_results) - set(self.queries)):
            modifications.append({"type": "QueryRemoved", "queryId": query_id})
        end = (self.query_set_version, self.identity_version, max(table.ts, self.sent_version[2]))
        if not modifications and end[:2] == self.sent_version[:2]:
            return None
        start, self.sent_version, self.sent_results = self.sent_version, end, results
        transition: dict[str, Any] = {
            "type": "Transition",
            "startVersion": {"querySet": start[0], "identity": start[1], "ts": encode_ts(start[2])},
            "endVersion": {"querySet": end[0], "identity": end[1], "ts": encode_ts(end[2])},
            "modifications": modifications,
        }
        if self.client_clock_skew is not None:
            transition["clientClockSkew"] = self.client_clock_skew
        return transition

    async def _send_transition(self, transition: dict[str, Any]) -> None:
        """One ``Transition``, or ``TransitionChunk``s for a client that takes them when it is too large.

        ``serverTs`` is stamped last, the server's clock right before the message goes out
        (``crates/local_backend/src/subs/mod.rs``: ``message.inject_server_ts(st.runtime.generate_timestamp()?)``
        just before ``maybe_split_transition``), in nanoseconds.
        """
        transition = {**transition, "serverTs": self.context.table.clock.time_ns()}
        text = json.dumps(transition, separators=(",", ":"))
        options = self.context.options
        size = len(text.encode())
        if not self.client.supports_transition_chunks or size <= options.chunk_threshold:
            await self._send_text(text)
            return
        parts = split_utf8(text, options.chunk_size)
        for number, chunk in enumerate(parts):
            await self._send({"type": "TransitionChunk", "chunk": chunk, "partNumber": number,
                              "totalParts": len(parts), "transitionId": str(size)})

    async def _heartbeat(self) -> None:
        """A ``Ping`` once the worker has sent nothing for ``ping_interval`` seconds."""
        interval = self.context.options.ping_interval
        while True:
            await asyncio.sleep(max(0.0, self._last_sent + interval - time.monotonic()))
            async with self._send_lock:  # decided under the lock, so a message just sent restarts the wait
                if time.monotonic() - self._last_sent >= interval:
                    await self.ws.send_str(PING)
                    self._last_sent = time.monotonic()

    async def _ws_heartbeat(self) -> None:
        """WebSocket pings on a fixed tick; a client silent past the timeout is disconnected."""
        options = self.context.options
        while True:
            if time.monotonic() - self._last_heard > options.client_timeout:
                log.info("sync: client silent for %ss, disconnecting", options.client_timeout)
                await self.ws.close(code=1000, message=b"ClientDisconnected")
                return
            await self.ws.ping()
            await asyncio.sleep(options.ws_ping_interval)

    async def _send(self, message: dict[str, Any]) -> None:
        await self._send_text(json.dumps(message, separators=(",", ":")))

    async def _send_text(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_str(text)
            self._last_sent = time.monotonic()


async def _first_of(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
