"""The local backend's HTTP surface: one origin for the media API, Convex sync, ``/api/query`` and files.

Routes:
  ``POST /api/media/v1/generate``      the public media API
  ``GET  /api/sync``, ``/api/{v}/sync``  Convex sync WebSocket
  ``POST /api/query``                  Convex one-shot HTTP query
  ``GET  /files/{name}``               output files (Content-Length, ETag, Range)
  ``/_dev/...``                        control API for tests, demo and benchmarks
                                       (needs the ``X-Dev-Admin-Key`` from the data folder)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mimetypes
import re
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from materializer.convex.values import from_convex_json, to_convex_json
from materializer.devbackend.auth import Authority, TokenError
from materializer.devbackend.db import JobTable
from materializer.devbackend.faults import HTTP_KINDS, Faults
from materializer.devbackend.functions import FunctionError, run_query
from materializer.devbackend.media import MAX_BODY_BYTES, BadRequest, MediaService
from materializer.devbackend.sync import SyncSession

__all__ = ["Backend", "BackendOptions", "serve"]

log = logging.getLogger("materializer.devbackend")

AUTH_REQUIRED_BODY = {
    "error": "Sign in to Stella to use media generation.",
    "code": "auth_required",
    "action": (
        "Ask the user to open the Stella desktop app and finish signing in (Settings \u2192 Account, or the "
        "welcome screen on first launch). Once they're signed in, retry the same request \u2014 no payload "
        "changes needed."
    ),
    "docsUrl": "https://stella.sh/docs/media",
}
ADMIN_HEADER = "X-Dev-Admin-Key"
_VERSIONED_SYNC = re.compile(r"^/api/([^/]+)/sync$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class BackendOptions:
    data_dir: Path
    user: str = "demo-user"
    token_ttl: float = 86400.0
    job_delay: float = 0.05
    ping_interval: float = 15.0
    chunk_size: int = 256 * 1024
    data_uri_outputs: bool = False


class Backend:
    """State shared by every handler."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        options.data_dir.mkdir(parents=True, exist_ok=True)
        files_dir = options.data_dir / "files"
        files_dir.mkdir(exist_ok=True)
        self.files_dir = files_dir
        self.authority = Authority(options.data_dir)
        self.table = JobTable(options.data_dir / "jobs.sqlite3")
        self.faults = Faults()
        if options.data_uri_outputs:
            self.faults.output_mode = "data_uri"
        self._faults_changed = asyncio.Event()
        self.media = MediaService(self.table, files_dir, self.faults, options.job_delay)
        self.sessions: set[SyncSession] = set()
        self.sync_connections = 0
        self.ping_interval = options.ping_interval
        self.chunk_size = options.chunk_size

    def faults_changed(self) -> asyncio.Event:
        return self._faults_changed

    def configure_faults(self, spec: Any) -> None:
        self.faults.configure(spec)
        event, self._faults_changed = self._faults_changed, asyncio.Event()
        event.set()

    def owner_from_header(self, request: web.Request) -> str | None:
        """The user of a ``Bearer`` token; None when absent; raises TokenError when refused."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("Authorization header must be 'Bearer <token>'")
        return self.authority.subject_of(token.strip())

    # -- application ---------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._fault_middleware], client_max_size=1024**2)
        app.add_routes(
            [
                web.post("/api/media/v1/generate", self.generate),
                web.get("/api/sync", self.sync),
                web.get("/api/{version}/sync", self.sync),
                web.post("/api/query", self.query),
                web.get("/files/{name}", self.file),
                web.post("/_dev/token", self._admin(self.dev_token)),
                web.get("/_dev/faults", self._admin(self.dev_faults)),
                web.post("/_dev/faults", self._admin(self.dev_faults)),
                web.post("/_dev/jobs", self._admin(self.dev_jobs)),
                web.post("/_dev/drop-connections", self._admin(self.dev_drop)),
                web.get("/_dev/stats", self._admin(self.dev_stats)),
            ]
        )
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        for session in list(self.sessions):
            await session.close()
        await self.media.aclose()

    @web.middleware
    async def _fault_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/_dev/") or request.path.endswith("/sync"):
            return await handler(request)
        fault = self.faults.take({"http_error", "redirect"}, request.path)
        if fault is None:
            return await handler(request)
        if fault.kind == "redirect":
            return web.Response(status=302, headers={"Location": str(fault.params.get("location", "/"))})
        status = int(fault.params.get("status", 500))
        headers = {}
        if "retry_after" in fault.params:
            headers["Retry-After"] = str(fault.params["retry_after"])
        return web.json_response({"error": f"injected HTTP {status}"}, status=status, headers=headers)

    # -- media API -----------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.Response:
        try:
            owner = self.owner_from_header(request)
        except TokenError:
            owner = None
        if owner is None:
            return web.json_response(
                AUTH_REQUIRED_BODY, status=401, headers={"WWW-Authenticate": 'Bearer realm="stella-media"'}
            )
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                break
        try:
            parsed = await asyncio.to_thread(self.media.parse, bytes(body))
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.media.submit(owner, parsed), status=202)

    # -- Convex --------------------------------------------------------------------------------

    async def sync(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=8 * 1024 * 1024, autoping=True)
        await ws.prepare(request)
        self.sync_connections += 1
        session = SyncSession(self, request, ws, chunking=bool(_VERSIONED_SYNC.match(request.path)))
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
        return ws

    async def query(self, request: web.Request) -> web.Response:
        try:
            owner = self.owner_from_header(request)
        except TokenError as exc:
            return web.json_response({"code": "Unauthenticated", "message": f"Could not verify token: {exc}"},
                                     status=401)
        try:
            body = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return web.json_response({"code": "BadJsonBody", "message": "request body is not JSON"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            return web.json_response({"code": "BadJsonBody", "message": "body needs a string `path`"}, status=400)
        if body.get("format", "convex_encoded_json") not in ("convex_encoded_json", "json"):
            return web.json_response({"code": "BadJsonBody", "message": "unsupported `format`"}, status=400)
        args = body.get("args", {})
        if isinstance(args, list) and len(args) == 1:
            args = args[0]
        try:
            value = run_query(self.table, owner, body["path"], from_convex_json(args))
        except FunctionError as exc:
            return web.json_response({"status": "error", "errorMessage": str(exc), "logLines": []}, status=560)
        except ValueError as exc:
            return web.json_response({"code": "BadJsonBody", "message": f"args: {exc}"}, status=400)
        return web.json_response({"status": "success", "value": to_convex_json(value), "logLines": []})

    # -- files -----------------------------------------------------------------------------------

    async def file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = self.files_dir / name
        if not _FILE_NAME.match(name) or not path.is_file():
            return web.json_response({"error": "no such file"}, status=404)
        data = await asyncio.to_thread(path.read_bytes)
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
        fault = self.faults.take(HTTP_KINDS - {"http_error", "redirect"}, request.path)
        if fault is not None:
            shaped = await self._shaped_file(request, fault.kind, fault.params, data, mime)
            if shaped is not None:
                return shaped
            if fault.kind == "content_type":
                mime = str(fault.params.get("value", "text/html"))
            elif fault.kind == "corrupt":
                middle = len(data) // 2
                data = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]
            elif fault.kind == "oversize":
                data = data + b"\0" * int(fault.params.get("bytes", 1024 * 1024))
            elif fault.kind == "html":
                data = b"<!doctype html><html><head><title>Not Found</title></head><body>CDN error</body></html>"
            elif fault.kind == "empty":
                data = b""
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": mime}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        byte_range = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if byte_range and (if_range is None or if_range == etag):
            match = _RANGE.match(byte_range.strip())
            if match is None or not (match.group(1) or match.group(2)):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), len(data) - 1) if last else len(data) - 1
            else:
                start, end = max(0, len(data) - int(last)), len(data) - 1
            if start >= len(data) or start > end:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return web.Response(status=206, body=data[start : end + 1], headers=headers)
        return web.Response(body=data, headers=headers)

    async def _shaped_file(
        self, request: web.Request, kind: str, params: dict[str, Any], data: bytes, mime: str
    ) -> web.StreamResponse | None:
        """Faults that break the body on the wire: truncate, stall, huge_length."""
        if kind not in ("truncate", "stall", "huge_length"):
            return None
        declared = int(params.get("length", 10 * 1024**3)) if kind == "huge_length" else len(data)
        response = web.StreamResponse(headers={"Content-Type": mime, "Accept-Ranges": "bytes",
                                               "ETag": f'"{hashlib.sha256(data).hexdigest()[:32]}"'})
        response.content_length = declared
        await response.prepare(request)
        sent = data if kind == "huge_length" else data[: int(len(data) * float(params.get("fraction", 0.5)))]
        await response.write(sent)
        if kind == "stall":
            await asyncio.Event().wait()  # never set: the body stops until the client gives up
        if request.transport is not None:
            request.transport.close()
        return response

    # -- control API ------------------------------------------------------------------------------

    def _admin(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if request.headers.get(ADMIN_HEADER) != self.authority.admin_key:
                return web.json_response({"error": f"missing or wrong {ADMIN_HEADER}"}, status=403)
            return await handler(request)

        return guarded

    async def _json_body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise web.HTTPBadRequest(text='{"error": "body is not JSON"}', content_type="application/json")

    async def dev_token(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        token = self.authority.mint(str(body.get("sub", self.options.user)),
                                    float(body.get("ttl", self.options.token_ttl)))
        return web.json_response({"token": token})

    async def dev_faults(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.configure_faults(await self._json_body(request))
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.faults.describe())

    async def dev_jobs(self, request: web.Request) -> web.Response:
        spec = await self._json_body(request)
        if not isinstance(spec, dict):
            return web.json_response({"error": "body must be an object"}, status=400)
        owner, docs = await asyncio.to_thread(self.media.build_jobs, spec, self.options.user)
        self.table.put_many(owner, docs)
        return web.json_response({"jobs": [doc["jobId"] for doc in docs]})

    async def dev_drop(self, _request: web.Request) -> web.Response:
        sessions = list(self.sessions)
        for session in sessions:
            session.drop()
        return web.json_response({"dropped": len(sessions)})

    async def dev_stats(self, _request: web.Request) -> web.Response:
        return web.json_response({"sync_connections": self.sync_connections, "open_sessions": len(self.sessions),
                                  "ts": self.table.ts})


async def serve(options: BackendOptions, host: str, port: int, ready: Callable[[dict[str, Any]], None]) -> None:
    """Run until SIGINT or SIGTERM; call ``ready`` with the ready event once listening."""
    backend = Backend(options)
    runner = web.AppRunner(backend.application(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound_port = runner.addresses[0][1]
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    url = f"http://{shown_host}:{bound_port}"
    backend.media.base_url = url
    backend.media.resume()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ready({"event": "ready", "url": url, "token": backend.authority.mint(options.user, options.token_ttl)})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        backend.table.close()


def run(host: str, port: int, data_dir: str | None, log_level: str = "warning", **options: Any) -> int:
    """Entry point of ``materializer dev-backend``."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="stella-dev-backend-"))
        asyncio.run(serve(BackendOptions(data_dir=Path(data_dir), **options), host, port, ready))
    return 0
