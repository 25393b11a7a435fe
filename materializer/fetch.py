"""Download one output URL into a file, safely.

A job's output URLs come from the network and are not to be trusted: they may
point at the user's router, at ``localhost`` services or at cloud metadata
endpoints, redirect there, or send endless, stalled or truncated bodies. The
:class:`Fetcher` therefore

- speaks only ``http`` and ``https`` and follows at most a few redirects,
  checking every hop;
- refuses to connect to loopback, private, link-local, multicast, reserved,
  shared (CGNAT) and other non-public addresses, including IPv6 forms that
  embed such an IPv4 address, except on allowlisted origins (the configured
  backend's own). The check sits in the network backend: each host name is
  resolved once, every address is checked, and the socket connects to exactly
  the checked address, so a DNS answer cannot change between check and use
  (DNS rebinding);
- streams the body into a file with a byte limit, connect, read and total
  timeouts, a SHA-256 computed on the way, and resumes a broken transfer with
  ``Range`` when the server supports it;
- reports every failure as a :class:`FetchError` that says what happened and
  whether trying again later can help, without URLs' paths, queries or headers.

A ``data:`` URI is not a download: :func:`materializer.jobs.extract_outputs`
decodes it, and the fetcher refuses its scheme like any other but ``http(s)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http
import ipaddress
import math
import os
import re
import socket
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import BinaryIO, TypeAlias

import anyio
import httpcore
import httpx
import idna

from materializer import __version__
from materializer.httpx_shared import tls_context
from materializer.limits import MAX_DOWNLOAD_BYTES

__all__ = [
    "Destination",
    "FetchError",
    "FetchResult",
    "Fetcher",
]

#: Where a download goes: a path (created or truncated, never through a final
#: symlink) or a seekable binary file, written from its current position.
Destination: TypeAlias = str | os.PathLike[str] | BinaryIO

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

#: Whether the connection being opened may reach a non-public address. Set by
#: the fetcher around each request (true only for allowlisted origins) and read
#: by the network backend, which httpcore calls from the requesting task.
_private_addresses_allowed: ContextVar[bool] = ContextVar("_private_addresses_allowed", default=False)


class FetchError(Exception):
    """A download that did not produce a complete body.

    ``reason`` is for people and logs (it never holds headers, tokens or URL
    paths); ``retryable`` says whether the same request may succeed later;
    ``retry_after`` is the server's requested delay in seconds, when it sent one.
    """

    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class FetchResult:
    """A complete download. ``content_type`` is what the server declared, not what the bytes are."""

    bytes_written: int
    #: The URL the bytes came from after redirects (it may carry signed query
    #: parameters: do not log it).
    final_url: str
    #: Status of the last response (200, or 206 after a resume).
    status: int
    content_type: str | None
    etag: str | None
    sha256: str


# --- addresses -----------------------------------------------------------------------------------


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, bool] | None:
    """The IPv4 address an IPv6 form carries, and whether traffic goes to exactly that address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, True
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF), True
    if address.sixtofour is not None:
        return address.sixtofour, False
    if int(address) >> 32 == 0:  # deprecated IPv4-compatible form, ::a.b.c.d
        return ipaddress.IPv4Address(int(address)), False
    return None


