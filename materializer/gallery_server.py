"""``materializer gallery``: a live web page of what was made, on loopback, behind a secret.

The server reads the ledger (SQLite opened read-only: it never writes, creates or
migrates it) and the outputs folder, and nothing else, so it works with the daemon
stopped and while ``materializer replay`` runs. It serves:

==========================================  =========================================================
``/<secret>/``                              the page (``gallery_page/``: HTML, script, style, icon)
``/<secret>/api/snapshot``                  the newest jobs, failed jobs, daemon state, notices, and
                                            the ledger ``seq`` they were read at
``/<secret>/api/events?since=N``            server-sent events from the ledger's event log after
                                            ``N`` (``Last-Event-ID`` wins): the sidebar socket's
                                            ``since`` resume, so a page that slept catches up with
                                            no gap and no duplicate (:mod:`materializer.gallery_view`)
``/<secret>/files/<name>``                  an output file (``Range`` requests for video and audio)
``/<secret>/thumbs/<name>``                 a thumbnail
==========================================  =========================================================

Who may look. It listens on a loopback address only, and every request must start
with the random secret of the URL it prints (compared in constant time); anything
else is answered 403, as is a ``Host`` that is not the server's own (a DNS-rebinding
page). The secret is in the path rather than a cookie because browsers send a
cookie for 127.0.0.1 to every port of it, so any local server the browser visits
would receive it. The page is self-contained (a Content-Security-Policy of
``'self'`` only: no inline script, no other origin), shows every string with
``textContent``, and files are served ``nosniff`` and sandboxed.

New events are noticed by polling the ledger's newest ``seq`` (a read of one row)
every ``poll_interval`` while a page is connected: well within the second the
page has to show a job, without touching the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hmac
import importlib.resources
import ipaddress
import json
import logging
import os
import secrets
import signal
import stat
import sys
import webbrowser
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar
from urllib.parse import parse_qs, unquote

from materializer import exits
from materializer.gallery_view import (
    daemon_view,
    event_message,
    failed_entry_view,
    gallery_entry,
    job_view,
    quarantined_view,
    sse_frame,
)
from materializer.images import IMAGE_MIME_TYPES
from materializer.layout import THUMBNAILS_DIR, Layout
from materializer.ledger import Ledger, LedgerError, OutputFile
from materializer.media_files import MEDIA_TYPES
from materializer.thumbnails import is_image, thumbnail_name

__all__ = ["GalleryServer", "Request", "parse_range", "parse_request", "run_gallery"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Longest request head accepted (request line and headers).
MAX_REQUEST_HEAD = 16 * 1024
#: How long a connection may take to send a request, or sit idle between two.
REQUEST_TIMEOUT = 30.0
#: How long a page may take to accept what it is sent before it is dropped.
WRITE_TIMEOUT = 10.0
#: Events read from the ledger per query.
EVENT_PAGE = 500
#: A comment line this often keeps an idle event stream (and the proxies of no one) open.
HEARTBEAT_SECONDS = 15.0
#: How often the daemon's liveness is re-read for the banner (in poll rounds at most this far apart).
DAEMON_CHECK_SECONDS = 1.0
#: Failed jobs and quarantined jobs listed in a snapshot.
NOTICES = 100

_STATIC = {
    "": ("index.html", "text/html; charset=utf-8"),
    "gallery.js": ("gallery.js", "text/javascript; charset=utf-8"),
    "gallery.css": ("gallery.css", "text/css; charset=utf-8"),
    "favicon.svg": ("favicon.svg", "image/svg+xml"),
}
_CONTENT_TYPES = {**IMAGE_MIME_TYPES, **MEDIA_TYPES, "txt": "text/plain; charset=utf-8"}
#: Shown in the page (anything else is a download).
_INLINE_PREFIXES = ("image/", "video/", "audio/", "text/plain")
_PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_COMMON_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_REASONS = {200: "OK", 206: "Partial Content", 301: "Moved Permanently", 304: "Not Modified", 400: "Bad Request",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 416: "Range Not Satisfiable",
            500: "Internal Server Error"}
_FORBIDDEN = b"403 Forbidden: open the gallery with the URL `materializer gallery` printed (it holds a secret).\n"
_MAX_SEQ = 2**63 - 1


# -- requests (pure) -----------------------------------------------------------------------------------


class BadRequest(ValueError):
    """A request this server does not understand; answered 400."""


@dataclass(frozen=True)
class Request:
    """One parsed request head: method, percent-encoded path, query and lower-cased headers."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


