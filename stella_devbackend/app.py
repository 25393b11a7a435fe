"""The local backend's HTTP surface: one origin for the media API, Convex sync, ``/api/query``, auth and files.

Routes:
  ``POST /api/media/v1/generate``        the public media API (202 with a UUID ``jobId``)
  ``GET  /api/sync``, ``/api/{v}/sync``  Convex sync WebSocket
  ``POST /api/query``                    Convex one-shot HTTP query (HTTP 200 also when the function fails)
  ``GET  /api/auth/convex/token``        a fresh user token ``{token}`` for the dev session (Better Auth's
                                         Convex plugin endpoint; the session cookie, or the admin key)
  ``GET  /files/{name}``                 output files, standing in for the provider's CDN
                                         (Content-Length, ETag, Range)
  ``/_dev/...``                          control API for tests, demo and benchmarks
                                         (needs the ``X-Dev-Admin-Key`` from the data folder);
                                         ``POST /_dev/reset`` empties a running backend between tests

Every ``/api/`` route first applies Convex's client-version rule
(:mod:`stella_devbackend.clients`), as ``client_version_state_middleware``
does for every route of a deployment (get-convex/convex-backend
``crates/common/src/http/mod.rs``): refused clients get ``400
ClientVersionUnsupported`` (a WebSocket upgrade never happens), and clients
near or past the end of support get ``x-convex-deprecation-state`` and
``x-convex-deprecation-message`` headers. Errors outside function results
are ``{"code", "message"}`` JSON, as ``HttpError::into_response`` writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import mimetypes
import re
import secrets
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from materializer.convex.values import from_convex_json, to_convex_json
from stella_devbackend.auth import Authority, TokenError
from stella_devbackend.clients import ClientVersion, ClientVersionError, State, client_version_of
from stella_devbackend.clock import ServerClock
from stella_devbackend.db import JobTable
from stella_devbackend.faults import HTTP_KINDS, Faults
from stella_devbackend.functions import FunctionError, Functions
from stella_devbackend.media import MAX_BODY_BYTES, SIGNATURE_PARAM, BadRequest, MediaService
from stella_devbackend.options import BackendOptions, options_from_args
from stella_devbackend.sync import SyncContext, SyncSession

__all__ = ["ADMIN_HEADER", "Backend", "SESSION_COOKIE", "TOKEN_PATH", "serve"]

log = logging.getLogger("stella_devbackend")

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
#: Better Auth's Convex plugin route under ``/api/auth`` (``authFetch("/convex/token")`` in ruuxi/stella-v2
#: ``packages/desktop/electron/services/auth-service.ts``).
TOKEN_PATH = "/api/auth/convex/token"
#: Better Auth's default session cookie (no ``cookiePrefix`` in ``backend/convex/auth.ts``; plain http).
SESSION_COOKIE = "better-auth.session_token"
#: The ``Convex-Client`` header and the deprecation headers (``crates/convex/sync_types/src/headers.rs``).
CLIENT_HEADER = "Convex-Client"
DEPRECATION_STATE_HEADER = "x-convex-deprecation-state"
DEPRECATION_MESSAGE_HEADER = "x-convex-deprecation-message"
_CLIENT = "convex_client"  # request key: the ClientVersion the middleware identified
_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _error(status: int, code: str, message: str) -> web.Response:
    """An error outside a function's result, shaped as ``HttpError::into_response`` writes it."""
    return web.json_response({"code": code, "message": message}, status=status)