def _forbidden_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` must not be connected to, or None for a public unicast address."""
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if isinstance(address, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(address)):
        ipv4, is_destination = embedded
        if kind := _forbidden_kind(ipv4):
            return f"{kind} (embeds {ipv4})"
        if is_destination:
            return None
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address in _CGNAT:
        return "shared address space (CGNAT)"
    if address.is_reserved:
        return "reserved"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "not globally routable"
    return None


class _GuardedBackend(httpcore.AnyIOBackend):
    """httpcore's asyncio backend, refusing non-public addresses before any connection attempt.

    The host is resolved here, once; every address it resolves to is checked and
    the socket connects to the checked address literally, so the address in use
    is the address checked.
    """

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self._checked_addresses(host, port)
                last_error: httpcore.ConnectError | None = None
                for address in addresses:
                    try:
                        return await super().connect_tcp(
                            str(address), port, local_address=local_address, socket_options=socket_options
                        )
                    except httpcore.ConnectError as exc:
                        last_error = exc
                assert last_error is not None  # getaddrinfo never answers with no address
                raise last_error
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host} timed out") from None

    @staticmethod
    async def _checked_addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                answers = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(answer[4][0]) for answer in answers))
        if not _private_addresses_allowed.get():
            for address in addresses:
                if kind := _forbidden_kind(address):
                    if literal is not None:
                        raise FetchError(f"refused: address {address} is {kind}", retryable=False)
                    raise FetchError(f"refused: {host} resolves to {address}, which is {kind}", retryable=False)
        return addresses


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool that uses :class:`_GuardedBackend`."""

    def __init__(self, limits: httpx.Limits) -> None:
        tls = tls_context(trust_env=False)
        super().__init__(verify=tls, trust_env=False, limits=limits)
        # httpx has no public hook for the network backend; its transport keeps the pool here.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedBackend(),
        )


# --- URLs and responses --------------------------------------------------------------------------

Origin: TypeAlias = tuple[str, str, int]


def _origin(url: httpx.URL) -> Origin:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def _host_port(url: httpx.URL) -> str:
    _, host, port = _origin(url)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_url(url: httpx.URL) -> None:
    """Refuse what no request may go to, whatever the address."""
    if url.scheme not in ("http", "https"):
        raise FetchError(f"refused URL scheme {url.scheme!r}", retryable=False)
    _check_punycode(url)
    if not url.host:
        raise FetchError("refused URL without a host", retryable=False)
    if url.userinfo:
        raise FetchError("refused URL with embedded credentials", retryable=False)


def _check_punycode(url: httpx.URL) -> None:
    """Refuse a host with an ``xn--`` label that is not valid IDNA (``xn--a.example``), naming the label.

    httpx keeps the encoded name and decodes it lazily, only when it starts with ``xn--`` and then on
    every use, so such a name would otherwise fail deep inside a request (or, further in, reach DNS).
    """
    host = url.raw_host.decode("ascii", "backslashreplace")
    for label in host.split("."):
        if label[:4].lower() == "xn--":
            try:
                idna.decode(label)
            except UnicodeError as exc:  # idna.IDNAError and its kinds
                raise FetchError(f"refused URL: host {host[:100]!r} has a malformed punycode label {label[:70]!r} "
                                 f"({exc})", retryable=False) from None


def _parse_url(text: str) -> httpx.URL:
    try:
        return httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise FetchError(f"invalid URL: {exc}", retryable=False) from None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _status_error(response: httpx.Response) -> FetchError:
    """The error for a response that carries no body we can use."""
    status = response.status_code
    try:
        label = f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        label = f"HTTP {status}"
    if status < 400:
        missing = " without Location" if status in _REDIRECT_STATUSES else ""
        return FetchError(f"unexpected {label}{missing}", retryable=False)
    retryable = status >= 500 or status in (408, 429)
    retry_after = _retry_after(response.headers.get("retry-after")) if retryable else None
    if retry_after is not None:
        return FetchError(f"{label} (retry after {math.ceil(retry_after)}s)", retryable=True, retry_after=retry_after)
    return FetchError(label, retryable=retryable)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _accepts_ranges(response: httpx.Response) -> bool:
    tokens = response.headers.get("accept-ranges", "").lower().split(",")
    return "bytes" in (token.strip() for token in tokens)


def _content_range(response: httpx.Response) -> tuple[int, int | None] | None:
    """A 206's first byte and the full length (None when unknown), or None when malformed."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    if match is None or int(match[2]) < int(match[1]):
        return None
    return int(match[1]), None if match[3] == "*" else int(match[3])


# --- writing -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_errors() -> Iterator[None]:
    """Local storage failures (a full disk, say) are worth retrying later, like network ones."""
    try:
        yield
    except OSError as exc:
        raise FetchError(f"cannot write the download: {exc.strerror or exc}", retryable=True) from exc


class _Sink:
    """The destination file with the byte limit and the running SHA-256 of what it holds."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self._file = file
        self._limit = limit
        with _file_errors():
            self._start = file.tell()
        self._sha256 = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self._limit:
            raise FetchError(f"body exceeds {self._limit} bytes", retryable=False)
        with _file_errors():
            self._file.write(chunk)
        self._sha256.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        """Forget everything written, for a body that starts again from byte 0."""
        with _file_errors():
            self._file.seek(self._start)
            self._file.truncate()
        self._sha256 = hashlib.sha256()
        self.size = 0

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


@contextlib.contextmanager
def _opened(dest: Destination) -> Iterator[BinaryIO]:
    if not isinstance(dest, (str, os.PathLike)):
        yield dest
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with _file_errors():
        fd = os.open(dest, flags, 0o600)
    with open(fd, "wb") as file:
        yield file


# --- the fetcher ---------------------------------------------------------------------------------


class _BrokenTransfer(Exception):
    """The body stopped before its end; the download may continue where it broke."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Fetcher:
    """Downloads output URLs over one shared, bounded connection pool.

    ``allowed_origins`` (``scheme://host[:port]``) are the only origins that may
    sit on non-public addresses: the configured backend's own. No credentials
    are ever sent.
    """

    def __init__(
        self,
        *,
        allowed_origins: Iterable[str] = (),
        max_bytes: int = MAX_DOWNLOAD_BYTES,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        total_timeout: float = 300.0,
        max_redirects: int = 5,
        max_resumes: int = 3,
        max_connections: int = 16,
    ) -> None:
        self._allowed: frozenset[Origin] = frozenset(self._allowed_origin(text) for text in allowed_origins)
        self._max_bytes = max_bytes
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._total_timeout = total_timeout
        self._max_redirects = max_redirects
        self._max_resumes = max_resumes
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(limits),
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None),
            follow_redirects=False,
            trust_env=False,  # no proxies, no .netrc credentials from the environment
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),  # keeps no cookies
            headers={"User-Agent": f"stella-materializer/{__version__}", "Accept-Encoding": "identity"},
        )

    @staticmethod
    def _allowed_origin(text: str) -> Origin:
        url = httpx.URL(text)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"allowed origin must be http(s)://host[:port], got {text!r}")
        return _origin(url)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, dest: Destination) -> FetchResult:
        """Download the ``http(s)`` URL ``url`` into ``dest``.

        On failure ``dest`` holds an unspecified partial body: write to a
        temporary file and move it into place only after success.
        """
        if not isinstance(url, str):
            raise FetchError("output URL is not a string", retryable=False)
        parsed = _parse_url(url)
        with _opened(dest) as file:
            sink = _Sink(file, self._max_bytes)
            deadline = asyncio.timeout(self._total_timeout)
            try:
                async with deadline:
                    return await self._download(parsed, sink)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise FetchError(
                    f"timed out after {self._total_timeout:g}s in total ({sink.size} bytes received)", retryable=True
                ) from None

    async def _download(self, url: httpx.URL, sink: _Sink) -> FetchResult:
        etag: str | None = None
        accepts_ranges = False
        resumes_left = self._max_resumes
        while True:
            offset = sink.size
            response = await self._open(url, self._range_headers(offset, etag))
            try:
                if response.status_code == 206 and offset > 0:
                    content_range = _content_range(response)
                    if content_range is None or content_range[0] != offset or response.headers.get("etag") != etag:
                        sink.restart()  # not the rest of our bytes: the next request asks for all of them
                        continue
                    total = content_range[1]
                    accepts_ranges = True
                elif response.status_code == 416 and offset > 0:
                    sink.restart()
                    continue
                elif response.status_code == 200:
                    sink.restart()
                    etag = response.headers.get("etag")
                    accepts_ranges = _accepts_ranges(response)
                    total = _content_length(response)
                else:
                    raise _status_error(response)
                if total is not None and total > self._max_bytes:
                    raise FetchError(f"body exceeds {self._max_bytes} bytes (declared {total})", retryable=False)
                if response.headers.get("content-encoding", "identity").lower() != "identity":
                    raise FetchError("refused: the server compressed the body although asked not to", retryable=False)
                await self._stream_body(response, sink, total)
            except _BrokenTransfer as broken:
                if not (accepts_ranges and sink.size > 0 and resumes_left > 0):
                    raise FetchError(broken.reason, retryable=True) from None
                resumes_left -= 1
                continue
            finally:
                await response.aclose()
            return FetchResult(
                bytes_written=sink.size,
                final_url=str(response.url),
                status=response.status_code,
                content_type=response.headers.get("content-type"),
                etag=etag,
                sha256=sink.hexdigest(),
            )

    @staticmethod
    def _range_headers(offset: int, etag: str | None) -> dict[str, str]:
        if offset == 0:
            return {}
        headers = {"Range": f"bytes={offset}-"}
        if etag is not None and not etag.startswith("W/"):  # If-Range takes strong validators only
            headers["If-Range"] = etag
        return headers

    async def _stream_body(self, response: httpx.Response, sink: _Sink, total: int | None) -> None:
        try:
            async for chunk in response.aiter_raw():
                sink.write(chunk)
        except httpx.ReadTimeout:
            raise FetchError(
                f"stalled: no bytes for {self._read_timeout:g}s after {sink.size} bytes", retryable=True
            ) from None
        except (httpx.RemoteProtocolError, httpx.ReadError):
            if total is None:
                raise _BrokenTransfer(f"connection broke after {sink.size} bytes") from None
        if total is not None and sink.size < total:
            raise _BrokenTransfer(f"truncated: got {sink.size} of {total} bytes")

    async def _open(self, url: httpx.URL, extra_headers: dict[str, str]) -> httpx.Response:
        """Send a GET, following redirects by hand so that every hop is checked."""
        for _ in range(self._max_redirects + 1):
            _check_url(url)
            allowlisted = _origin(url) in self._allowed
            request = self._client.build_request("GET", url, headers=extra_headers)
            permission = _private_addresses_allowed.set(allowlisted)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.ConnectTimeout:
                raise FetchError(
                    f"connecting to {_host_port(url)} timed out after {self._connect_timeout:g}s", retryable=True
                ) from None
            except httpx.ConnectError as exc:
                raise FetchError(f"could not connect to {_host_port(url)}: {exc}", retryable=True) from None
            except httpx.ReadTimeout:
                raise FetchError(
                    f"no response from {_host_port(url)} within {self._read_timeout:g}s", retryable=True
                ) from None
            except httpx.TransportError as exc:
                raise FetchError(
                    f"network error with {_host_port(url)}: {exc or type(exc).__name__}", retryable=True
                ) from None
            except httpx.InvalidURL:
                # httpx prepares the request after every redirect, even one it is not to follow, and
                # raises for a Location it cannot turn into one (``data:...``, say).
                raise FetchError("redirected to an invalid URL", retryable=False) from None
            except UnicodeError as exc:  # the same, for a Location whose host is malformed punycode (idna)
                raise FetchError(f"redirected to a host with a malformed punycode label ({exc})",
                                 retryable=False) from None
            finally:
                _private_addresses_allowed.reset(permission)
            location = response.headers.get("location")
            if response.status_code not in _REDIRECT_STATUSES or location is None:
                return response
            await response.aclose()
            try:
                url = url.join(location)
            except httpx.InvalidURL:
                raise FetchError("redirected to an invalid URL", retryable=False) from None
        raise FetchError(f"too many redirects (more than {self._max_redirects})", retryable=False)