def parse_request(head: bytes) -> Request:
    """Parse a request head (up to and including the blank line); raise :class:`BadRequest`."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise BadRequest(f"not an HTTP/1.x request line: {lines[0][:100]!r}")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(f"malformed header line {line[:100]!r}")
        headers[name.lower()] = value.strip()
    path, _, query = target.partition("?")
    return Request(method, path, parse_qs(query, keep_blank_values=True), headers)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range ``(first, last)`` inclusive of a ``Range`` header, None for the whole file.

    Only a single ``bytes=`` range is honoured (what media elements send); one that lies outside
    the file raises :class:`ValueError` (416). Anything else is ignored, as RFC 9110 allows.
    """
    if header is None or not header.startswith("bytes=") or "," in header:
        return None
    first_text, dash, last_text = header[len("bytes="):].strip().partition("-")
    if not dash or not (first_text.isdigit() or last_text.isdigit()):
        return None
    if not first_text:  # the last N bytes
        length = int(last_text)
        if length == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - length), size - 1
    first = int(first_text)
    last = int(last_text) if last_text.isdigit() else size - 1
    if first >= size or last < first:
        raise ValueError(f"range {first}-{last} is outside the {size} bytes")
    return first, min(last, size - 1)


def _plain_name(name: str) -> bool:
    """A file name that can only mean a file directly in its folder."""
    return bool(name) and "/" not in name and "\x00" not in name and not name.startswith(".") \
        and len(os.fsencode(name)) <= 255


