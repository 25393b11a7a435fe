"""A scripted, hostile Convex deployment on loopback, for the chaos suite's protocol cases.

:class:`HostileConvex` speaks just enough of the sync protocol to be a
deployment the daemon can follow (``Connect``, ``Authenticate`` and
``ModifyQuerySet`` in, ``Transition`` out, ``media_jobs:listSucceededSince``
and ``listFailedSince`` answered from a fixed list of job documents) and
serves files over plain HTTP from the same origin, so the daemon may fetch
them (it allows loopback only on its backend's own origin).

On the first ``hostile_sockets`` sockets it first sends whatever a *script*
returns (malformed, out-of-order or oversized frames); after that it behaves,
on the same socket if the client kept it, else on the next one. A case then
checks that the daemon survived, recorded why, and still materialized the
jobs the well-behaved part delivered.

It runs its own event loop in a thread, so tests drive it synchronously.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from materializer.convex.values import encode_ts

__all__ = ["Close", "Frame", "HostileConvex", "SocketState"]


@dataclass(frozen=True)
class Close:
    """Close the socket with this code and reason (instead of sending a frame)."""

    code: int
    reason: bytes


#: What a script sends: a text frame, a binary frame (bytes), or a close.
Frame = str | bytes | Close

SUCCEEDED = "media_jobs:listSucceededSince"
FAILED = "media_jobs:listFailedSince"


@dataclass
class SocketState:
    """What one socket has agreed so far; scripts read it to build frames that fit (or do not)."""

    query_set: int = 0
    identity: int = 0
    sent: tuple[int, int, int] = (0, 0, 0)
    queries: dict[int, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    ts: int = 1_000

    def transition(self, modifications: list[dict[str, Any]]) -> dict[str, Any]:
        """A well-formed Transition from the last version sent to what the client has sent; advances it."""
        self.ts += 1
        start, end = self.sent, (self.query_set, self.identity, self.ts)
        self.sent = end
        return {
            "type": "Transition",
            "startVersion": {"querySet": start[0], "identity": start[1], "ts": encode_ts(start[2])},
            "endVersion": {"querySet": end[0], "identity": end[1], "ts": encode_ts(end[2])},
            "modifications": modifications,
        }

    def query_id(self, udf_path: str) -> int:
        """The id under which the client subscribed to ``udf_path`` (-1 if it did not)."""
        return next((qid for qid, (path, _) in self.queries.items() if path.replace(".js:", ":") == udf_path), -1)


#: A script builds the hostile frames for one socket from its state (after the client's handshake).
Script = Callable[[SocketState], list[Frame]]
#: A raw HTTP route: full control over status, headers and body.
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HostileConvex:
    """A Convex deployment that misbehaves on its first socket(s), then serves ``docs``.

    ``docs`` are sent as they are (Convex JSON on the wire), so they may hold
    anything, ``$integer`` job ids included. ``ignores_since``: the succeeded query
    lists the newest jobs whatever their ``completedAt`` (a backend that does not
    filter by ``since``, so that jobs dated at or before 1970 reach the client).
    """

    def __init__(self, *, script: Script | None = None, hostile_sockets: int = 1,
                 docs: list[dict[str, Any]] | None = None, files: dict[str, bytes] | None = None,
                 routes: dict[str, Route] | None = None, query_value: Any = None, ignores_since: bool = False) -> None:
        self.script = script
        self.ignores_since = ignores_since
        self.hostile_sockets = hostile_sockets
        self.docs = list(docs or [])
        self.files = dict(files or {})
        self.routes = dict(routes or {})
        self.query_value = query_value
        self.queries = 0
        self.sockets = 0
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> HostileConvex:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="hostile-convex", daemon=True)
        self._thread.start()
        if not ready.wait(30) or failure:
            raise RuntimeError(f"the hostile server did not start: {failure}")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    async def _serve(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.add_routes([web.get("/api/sync", self._sync), web.get("/api/{version}/sync", self._sync),
                        web.get("/files/{name}", self._file), web.post("/api/query", self._query)])
        for path, route in self.routes.items():
            app.router.add_get(path, route)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    # -- HTTP ------------------------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.StreamResponse:
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")

    async def _query(self, _request: web.Request) -> web.Response:
        """Every one-shot query (the page query the daemon closes gaps with) answers ``query_value``.

        Without one, the function does not exist here.
        """
        self.queries += 1
        if self.query_value is None:
            return web.json_response({"status": "error", "errorMessage": "Could not find public function"},
                                     status=560)
        return web.json_response({"status": "success", "value": self.query_value, "logLines": []})

    # -- sync ------------------------------------------------------------------------------------

    async def _sync(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.sockets += 1
        hostile = self.sockets <= self.hostile_sockets and self.script is not None
        state = SocketState()
        try:
            await self._read_handshake(ws, state)
            if hostile:
                assert self.script is not None
                for frame in self.script(state):
                    if isinstance(frame, Close):
                        await ws.close(code=frame.code, message=frame.reason)
                        return ws
                    if isinstance(frame, bytes):
                        await ws.send_bytes(frame)
                    else:
                        await ws.send_str(frame)
            await self._behave(ws, state)
        except (ConnectionError, RuntimeError):
            pass  # the client dropped the socket: what the hostile frames were for
        return ws

    async def _read_handshake(self, ws: web.WebSocketResponse, state: SocketState) -> None:
        """Read until the client has sent its first ModifyQuerySet (Connect, Authenticate come first)."""
        while not state.queries:
            message = await ws.receive()
            if message.type != WSMsgType.TEXT:
                raise ConnectionError("the client went away during the handshake")
            self._take(json.loads(message.data), state)

    async def _behave(self, ws: web.WebSocketResponse, state: SocketState) -> None:
        """Answer like a deployment: a Transition with every query's value whenever the client changes."""
        answered: dict[int, Any] = {}
        while True:
            modifications = []
            for query_id, (udf_path, args) in state.queries.items():
                value = self._value(udf_path, args)
                if answered.get(query_id) != value:
                    answered[query_id] = value
                    modifications.append({"type": "QueryUpdated", "queryId": query_id, "value": value,
                                          "logLines": [], "journal": None})
            if modifications or state.sent[:2] != (state.query_set, state.identity):
                await ws.send_str(json.dumps(state.transition(modifications)))
            message = await ws.receive()
            if message.type != WSMsgType.TEXT:
                return
            self._take(json.loads(message.data), state)

    @staticmethod
    def _take(message: dict[str, Any], state: SocketState) -> None:
        kind = message.get("type")
        if kind == "Authenticate":
            state.identity = int(message["baseVersion"]) + 1
        elif kind == "ModifyQuerySet":
            for change in message["modifications"]:
                if change["type"] == "Add":
                    state.queries[int(change["queryId"])] = (change["udfPath"], change["args"][0])
                else:
                    state.queries.pop(int(change["queryId"]), None)
            state.query_set = int(message["newVersion"])

    def _value(self, udf_path: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        if udf_path.replace(".js:", ":") != SUCCEEDED:
            return []
        since, limit = float(args.get("since", 0)), int(args.get("limit", 50))
        return sorted((d for d in self.docs if self.ignores_since or d["completedAt"] >= since),
                      key=lambda d: d["completedAt"], reverse=True)[:limit]