class Backend:
    """State shared by every handler."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        options.data_dir.mkdir(parents=True, exist_ok=True)
        files_dir = options.data_dir / "files"
        files_dir.mkdir(exist_ok=True)
        self.files_dir = files_dir
        clock = ServerClock(options.clock_offset)
        self.authority = Authority(options.data_dir, clock)
        self.table = JobTable(options.data_dir / "jobs.sqlite3", clock)
        self.functions = Functions(options.extensions, max_read_bytes=options.max_read_bytes)
        self.faults = Faults()
        if options.data_uri_outputs:
            self.faults.output_mode = "data_uri"
        self._faults_changed = asyncio.Event()
        self.media = MediaService(self.table, files_dir, self.faults, options.job_delay,
                                  secrets.token_bytes(32) if "signed-urls" in options.extensions else None)
        self.sync_context = SyncContext(table=self.table, functions=self.functions, authority=self.authority,
                                        faults=self.faults, options=options, faults_changed=self.faults_changed)
        self.sessions: set[SyncSession] = set()
        self.sync_connections = 0
        self._stalls_released = asyncio.Event()  # set by /_dev/reset: stalled bodies end (cut) then

    def faults_changed(self) -> asyncio.Event:
        return self._faults_changed

    def configure_faults(self, spec: Any) -> None:
        self.faults.configure(spec)
        event, self._faults_changed = self._faults_changed, asyncio.Event()
        event.set()

    @staticmethod
    def bearer_token(request: web.Request) -> str | None:
        """The ``Bearer`` token; None when there is no Authorization header; raises TokenError when malformed."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("Authorization header must be 'Bearer <token>'")
        return token.strip()

    def owner_of(self, token: str | None) -> str | None:
        """The user of a token (None for no token); raises TokenError when refused."""
        return None if token is None else self.authority.verify(token)[0]

    # -- application ---------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._client_version_middleware, self._fault_middleware],
                              client_max_size=1024**2)
        app.add_routes(
            [
                web.post("/api/media/v1/generate", self.generate),
                web.get("/api/sync", self.sync),
                web.get("/api/{client_version}/sync", self.sync),
                web.post("/api/query", self.query),
                web.get(TOKEN_PATH, self.convex_token),
                web.get("/files/{name}", self.file),
                web.post("/_dev/token", self._admin(self.dev_token)),
                web.get("/_dev/faults", self._admin(self.dev_faults)),
                web.post("/_dev/faults", self._admin(self.dev_faults)),
                web.post("/_dev/jobs", self._admin(self.dev_jobs)),
                web.post("/_dev/drop-connections", self._admin(self.dev_drop)),
                web.get("/_dev/stats", self._admin(self.dev_stats)),
                web.post("/_dev/reset", self._admin(self.dev_reset)),
            ]
        )
        app.on_response_prepare.append(self._deprecation_headers)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        for session in list(self.sessions):
            await session.close()
        await self.media.aclose()

    @web.middleware
    async def _client_version_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """``client_version_state_middleware`` for the deployment's routes (``/files`` is the CDN's, ``/_dev`` ours)."""
        if not request.path.startswith("/api/"):
            return await handler(request)
        try:
            client = client_version_of(request.headers.get(CLIENT_HEADER), request.match_info.get("client_version"),
                                       request.path)
        except ClientVersionError as exc:
            return _error(400, "InvalidClientVersion", str(exc))
        request[_CLIENT] = client
        state, message = client.state()
        if state is State.UNSUPPORTED:
            log.info("refused client %s", client)
            return _error(400, "ClientVersionUnsupported", message)
        return await handler(request)

    async def _deprecation_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """The middleware's headers for Unsupported and UpgradeRequired clients, on every answer (101 included)."""
        client: ClientVersion | None = request.get(_CLIENT)
        if client is None:
            return
        state, message = client.state()
        if state is not State.SUPPORTED:
            response.headers[DEPRECATION_STATE_HEADER] = state.value
            response.headers[DEPRECATION_MESSAGE_HEADER] = message

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
            owner = self.owner_of(self.bearer_token(request))
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
        # The session answers pings and close frames itself: it tracks when the client was last heard
        # from, and it must be able to close without a status code.
        ws = web.WebSocketResponse(max_msg_size=8 * 1024 * 1024, autoping=False, autoclose=False)
        await ws.prepare(request)
        self.sync_connections += 1
        session = SyncSession(self.sync_context, request, ws, request[_CLIENT])
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
        return ws

    async def query(self, request: web.Request) -> web.Response:
        """``public_query_post`` (``crates/local_backend/src/public_api.rs``).

        A function that threw, that does not exist or whose arguments were
        refused is an HTTP 200 ``status: "error"`` answer; ``logLines`` is
        left out when empty, as ``UdfResponse`` serializes it.
        """
        try:
            token = self.bearer_token(request)
        except TokenError as exc:
            return _error(401, "Unauthenticated", str(exc))
        try:
            body = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error(400, "BadJsonBody", "request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            return _error(400, "BadJsonBody", "body needs a string `path`")
        if body.get("format", "convex_encoded_json") not in ("convex_encoded_json", "json"):
            return _error(400, "BadJsonBody", "unsupported `format`")
        args = body.get("args", {})
        if isinstance(args, list) and len(args) == 1:
            args = args[0]
        try:
            decoded = from_convex_json(args)
        except ValueError as exc:
            return _error(400, "BadJsonBody", f"args: {exc}")
        try:
            owner = self.owner_of(token)
        except TokenError as exc:
            return _error(401, "Unauthenticated", f"Could not verify token: {exc}")
        try:
            value = self.functions.run(self.table, owner, body["path"], decoded)
        except FunctionError as exc:
            return web.json_response({"status": "error", "errorMessage": str(exc)})
        return web.json_response({"status": "success", "value": to_convex_json(value)})

    # -- auth ------------------------------------------------------------------------------------

    def _signed_in(self, request: web.Request) -> bool:
        """The dev session: its cookie as the desktop sends it, the admin key, or (an extension) a Bearer header."""
        if request.headers.get(ADMIN_HEADER) == self.authority.admin_key:
            return True
        if self.authority.is_session(request.cookies.get(SESSION_COOKIE)):
            return True
        scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
        return ("bearer-session" in self.options.extensions and scheme.lower() == "bearer"
                and self.authority.is_session(secret.strip()))

    async def convex_token(self, request: web.Request) -> web.Response:
        """``/convex/token`` of Better Auth's Convex plugin: ``{token}`` for the session, else 401.

        Its ``sessionMiddleware`` throws ``APIError("UNAUTHORIZED")``; the
        body is what better-call writes for a bare status.
        """
        if not self._signed_in(request):
            return web.json_response({"code": "UNAUTHORIZED"}, status=401)
        return web.json_response({"token": self.authority.mint(self.options.user, self.options.token_ttl)})

    # -- files -----------------------------------------------------------------------------------

    async def file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = self.files_dir / name
        if not _FILE_NAME.match(name) or not path.is_file():
            return web.json_response({"error": "no such file"}, status=404)
        if self.media.url_signing_key is not None and not hmac.compare_digest(
                request.query.get(SIGNATURE_PARAM, ""), self.media.url_signature(name)):
            # The `signed-urls` extension, off by default. An output URL is "usually an https URL on the
            # provider's CDN" (the project's reference, stella-media-jobs.md); no Stella or Convex source
            # says how that CDN guards its files, so this is the stricter case: a presigned URL, checked.
            return web.json_response({"error": "signature does not match"}, status=403)
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
            await self._stalls_released.wait()  # the body stops until the client gives up (or a reset)
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
            raise web.HTTPBadRequest(text='{"error": "body is not JSON"}', content_type="application/json") from None

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
        try:
            owner, docs = await asyncio.to_thread(self.media.build_jobs, spec, self.options.user)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
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

    async def dev_reset(self, _request: web.Request) -> web.Response:
        """Back to a just-started backend (for the next test on a shared one), keeping keys, secret and port.

        Running jobs stop, every sync socket is cut (and gone before the
        answer), stalled bodies end, the faults are the start-up ones, every
        job and file is deleted and the connection count is zero again. The
        database timestamp still only moves forward. Answers with a fresh
        token for the signed-in user, as the ready line carries one.
        """
        await self.media.aclose()
        sessions = list(self.sessions)
        for session in sessions:
            session.drop()
        deadline = asyncio.get_running_loop().time() + 10.0
        while (left := [s for s in sessions if s in self.sessions]) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        if left:
            return web.json_response({"error": f"{len(left)} sync sessions did not end"}, status=500)
        released, self._stalls_released = self._stalls_released, asyncio.Event()
        released.set()
        self.configure_faults({"output_mode": "data_uri" if self.options.data_uri_outputs else "url"})
        jobs = self.table.clear()
        files = 0
        for path in list(self.files_dir.iterdir()):
            if path.is_file():
                path.unlink()
                files += 1
        self.sync_connections = 0
        return web.json_response({"token": self.authority.mint(self.options.user, self.options.token_ttl),
                                  "dropped": len(sessions), "jobs": jobs, "files": files})


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
    ready({"event": "ready", "url": url, "token": backend.authority.mint(options.user, options.token_ttl),
           "token_url": url + TOKEN_PATH, "session_secret_file": str(backend.authority.session_secret_path)})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        backend.table.close()


def run(args: argparse.Namespace) -> int:
    """Entry point of the ``dev-backend`` command (flags: :func:`stella_devbackend.options.add_arguments`)."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    with contextlib.ExitStack() as stack:
        data_dir = args.data or stack.enter_context(tempfile.TemporaryDirectory(prefix="stella-dev-backend-"))
        asyncio.run(serve(options_from_args(args, Path(data_dir)), args.host, args.port, ready))
    return 0