def _since(request: Request) -> int:
    text = request.headers.get("last-event-id") or (request.query.get("since") or ["0"])[0] or "0"
    if not text.isdigit() or int(text) > _MAX_SEQ:
        raise BadRequest(f"since must be a sequence number, got {text[:40]!r}")
    return int(text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class _Frames:
    """What a read of the event log gives a stream: its new position, the frames (None: reload), more waiting."""

    since: int
    frames: bytes | None
    full: bool = False


# -- the server --------------------------------------------------------------------------------------


class GalleryServer:
    """The gallery of one state folder; ``await start()`` returns its URL, ``await close()`` stops it.

    ``host`` must be a loopback address (:class:`ValueError` otherwise); ``port`` 0 picks a free
    one. ``gallery_size`` is how many jobs the page lists (the daemon's ``gallery_size``).
    """

    def __init__(self, layout: Layout, *, host: str = "127.0.0.1", port: int = 0, gallery_size: int = 1000,
                 poll_interval: float = 0.2, secret: str | None = None) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"the gallery listens on a loopback address only (127.0.0.1, ::1), not {host!r}")
        self.layout = layout
        self.host = host
        self.port = port
        self.gallery_size = gallery_size
        self.poll_interval = poll_interval
        self.secret = secret or secrets.token_urlsafe(24)
        self._server: asyncio.Server | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gallery-ledger")
        self._ledger: Ledger | None = None
        self._assets = {path: (importlib.resources.files("materializer").joinpath("gallery_page", name).read_bytes(),
                               kind) for path, (name, kind) in _STATIC.items()}
        self._streams = 0
        self._changed = asyncio.Event()
        self._seen_seq = -1
        self._daemon: dict[str, Any] = {"running": False, "pid": None}
        self._watcher: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._allowed_hosts: set[str] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/{self.secret}/"

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=MAX_REQUEST_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._allowed_hosts = {f"{host}:{self.port}", f"localhost:{self.port}"}
        self._daemon = await self._read(self._daemon_state)
        self._watcher = asyncio.create_task(self._watch())
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._watcher is not None:
            self._watcher.cancel()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, *([self._watcher] if self._watcher else []), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await self._read(self._close_ledger)
        self._executor.shutdown(wait=True)

    # -- the ledger, on a thread of its own ------------------------------------------------------

    async def _read(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def _open(self) -> Ledger | None:
        """The ledger, opened read-only the first time it exists (a new root has none until the daemon runs)."""
        if self._ledger is None:
            try:
                self._ledger = Ledger(self.layout.ledger, read_only=True)
            except LedgerError as exc:
                log.debug("no readable ledger yet: %s", exc)
                return None
        return self._ledger

    def _close_ledger(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def _thumbnail(self, file: OutputFile) -> str | None:
        if not is_image(file):
            return None
        name = thumbnail_name(file.path)
        try:
            info = os.stat(self.layout.thumbnails / name, follow_symlinks=False)
        except OSError:
            return None
        return name if stat.S_ISREG(info.st_mode) and info.st_size > 0 else None

    def _daemon_state(self) -> dict[str, Any]:
        ledger = self._open()
        if ledger is None:
            return {"running": False, "pid": None}
        return daemon_view(ledger.get_state("daemon"), ledger.get_state("connection"), _pid_alive)

    def _snapshot(self) -> dict[str, Any]:
        ledger = self._open()
        if ledger is None:
            return {"seq": 0, "ledger": False, "jobs": [], "failed": [], "quarantined": [], "gaps": [],
                    "connection": None, "daemon": {"running": False, "pid": None}}
        seq = ledger.last_seq()  # first: whatever lands after it comes through the stream (maybe twice, never not)
        jobs = [job_view(entry, self._thumbnail) for entry in ledger.gallery_entries(self.gallery_size)]
        failed = [failed_entry_view(entry) for entry in ledger.failed_entries(NOTICES)]
        status = ledger.status(quarantined_limit=NOTICES)
        gaps = status.state.get("gaps")
        return {"seq": seq, "ledger": True, "jobs": jobs, "failed": failed,
                "quarantined": [quarantined_view(q) for q in status.quarantined],
                "gaps": [g for g in gaps if isinstance(g, dict)] if isinstance(gaps, list) else [],
                "connection": status.state.get("connection"),
                "daemon": daemon_view(status.state.get("daemon"), status.state.get("connection"), _pid_alive)}

    def _job(self, job_id: str) -> dict[str, Any] | None:
        assert self._ledger is not None
        job = self._ledger.job(job_id)
        entry = None if job is None else gallery_entry(job, self._ledger.outputs(job_id))
        return None if entry is None else job_view(entry, self._thumbnail)

    def _events_after(self, since: int) -> _Frames:
        """The page's frames for the ledger events after ``since`` (one page of them)."""
        ledger = self._open()
        if ledger is None:
            return _Frames(since, b"")
        page = ledger.events_after(since, EVENT_PAGE)
        if since > page.last_seq or page.gap:
            return _Frames(since, None)
        frames = [sse_frame(*event_message(event, self._job), event_id=event.seq) for event in page.events]
        return _Frames(page.events[-1].seq if page.events else since, b"".join(frames),
                       full=len(page.events) == EVENT_PAGE)

    def _last_seq(self) -> int:
        ledger = self._open()
        return 0 if ledger is None else ledger.last_seq()

    async def _watch(self) -> None:
        """While a page listens: wake the streams when the ledger has new events or the daemon came or went."""
        since_daemon_check = 0.0
        while True:
            await asyncio.sleep(self.poll_interval)
            if not self._streams:
                continue
            changed = False
            try:
                seq = await self._read(self._last_seq)
                since_daemon_check += self.poll_interval
                if since_daemon_check >= DAEMON_CHECK_SECONDS:
                    since_daemon_check = 0.0
                    daemon = await self._read(self._daemon_state)
                    changed, self._daemon = daemon != self._daemon, daemon
            except LedgerError as exc:
                log.warning("cannot read the ledger: %s", exc)
                continue
            if changed or seq != self._seen_seq:
                self._seen_seq = seq
                woken, self._changed = self._changed, asyncio.Event()
                woken.set()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, TimeoutError):
                    return
                except asyncio.LimitOverrunError:
                    await self._send(writer, 400, b"request head too large\n", close=True)
                    return
                try:
                    request = parse_request(head)
                except BadRequest as exc:
                    await self._send(writer, 400, f"{exc}\n".encode(), close=True)
                    return
                if request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers:
                    await self._send(writer, 400, b"requests with a body are not accepted\n", close=True)
                    return
                if not await self._respond(request, writer) or not request.keep_alive:
                    return
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("the gallery failed to answer a request")
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    async def _respond(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close after it."""
        prefix = f"/{self.secret}"
        first = request.path.split("/", 2)[1]
        if (request.headers.get("host", "").lower() not in self._allowed_hosts
                or not hmac.compare_digest(first.encode(), self.secret.encode())):
            await self._send(writer, 403, _FORBIDDEN)
            return True
        if request.method not in ("GET", "HEAD"):
            await self._send(writer, 405, b"this gallery only reads\n", {"Allow": "GET, HEAD"})
            return True
        head = request.method == "HEAD"
        rest = request.path[len(prefix):]
        if rest == "":
            await self._send(writer, 301, b"", {"Location": f"{prefix}/"}, head=head)
            return True
        route, _, name = rest[1:].partition("/")
        if not name and route in _STATIC:
            body, kind = self._assets[route]
            headers = {"Content-Type": kind}
            if route == "":
                headers.update({"Content-Security-Policy": _PAGE_POLICY, "X-Frame-Options": "DENY"})
            await self._send(writer, 200, body, headers, head=head)
            return True
        if route == "api" and name == "snapshot":
            await self._send_json(writer, await self._read(self._snapshot), head)
            return True
        if route == "api" and name == "events":
            try:
                since = _since(request)
            except BadRequest as exc:
                await self._send(writer, 400, f"{exc}\n".encode())
                return True
            await self._stream(writer, since)
            return False
        if route in ("files", "thumbs") and name:
            await self._send_file(writer, request, route == "thumbs", unquote(name), head)
            return True
        await self._send(writer, 404, b"not found\n", head=head)
        return True

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                    headers: dict[str, str] | None = None, *, head: bool = False, close: bool = False,
                    length: int | None = None) -> None:
        fields = {"Content-Type": "text/plain; charset=utf-8", **_COMMON_HEADERS, **(headers or {}),
                  "Content-Length": str(len(body) if length is None else length)}
        if close:
            fields["Connection"] = "close"
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"] + [f"{k}: {v}" for k, v in fields.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    async def _send_json(self, writer: asyncio.StreamWriter, data: Any, head: bool) -> None:
        body = json.dumps(data, separators=(",", ":")).encode("ascii")
        await self._send(writer, 200, body, {"Content-Type": "application/json"}, head=head)

    async def _send_file(self, writer: asyncio.StreamWriter, request: Request, thumbnail: bool, name: str,
                         head: bool) -> None:
        if not _plain_name(name):
            await self._send(writer, 404, b"not found\n", head=head)
            return
        try:
            file = await asyncio.to_thread(self._open_file, name, thumbnail)
        except OSError:
            await self._send(writer, 404, b"not found\n", head=head)
            return
        with file:
            size = os.fstat(file.fileno()).st_size
            try:
                span = parse_range(request.headers.get("range"), size)
            except ValueError:
                await self._send(writer, 416, b"", {"Content-Range": f"bytes */{size}"}, head=head)
                return
            kind = _CONTENT_TYPES.get(name.rsplit(".", 1)[-1].lower(), "application/octet-stream")
            headers = {"Content-Type": kind, "Accept-Ranges": "bytes",
                       "Content-Security-Policy": "default-src 'none'; sandbox"}
            if not kind.startswith(_INLINE_PREFIXES):
                headers["Content-Disposition"] = "attachment"
            first, last = span if span is not None else (0, size - 1)
            if span is not None:
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            count = max(0, last - first + 1)
            await self._send(writer, 206 if span is not None else 200, b"", headers, length=count, head=True)
            if not head and count:
                async with asyncio.timeout(WRITE_TIMEOUT + count / (1 << 20)):  # a slow page, not a stuck one
                    await asyncio.get_running_loop().sendfile(writer.transport, file, first, count)

    def _open_file(self, name: str, thumbnail: bool) -> Any:
        """An output (or thumbnail) file, opened without following a symlink anywhere inside the outputs folder."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        folder = os.open(self.layout.outputs, flags | os.O_DIRECTORY)
        try:
            if thumbnail:
                inner = os.open(THUMBNAILS_DIR, flags | os.O_DIRECTORY, dir_fd=folder)
                os.close(folder)
                folder = inner
            fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=folder)
        finally:
            os.close(folder)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.ENOENT, "not a regular file")
        return open(fd, "rb")

    async def _stream(self, writer: asyncio.StreamWriter, since: int) -> None:
        """Server-sent events from the ledger after ``since``, then as they come, until the page leaves."""
        fields = {"Content-Type": "text/event-stream", **_COMMON_HEADERS}
        head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        writer.write(head.encode("latin-1") + b"retry: 1000\n\n")
        self._streams += 1
        try:
            daemon = self._daemon = await self._read(self._daemon_state)
            writer.write(sse_frame("daemon", daemon))
            while True:
                woken = self._changed
                try:
                    read = await self._read(functools.partial(self._events_after, since))
                except LedgerError as exc:
                    log.warning("cannot read events from the ledger: %s", exc)
                    return  # the page reconnects and resumes from its last event
                if read.frames is None:
                    writer.write(sse_frame("reload", {}))
                    await self._drain(writer)
                    return
                since, frames = read.since, read.frames
                if self._daemon != daemon:
                    daemon = self._daemon
                    frames += sse_frame("daemon", daemon)
                if frames:
                    writer.write(frames)
                    await self._drain(writer)
                if read.full:
                    continue  # more are waiting: read on at once
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEARTBEAT_SECONDS):
                        await woken.wait()
                        continue
                writer.write(b": still here\n\n")
                await self._drain(writer)
        finally:
            self._streams -= 1

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()


# -- the command ---------------------------------------------------------------------------------------


def run_gallery(layout: Layout, *, host: str, port: int, open_browser: bool, gallery_size: int,
                out: TextIO = sys.stdout) -> int:
    """``materializer gallery``: serve until SIGINT or SIGTERM; print the URL once."""
    try:
        server = GalleryServer(layout, host=host, port=port, gallery_size=gallery_size)
    except ValueError as exc:
        print(f"materializer gallery: {exc}", file=sys.stderr)
        return exits.USAGE

    async def main() -> int:
        try:
            url = await server.start()
        except OSError as exc:
            print(f"materializer gallery: cannot listen on {host} port {port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return exits.FAILED
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(f"gallery of {layout.outputs}: {url}", file=out, flush=True)
        if open_browser:
            await asyncio.to_thread(webbrowser.open, url)
        try:
            await stop.wait()
        finally:
            await server.close()
        return exits.OK

    return asyncio.run(main())
