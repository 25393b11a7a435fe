"""The downloader against real HTTP servers on loopback (aiohttp), writing real files.

Every positive case allowlists its server's origin, as the daemon does for the
configured backend; everything else on loopback must be refused, and refused
before any connection is made.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from materializer.fetch import Fetcher, FetchError, _check_punycode, _forbidden_kind
from materializer.limits import MAX_DOWNLOAD_BYTES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]
    client_port: int


@dataclass
class Server:
    origin: str
    seen: list[Seen] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.origin + path


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[str, Handler]], Awaitable[Server]]]:
    """Start aiohttp servers on 127.0.0.1 with the given routes; each records what it receives.

    Handlers are cancelled when their client goes away, so a handler that waits
    forever (a stalled body) ends as soon as the fetcher gives up.
    """
    runners: list[web.AppRunner] = []

    async def start(routes: dict[str, Handler]) -> Server:
        server = Server(origin="")

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            server.seen.append(Seen(request.path, dict(request.headers), peer[1] if peer else -1))
            return await handler(request)

        app = web.Application(middlewares=[record])
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


@dataclass
class Listener:
    """A bare TCP listener that records every connection it accepts."""

    port: int
    accepted: list[int]

    async def assert_never_connected(self) -> None:
        # Connections are accepted in order: once a control connection has been
        # served, any earlier connection attempt would have been recorded too.
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        control_port = writer.get_extra_info("sockname")[1]
        await reader.read()
        writer.close()
        await writer.wait_closed()
        assert self.accepted == [control_port]


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("peername")[1])
        writer.close()

    tcp = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    yield Listener(tcp.sockets[0].getsockname()[1], accepted)
    tcp.close()
    await tcp.wait_closed()


@pytest.fixture
async def make_fetcher() -> AsyncIterator[Callable[..., Fetcher]]:
    fetchers: list[Fetcher] = []

    def make(*allowed: Server | str, **options: object) -> Fetcher:
        origins = [item.origin if isinstance(item, Server) else item for item in allowed]
        fetcher = Fetcher(allowed_origins=origins, **options)  # type: ignore[arg-type]
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        await fetcher.aclose()


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def send_truncated(
    request: web.Request, data: bytes, *, declared: int, headers: dict[str, str], status: int = 200
) -> web.StreamResponse:
    """Declare ``declared`` bytes, send ``data``, then drop the connection."""
    response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(declared)})
    await response.prepare(request)
    await response.write(data)
    assert request.transport is not None
    request.transport.close()
    return response


def requested_start(request: web.Request) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
    return int(match[1]) if match else None


def partial(data: bytes, start: int, etag: str) -> web.Response:
    return web.Response(
        status=206,
        body=data[start:],
        headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", "ETag": etag, "Accept-Ranges": "bytes"},
    )


async def stall_forever(request: web.Request, prefix: bytes = b"") -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Length": "100000"})
    await response.prepare(request)
    await response.write(prefix)
    await asyncio.Event().wait()  # never set: cancelled when the client leaves
    return response


async def fetch_error(fetcher: Fetcher, url: str, dest: Path) -> FetchError:
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(url, dest)
    return caught.value


# --- plain downloads -----------------------------------------------------------------------------


async def test_download_writes_the_body_and_reports_its_sha256(serve, make_fetcher, tmp_path: Path) -> None:
    data = payload(300_000)

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=data, headers={"Content-Type": "image/png", "ETag": '"abc"'})

    server = await serve({"/a.png": image})
    result = await make_fetcher(server).fetch(server.url("/a.png?sig=secret"), tmp_path / "out")

    assert (tmp_path / "out").read_bytes() == data
    assert result.bytes_written == len(data)
    assert result.sha256 == sha256(data)
    assert result.status == 200
    assert result.content_type == "image/png"
    assert result.etag == '"abc"'
    assert result.final_url == server.url("/a.png?sig=secret")
    assert server.seen[0].headers["Accept-Encoding"] == "identity"
    assert "Authorization" not in server.seen[0].headers


async def test_download_into_an_open_file_starts_at_its_position(serve, make_fetcher, tmp_path: Path) -> None:
    data = payload(5000)

    async def body(request: web.Request) -> web.Response:
        return web.Response(body=data)

    server = await serve({"/b": body})
    with open(tmp_path / "out", "w+b") as file:
        file.write(b"header")
        result = await make_fetcher(server).fetch(server.url("/b"), file)
    assert (tmp_path / "out").read_bytes() == b"header" + data
    assert result.bytes_written == len(data) and result.sha256 == sha256(data)


async def test_connections_are_reused_and_cookies_are_not_kept(serve, make_fetcher, tmp_path: Path) -> None:
    async def body(request: web.Request) -> web.Response:
        response = web.Response(body=b"hello")
        response.set_cookie("session", "tracking")
        return response

    server = await serve({"/c": body})
    fetcher = make_fetcher(server)
    await fetcher.fetch(server.url("/c"), tmp_path / "one")
    await fetcher.fetch(server.url("/c"), tmp_path / "two")

    first, second = server.seen
    assert first.client_port == second.client_port  # the same keep-alive connection
    assert "Cookie" not in second.headers


async def test_destination_symlink_is_not_followed(serve, make_fetcher, tmp_path: Path) -> None:
    async def body(request: web.Request) -> web.Response:
        return web.Response(body=b"evil")

    server = await serve({"/d": body})
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    (tmp_path / "out").symlink_to(target)

    error = await fetch_error(make_fetcher(server), server.url("/d"), tmp_path / "out")
    assert error.reason.startswith("cannot write the download:")
    assert target.read_bytes() == b"precious"
    assert server.seen == []


# --- limits --------------------------------------------------------------------------------------


async def test_declared_length_over_the_limit_is_refused_before_reading(serve, make_fetcher, tmp_path: Path) -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "2000"})
        await response.prepare(request)
        await asyncio.Event().wait()  # the body never comes: reading it would stall
        return response

    server = await serve({"/big": big})
    fetcher = make_fetcher(server, max_bytes=1000, read_timeout=30)
    error = await fetch_error(fetcher, server.url("/big"), tmp_path / "out")
    assert error.reason == "body exceeds 1000 bytes (declared 2000)"
    assert not error.retryable
    assert (tmp_path / "out").read_bytes() == b""


async def test_endless_chunked_body_stops_at_the_limit(serve, make_fetcher, tmp_path: Path) -> None:
    chunk = payload(4096)

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        while True:
            await response.write(chunk)

    server = await serve({"/endless": endless})
    error = await fetch_error(make_fetcher(server, max_bytes=100_000), server.url("/endless"), tmp_path / "out")
    assert error.reason == "body exceeds 100000 bytes"
    assert not error.retryable
    assert (tmp_path / "out").stat().st_size <= 100_000


async def test_memory_stays_flat_for_a_body_at_the_default_limit(serve, make_fetcher, tmp_path: Path) -> None:
    chunk = payload(64 * 1024)
    count = MAX_DOWNLOAD_BYTES // len(chunk)
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(count):
            await response.write(chunk)
        return response

    server = await serve({"/large": large})
    fetcher = make_fetcher(server)
    tracemalloc.start()
    try:
        result = await fetcher.fetch(server.url("/large"), tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.bytes_written == MAX_DOWNLOAD_BYTES == (tmp_path / "out").stat().st_size
    assert result.sha256 == expected.hexdigest()
    assert peak < 8 * 1024 * 1024


async def test_compressed_body_is_refused(serve, make_fetcher, tmp_path: Path) -> None:
    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(body=b"\x1f\x8b not really", headers={"Content-Encoding": "gzip"})

    server = await serve({"/gz": gzipped})
    error = await fetch_error(make_fetcher(server), server.url("/gz"), tmp_path / "out")
    assert error.reason == "refused: the server compressed the body although asked not to"


# --- broken transfers and resume -----------------------------------------------------------------


async def test_truncated_body_resumes_with_range(serve, make_fetcher, tmp_path: Path) -> None:
    data = payload(5000)

    async def flaky(request: web.Request) -> web.StreamResponse:
        start = requested_start(request)
        if start is None:
            headers = {"Accept-Ranges": "bytes", "ETag": '"v1"', "Content-Type": "image/webp"}
            return await send_truncated(request, data[:1000], declared=len(data), headers=headers)
        assert request.headers["If-Range"] == '"v1"'
        return partial(data, start, '"v1"')

    server = await serve({"/f": flaky})
    result = await make_fetcher(server).fetch(server.url("/f"), tmp_path / "out")

    assert (tmp_path / "out").read_bytes() == data
    assert result.sha256 == sha256(data) and result.bytes_written == len(data)
    assert result.status == 206 and result.etag == '"v1"'
    assert [seen.headers.get("Range") for seen in server.seen] == [None, "bytes=1000-"]
    assert server.seen[1].headers["If-Range"] == '"v1"'


async def test_server_ignoring_range_restarts_from_zero(serve, make_fetcher, tmp_path: Path) -> None:
    data = payload(5000)

    async def ignores_range(request: web.Request) -> web.StreamResponse:
        if len(server.seen) == 1:
            return await send_truncated(request, data[:1000], declared=len(data), headers={"Accept-Ranges": "bytes"})
        return web.Response(body=data)  # a full 200 despite the Range header

    server = await serve({"/f": ignores_range})
    result = await make_fetcher(server).fetch(server.url("/f"), tmp_path / "out")

    assert server.seen[1].headers["Range"] == "bytes=1000-"
    assert (tmp_path / "out").read_bytes() == data
    assert result.sha256 == sha256(data) and result.status == 200


async def test_changed_etag_restarts_from_zero(serve, make_fetcher, tmp_path: Path) -> None:
    old, new = payload(5000, seed=1), payload(4000, seed=2)

    async def replaced(request: web.Request) -> web.StreamResponse:
        if len(server.seen) == 1:
            headers = {"Accept-Ranges": "bytes", "ETag": '"old"'}
            return await send_truncated(request, old[:1000], declared=len(old), headers=headers)
        assert request.headers["If-Range"] == '"old"'  # no longer current: the whole new body
        return web.Response(body=new, headers={"ETag": '"new"', "Accept-Ranges": "bytes"})

    server = await serve({"/f": replaced})
    result = await make_fetcher(server).fetch(server.url("/f"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new
    assert result.sha256 == sha256(new) and result.etag == '"new"'


@pytest.mark.parametrize(
    "bad_part",
    [
        pytest.param(lambda data, start: partial(data, start, '"other"'), id="206-with-another-etag"),
        pytest.param(lambda data, start: partial(data, start - 10, '"v1"'), id="206-at-another-offset"),
    ],
)
async def test_partial_response_that_does_not_continue_restarts(serve, make_fetcher, tmp_path, bad_part) -> None:
    data = payload(5000)

    async def confused(request: web.Request) -> web.StreamResponse:
        start = requested_start(request)
        if len(server.seen) == 1:
            headers = {"Accept-Ranges": "bytes", "ETag": '"v1"'}
            return await send_truncated(request, data[:1000], declared=len(data), headers=headers)
        if start is not None:
            return bad_part(data, start)
        return web.Response(body=data, headers={"ETag": '"v1"'})

    server = await serve({"/f": confused})
    result = await make_fetcher(server).fetch(server.url("/f"), tmp_path / "out")
    assert [seen.headers.get("Range") for seen in server.seen] == [None, "bytes=1000-", None]
    assert (tmp_path / "out").read_bytes() == data
    assert result.sha256 == sha256(data)


async def test_truncation_without_range_support_is_retryable(serve, make_fetcher, tmp_path: Path) -> None:
    async def truncates(request: web.Request) -> web.StreamResponse:
        return await send_truncated(request, b"x" * 1000, declared=5000, headers={})

    server = await serve({"/f": truncates})
    error = await fetch_error(make_fetcher(server), server.url("/f"), tmp_path / "out")
    assert error.reason == "truncated: got 1000 of 5000 bytes"
    assert error.retryable
    assert len(server.seen) == 1


async def test_resumes_are_bounded(serve, make_fetcher, tmp_path: Path) -> None:
    data = payload(10_000)

    async def dribbles(request: web.Request) -> web.StreamResponse:
        start = requested_start(request) or 0
        headers = {"Accept-Ranges": "bytes", "ETag": '"v1"'}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        piece = data[start : start + 1000]
        status = 206 if start else 200
        return await send_truncated(request, piece, declared=len(data) - start, headers=headers, status=status)

    server = await serve({"/f": dribbles})
    error = await fetch_error(make_fetcher(server, max_resumes=2), server.url("/f"), tmp_path / "out")
    assert error.reason == "truncated: got 3000 of 10000 bytes"
    assert error.retryable
    assert [seen.headers.get("Range") for seen in server.seen] == [None, "bytes=1000-", "bytes=2000-"]


async def test_stalled_body_is_a_retryable_error(serve, make_fetcher, tmp_path: Path) -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        return await stall_forever(request, prefix=b"0123456789")

    server = await serve({"/s": stalls})
    error = await fetch_error(make_fetcher(server, read_timeout=0.2), server.url("/s"), tmp_path / "out")
    assert error.reason == "stalled: no bytes for 0.2s after 10 bytes"
    assert error.retryable


async def test_missing_response_is_a_retryable_error(serve, make_fetcher, tmp_path: Path) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    server = await serve({"/s": silent})
    error = await fetch_error(make_fetcher(server, read_timeout=0.2), server.url("/s"), tmp_path / "out")
    assert error.reason == f"no response from {server.origin.removeprefix('http://')} within 0.2s"
    assert error.retryable


async def test_total_timeout_bounds_a_slow_trickle(serve, make_fetcher, tmp_path: Path) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        while True:  # each byte well within the read timeout, the whole never done
            await response.write(b"x")
            await asyncio.sleep(0.02)

    server = await serve({"/t": trickle})
    fetcher = make_fetcher(server, read_timeout=30, total_timeout=0.3)
    error = await fetch_error(fetcher, server.url("/t"), tmp_path / "out")
    assert re.fullmatch(r"timed out after 0\.3s in total \(\d+ bytes received\)", error.reason)
    assert error.retryable


# --- HTTP errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable", "reason"),
    [
        (500, True, "HTTP 500 Internal Server Error"),
        (502, True, "HTTP 502 Bad Gateway"),
        (408, True, "HTTP 408 Request Timeout"),
        (404, False, "HTTP 404 Not Found"),
        (403, False, "HTTP 403 Forbidden"),
        (204, False, "unexpected HTTP 204 No Content"),
        (302, False, "unexpected HTTP 302 Found without Location"),
    ],
)
async def test_http_errors(serve, make_fetcher, tmp_path: Path, status: int, retryable: bool, reason: str) -> None:
    async def fails(request: web.Request) -> web.Response:
        return web.Response(status=status)

    server = await serve({"/e": fails})
    error = await fetch_error(make_fetcher(server), server.url("/e"), tmp_path / "out")
    assert (error.reason, error.retryable, error.retry_after) == (reason, retryable, None)


async def test_retry_after_in_seconds(serve, make_fetcher, tmp_path: Path) -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "7"})

    server = await serve({"/e": busy})
    error = await fetch_error(make_fetcher(server), server.url("/e"), tmp_path / "out")
    assert error.reason == "HTTP 429 Too Many Requests (retry after 7s)"
    assert (error.retryable, error.retry_after) == (True, 7.0)


async def test_retry_after_as_http_date(serve, make_fetcher, tmp_path: Path) -> None:
    async def down(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": formatdate(time.time() + 120, usegmt=True)})

    server = await serve({"/e": down})
    error = await fetch_error(make_fetcher(server), server.url("/e"), tmp_path / "out")
    assert error.retryable
    assert error.retry_after is not None and 60 < error.retry_after <= 120
    assert re.fullmatch(r"HTTP 503 Service Unavailable \(retry after \d+s\)", error.reason)


# --- redirects and address policy ----------------------------------------------------------------


def redirect_to(location: str | Callable[[], str], status: int = 302) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        target = location() if callable(location) else location
        return web.Response(status=status, headers={"Location": target})

    return handler


async def test_redirects_are_followed(serve, make_fetcher, tmp_path: Path) -> None:
    async def final(request: web.Request) -> web.Response:
        return web.Response(body=b"arrived")

    server = await serve({"/one": redirect_to("/two", 301), "/two": redirect_to("/three?x=1", 307), "/three": final})
    result = await make_fetcher(server).fetch(server.url("/one"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"arrived"
    assert result.final_url == server.url("/three?x=1")
    assert [seen.path for seen in server.seen] == ["/one", "/two", "/three"]


async def test_redirect_loop_is_capped(serve, make_fetcher, tmp_path: Path) -> None:
    server = await serve({"/loop": redirect_to("/loop")})
    error = await fetch_error(make_fetcher(server), server.url("/loop"), tmp_path / "out")
    assert error.reason == "too many redirects (more than 5)"
    assert not error.retryable
    assert len(server.seen) == 6


async def test_redirect_to_a_loopback_port_not_allowlisted_is_refused(
    serve, make_fetcher, listener: Listener, tmp_path: Path
) -> None:
    server = await serve({"/r": redirect_to(f"http://127.0.0.1:{listener.port}/x")})
    error = await fetch_error(make_fetcher(server), server.url("/r"), tmp_path / "out")
    assert error.reason == "refused: address 127.0.0.1 is loopback"
    assert not error.retryable
    await listener.assert_never_connected()


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("file:///etc/passwd", "refused URL scheme 'file'"),
        ("http://10.0.0.1/", "refused: address 10.0.0.1 is private"),
        ("http://169.254.169.254/latest/meta-data/", "refused: address 169.254.169.254 is link-local"),
        ("http://user:pass@example.com/", "refused URL with embedded credentials"),
        ("data:image/png;base64,iVBORw0KGgo=", "redirected to an invalid URL"),
        ("http://xn--a.example/x.png", "redirected to a host with a malformed punycode label "
                                       "(Codepoint U+0080 at position 1 of '\\x80' not allowed)"),
        ("http://cdn.xn--a.example/x.png", "refused URL: host 'cdn.xn--a.example' has a malformed punycode label "
                                           "'xn--a' (Codepoint U+0080 at position 1 of '\\x80' not allowed)"),
    ],
)
async def test_redirect_to_forbidden_targets_is_refused(
    serve, make_fetcher, tmp_path: Path, location: str, reason: str
) -> None:
    server = await serve({"/r": redirect_to(location)})
    error = await fetch_error(make_fetcher(server), server.url("/r"), tmp_path / "out")
    assert (error.reason, error.retryable) == (reason, False)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "refused: address 127.0.0.1 is loopback"),
        ("[::1]", "refused: address ::1 is loopback"),
        ("0.0.0.0", "refused: address 0.0.0.0 is unspecified"),
        ("[::ffff:127.0.0.1]", "refused: address ::ffff:7f00:1 is loopback (embeds 127.0.0.1)"),
        ("[::ffff:10.1.2.3]", "refused: address ::ffff:a01:203 is private (embeds 10.1.2.3)"),
        ("[::127.0.0.1]", "refused: address ::7f00:1 is loopback (embeds 127.0.0.1)"),
        ("[64:ff9b::10.0.0.1]", "refused: address 64:ff9b::a00:1 is private (embeds 10.0.0.1)"),
        ("[2002:c0a8:101::1]", "refused: address 2002:c0a8:101::1 is private (embeds 192.168.1.1)"),
        ("192.168.1.20", "refused: address 192.168.1.20 is private"),
        ("172.16.0.1", "refused: address 172.16.0.1 is private"),
        ("100.64.0.1", "refused: address 100.64.0.1 is shared address space (CGNAT)"),
        ("224.0.0.1", "refused: address 224.0.0.1 is multicast"),
        ("240.0.0.1", "refused: address 240.0.0.1 is reserved"),
        ("[fe80::1]", "refused: address fe80::1 is link-local"),
        ("[fc00::1]", "refused: address fc00::1 is private"),
        ("[fec0::1]", "refused: address fec0::1 is site-local"),
        ("[ff02::1]", "refused: address ff02::1 is multicast"),
    ],
)
async def test_non_public_addresses_are_refused_before_connecting(
    make_fetcher, listener: Listener, tmp_path: Path, host: str, reason: str
) -> None:
    error = await fetch_error(make_fetcher(), f"http://{host}:{listener.port}/x", tmp_path / "out")
    assert (error.reason, error.retryable) == (reason, False)
    await listener.assert_never_connected()


async def test_host_names_are_checked_by_the_addresses_they_resolve_to(
    make_fetcher, listener: Listener, tmp_path: Path
) -> None:
    error = await fetch_error(make_fetcher(), f"http://localhost:{listener.port}/x", tmp_path / "out")
    assert re.fullmatch(r"refused: localhost resolves to (127\.0\.0\.1|::1), which is loopback", error.reason)
    await listener.assert_never_connected()


async def test_allowlisted_host_name_may_resolve_to_loopback(serve, make_fetcher, tmp_path: Path) -> None:
    async def body(request: web.Request) -> web.Response:
        return web.Response(body=b"local backend")

    server = await serve({"/f": body})
    by_name = server.origin.replace("127.0.0.1", "localhost")
    result = await make_fetcher(by_name).fetch(by_name + "/f", tmp_path / "out")
    assert result.bytes_written == len(b"local backend")


async def test_allowlist_is_by_scheme_host_and_port(serve, make_fetcher, tmp_path: Path) -> None:
    async def body(request: web.Request) -> web.Response:
        return web.Response(body=b"x")

    server = await serve({"/f": body})
    fetcher = make_fetcher(server)
    https_url = server.url("/f").replace("http://", "https://")
    error = await fetch_error(fetcher, https_url, tmp_path / "out")
    assert error.reason == "refused: address 127.0.0.1 is loopback"
    assert server.seen == []
    assert (await fetcher.fetch(server.url("/f"), tmp_path / "out")).bytes_written == 1  # still usable


async def test_permission_for_allowlisted_origins_does_not_leak_to_concurrent_fetches(
    serve, make_fetcher, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=b"allowed")

    server = await serve({"/f": slow})
    fetcher = make_fetcher(server)
    allowed = asyncio.create_task(fetcher.fetch(server.url("/f"), tmp_path / "allowed"))
    while not server.seen:  # the allowlisted request is in flight on its connection
        await asyncio.sleep(0)
    by_name = server.url("/f").replace("127.0.0.1", "localhost")
    error = await fetch_error(fetcher, by_name, tmp_path / "refused")
    release.set()
    assert (await allowed).bytes_written == len(b"allowed")
    assert error.reason.startswith("refused: localhost resolves to")
    assert len(server.seen) == 1


def test_public_addresses_are_allowed() -> None:
    for text in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8"]:
        assert _forbidden_kind(ip_address(text)) is None, text


def test_allowed_origins_must_be_http_origins() -> None:
    with pytest.raises(ValueError, match="allowed origin"):
        Fetcher(allowed_origins=["ftp://example.com"])


async def test_data_uris_are_not_fetched(make_fetcher, tmp_path: Path) -> None:
    """jobs.extract_outputs decodes data URIs; one that reaches the fetcher is refused like any other scheme."""
    fetcher = make_fetcher()
    for uri in ("data:image/gif;base64,R0lG", "DATA:text/plain,hello"):
        error = await fetch_error(fetcher, uri, tmp_path / "o")
        assert (error.reason, error.retryable) == ("refused URL scheme 'data'", False)


async def test_invalid_urls_are_refused(make_fetcher, tmp_path: Path) -> None:
    fetcher = make_fetcher()
    assert (await fetch_error(fetcher, "ftp://example.com/a.png", tmp_path / "o")).reason == "refused URL scheme 'ftp'"
    assert (await fetch_error(fetcher, "http:///nohost", tmp_path / "o")).reason == "refused URL without a host"
    invalid = await fetch_error(fetcher, "http://example.com:notaport/", tmp_path / "o")
    assert invalid.reason == "invalid URL: Invalid port: 'notaport'"
    not_a_string = await fetch_error(fetcher, 42, tmp_path / "o")  # type: ignore[arg-type]
    assert not_a_string.reason == "output URL is not a string"


@pytest.mark.parametrize(
    ("url", "label", "why"),
    [
        ("http://xn--a.example/x.png", "xn--a", "Codepoint U+0080 at position 1 of '\\x80' not allowed"),
        ("https://cdn.xn--.example/", "xn--", "Malformed A-label, no Punycode eligible content found"),
        ("http://XN--ZZ.com/", "xn--zz", "Invalid A-label"),
    ],
)
async def test_malformed_punycode_hosts_are_refused_for_good(make_fetcher, tmp_path: Path, url: str, label: str,
                                                             why: str) -> None:
    """Not a traceback and a retry: httpx decodes the name lazily, and idna's error used to escape the fetcher
    (or, for a label further in, the name went to DNS)."""
    error = await fetch_error(make_fetcher(), url, tmp_path / "o")
    host = url.split("/")[2].lower()
    assert (error.reason, error.retryable) == (
        f"refused URL: host {host!r} has a malformed punycode label {label!r} ({why})", False)


def test_valid_punycode_hosts_pass_the_check() -> None:
    """``xn--bcher-kva`` is bücher, ``xn--nxasmq6b`` is βόλοσ: names like these are not refused."""
    for url in ("http://xn--bcher-kva.example/x.png", "https://cdn.XN--NXASMQ6B.example/", "http://bücher.example/"):
        _check_punycode(httpx.URL(url))


def test_a_download_does_not_search_sys_path_for_sniffio_on_every_request() -> None:
    """httpcore imports sniffio on each request; absent, every import searched sys.path (materializer.httpx_shared).

    Run in a fresh interpreter: the counted searches are those of a real download from a loopback server.
    """
    script = r'''
import asyncio, importlib.machinery, tempfile, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from materializer.fetch import Fetcher

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "5"); self.end_headers(); self.wfile.write(b"hello")
    def log_message(self, *args): pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
origin = f"http://127.0.0.1:{server.server_port}"
searches = []
find_spec = importlib.machinery.PathFinder.find_spec
def counting(name, *args, **kwargs):
    searches.append(name)
    return find_spec(name, *args, **kwargs)
importlib.machinery.PathFinder.find_spec = counting

async def main():
    fetcher = Fetcher(allowed_origins=[origin])
    with tempfile.TemporaryDirectory() as folder:
        for index in range(5):
            await fetcher.fetch(f"{origin}/{index}", Path(folder) / f"{index}")
    await fetcher.aclose()

asyncio.run(main())
print(searches.count("sniffio"))
'''
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_fetchers_and_convex_clients_load_the_ca_bundle_once_per_kind_not_once_each() -> None:
    """Loading the CA bundle into a TLS context costs about 20 ms and 1 MB (materializer.httpx_shared)."""
    script = r'''
import asyncio, ssl
loads = []
real = ssl.SSLContext.load_verify_locations
def counting(self, *args, **kwargs):
    loads.append(1)
    return real(self, *args, **kwargs)
ssl.SSLContext.load_verify_locations = counting
from materializer.convex.http import ConvexHttpClient
from materializer.fetch import Fetcher

async def main():
    for _ in range(3):
        await Fetcher(allowed_origins=["https://cdn.example"]).aclose()
        await ConvexHttpClient("https://deployment.example").aclose()

asyncio.run(main())
print(len(loads))
'''
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"  # one context for the downloads, one for the deployment's clients
