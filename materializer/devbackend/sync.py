"""The server side of Convex's WebSocket sync protocol, for one socket.

Each session keeps the client's query set, identity and the last values it
sent. Whenever the client changes its query set or identity, or a job is
written, the session recomputes its queries and sends one ``Transition``
from the version the client holds to the current one, carrying only what
changed. Client messages are checked as strictly as a Convex deployment
does; any deviation gets a ``FatalError`` naming it and a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from materializer.convex.values import ConvexValueError, decode_ts, encode_ts, from_convex_json, to_convex_json
from materializer.devbackend.auth import TokenError
from materializer.devbackend.functions import FunctionError, run_query

if TYPE_CHECKING:
    from materializer.devbackend.app import Backend

__all__ = ["SyncSession"]

log = logging.getLogger(__name__)

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


class SyncSession:
    """One client socket speaking the sync protocol."""

    def __init__(self, backend: Backend, request: web.Request, ws: web.WebSocketResponse, chunking: bool) -> None:
        self.backend = backend
        self.request = request
        self.ws = ws
        self.chunking = chunking
        self.connected = False
        self.query_set_version = 0
        self.identity_version = 0
        self.owner: str | None = None
        self.client_ts: float | None = None
        self.queries: dict[int, tuple[str, dict[str, Any]]] = {}
        self.sent_results: dict[int, tuple[str, Any]] = {}
        self.sent_version = (0, 0, 0)
        self.wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._expiry: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        refusal = self.backend.faults.take({"refuse_sync"}, self.request.path)
        if refusal is not None:
            reason = str(refusal.params.get("reason", "TooManyConcurrentRequests"))
            await self.ws.close(code=1013, message=reason[:120].encode())
            return
        self._tasks = [
            asyncio.create_task(self._send_loop()),
            asyncio.create_task(self._ping_loop()),
        ]
        try:
            async for message in self.ws:
                if message.type == WSMsgType.TEXT:
                    self._handle_text(message.data)
                    self.wake.set()
                elif message.type == WSMsgType.BINARY:
                    raise ProtocolViolation("binary frames are not part of the sync protocol")
                else:
                    break
        except ProtocolViolation as exc:
            await self.fatal(str(exc))
        except _AuthRefused as exc:
            await self._auth_error(str(exc), exc.base_version, attempted=True)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        for task in self._tasks:
            task.cancel()
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        if not self.ws.closed:
            await self.ws.close()

    def drop(self) -> None:
        """Cut the connection without a close handshake (a network fault)."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def fatal(self, error: str) -> None:
        log.info("sync: FatalError: %s", error)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send({"type": "FatalError", "error": error})
        await self.ws.close(code=1011, message=error[:120].encode())

    async def _auth_error(self, error: str, base_version: int, attempted: bool) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(
                {"type": "AuthError", "error": error, "baseVersion": base_version, "authUpdateAttempted": attempted}
            )
        await self.ws.close(code=1000, message=b"AuthError")

    # -- client messages ------------------------------------------------------------

    def _handle_text(self, text: str) -> None:
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
        elif kind == "ModifyQuerySet":
            self._on_modify_query_set(message)
        elif kind in ("Mutation", "Action"):
            self._on_function_call(kind, message)
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
                decode_ts(message["maxObservedTimestamp"])
            except ConvexValueError as exc:
                raise ProtocolViolation(f"Connect: `maxObservedTimestamp`: {exc}") from None
        client_ts = message.get("clientTs")
        if client_ts is not None:
            if isinstance(client_ts, bool) or not isinstance(client_ts, (int, float)):
                raise ProtocolViolation("Connect: `clientTs` must be a number")
            self.client_ts = float(client_ts) or None
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
            self.owner = None
            self._set_expiry(None)
        elif token_type == "User":
            value = message.get("value")
            if not isinstance(value, str):
                raise ProtocolViolation("Authenticate: `value` must be a string")
            try:
                self.owner = self.backend.authority.subject_of(value)
                self._set_expiry(self.backend.authority.expiry_of(value))
            except TokenError as exc:
                raise _AuthRefused(f"Could not verify token: {exc}", base_version) from None
        elif token_type == "Admin":
            raise _AuthRefused("Admin keys are not accepted by this deployment", base_version)
        else:
            raise ProtocolViolation(f"Authenticate: unknown tokenType {json.dumps(token_type)[:40]}")
        self.identity_version += 1

    def _set_expiry(self, exp: float | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if exp is not None:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(max(0.0, exp - time.time()), self._on_token_expired)

    def _on_token_expired(self) -> None:
        version = self.identity_version
        self._tasks.append(asyncio.create_task(self._auth_error("Token expired", version, attempted=False)))

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

    def _on_function_call(self, kind: str, message: dict[str, Any]) -> None:
        request_id = _field_int(message, "requestId", kind)
        udf_path = message.get("udfPath")
        if not isinstance(udf_path, str) or not udf_path:
            raise ProtocolViolation(f"{kind}: `udfPath` must be a non-empty string")
        _one_args_object(message.get("args"), kind)
        response: dict[str, Any] = {
            "type": f"{kind}Response",
            "requestId": request_id,
            "success": False,
            "result": f"Could not find public function for '{udf_path}'. This deployment has no {kind.lower()}s.",
            "logLines": [],
        }
        if kind == "Mutation":
            response["ts"] = None
        self._tasks.append(asyncio.create_task(self._send(response)))

    # -- server messages ---------------------------------------------------------------

    async def _send_loop(self) -> None:
        faults = self.backend.faults
        changed = self.backend.table.changed()
        while True:
            await _first_of(self.wake.wait(), changed.wait())
            self.wake.clear()
            while faults.active("withhold_transitions") is not None:
                await self.backend.faults_changed().wait()
            delay = faults.active("delay_transitions")
            if delay is not None:
                await asyncio.sleep(float(delay.params.get("ms", 100)) / 1000)
            # Take the next change event before computing, so a write that lands while this
            # transition is being sent wakes the next pass instead of being missed.
            changed = self.backend.table.changed()
            transition = self._next_transition()
            if transition is not None:
                await self._send_transition(transition)

    def _next_transition(self) -> dict[str, Any] | None:
        """Everything that changed since the last transition, or None when nothing did."""
        table = self.backend.table
        modifications: list[dict[str, Any]] = []
        results: dict[int, tuple[str, Any]] = {}
        for query_id, (udf_path, args) in sorted(self.queries.items()):
            try:
                result = ("value", to_convex_json(run_query(table, self.owner, udf_path, args)))
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
            "serverTs": end[2],
        }
        if self.client_ts is not None:
            transition["clientClockSkew"] = int(self.client_ts - time.time() * 1000)
        return transition

    async def _send_transition(self, transition: dict[str, Any]) -> None:
        text = json.dumps(transition, separators=(",", ":"))
        size = self.backend.chunk_size
        if not self.chunking or len(text) <= size:
            await self._send_text(text)
            return
        parts = [text[i : i + size] for i in range(0, len(text), size)]
        transition_id = secrets.token_hex(8)
        for number, chunk in enumerate(parts):
            await self._send(
                {"type": "TransitionChunk", "chunk": chunk, "partNumber": number, "totalParts": len(parts),
                 "transitionId": transition_id}
            )

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.backend.ping_interval)
            await self._send({"type": "Ping"})

    async def _send(self, message: dict[str, Any]) -> None:
        await self._send_text(json.dumps(message, separators=(",", ":")))

    async def _send_text(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_str(text)


class _AuthRefused(Exception):
    def __init__(self, message: str, base_version: int) -> None:
        super().__init__(message)
        self.base_version = base_version


async def _first_of(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
