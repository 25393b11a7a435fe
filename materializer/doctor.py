"""``materializer doctor``: check a setup the way a person debugging it would, one line per check.

The checks, in order: the deployment answers HTTP (``reachable``); it does not
refuse or deprecate our ``Convex-Client`` identity (``client_version``); TLS
is verified, or plain HTTP stays on loopback (``tls``); the configured token
source holds a live token the deployment accepts (``token``); the three real
queries answer with the shapes the daemon relies on (``get_by_job_id``,
``list_succeeded_since``, ``list_failed_since``); whether the optional page
query exists (``page_query``: its absence is normal); the sync socket
delivers a first result (``sync_socket``); the state folder can be trusted
(``state_folder``: its folders and the ledger, lock and socket are no
symlinks, ours, and writable by nobody else, as ``run`` requires); and the
outputs folder takes a durable write (``outputs_folder``, skipped when the
state folder is refused: writing through a planted symlink is what the
check is there to prevent).

Each check gathers plain facts at the edge (an HTTP answer or the exception
that stopped it, a query's value, a folder's free space) and hands them to a
verdict function that is plain data in, :class:`Check` out. A check that
cannot run because an earlier one failed is ``skip``. When the token is
missing, expired or refused, the later checks run without one, so a
deployment that works except for the sign-in reads as exactly that
(exit 3), not as a broken deployment.

No token ever reaches the output: every detail passes through
:func:`materializer.redaction.redact`, which knows each token the sources handed
out (a server may echo what it was sent).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx

from materializer import exits
from materializer.config import Settings, settings_values
from materializer.config_values import ConfigError, convex_url
from materializer.convex.http import ConvexAuthError, ConvexFunctionError, ConvexHttpClient, ConvexHttpError
from materializer.convex.identity import (
    CLIENT_ID,
    DEPRECATION_MESSAGE_HEADER,
    DEPRECATION_STATE_HEADER,
    client_headers,
)
from materializer.convex.protocol import QueryFailure, QueryResult, QueryValue
from materializer.convex.token_timing import token_timing
from materializer.convex.transport import ConnectionState, SyncClient
from materializer.finite import is_finite_number
from materializer.layout import Finding, inspect_layout
from materializer.queries import FAILED_QUERY, JOB_QUERY, MISSING_FUNCTION, PAGE_QUERY, SUCCEEDED_QUERY
from materializer.redaction import redact
from materializer.store import OutputStore, StorageError
from materializer.tokens import TokenProvider, TokenSourceError, provider_from_values

__all__ = [
    "Answer",
    "Check",
    "HttpAnswer",
    "SyncOutcome",
    "TlsInfo",
    "client_version_verdict",
    "connect_failure",
    "exit_code",
    "list_verdict",
    "lookup_verdict",
    "outputs_verdict",
    "page_verdict",
    "reachable_verdict",
    "render_json",
    "render_text",
    "run_checks",
    "run_doctor",
    "state_folder_verdict",
    "sync_verdict",
    "tls_verdict",
    "token_verdict",
]

Status = Literal["ok", "warn", "fail", "skip"]

#: How long each network step may take (an HTTP answer, the socket's first result).
DEFAULT_TIMEOUT = 10.0
#: How far back the list queries look, and how many jobs they may return: only the answer's shape matters.
LOOKBACK_MS = 3_600_000
LIST_LIMIT = 1
#: The ``code`` of a 400 by which a deployment refuses our ``Convex-Client`` (too old, or not parseable).
REFUSED_CLIENT_CODES = frozenset({"ClientVersionUnsupported", "InvalidClientVersion"})
#: A certificate this close to expiry is a warning (renewal has probably failed).
CERT_WARNING_SECONDS = 14 * 86_400
#: The checks after ``token`` that need the deployment's answers.
_SERVER_CHECKS = ("get_by_job_id", "list_succeeded_since", "list_failed_since", "page_query", "sync_socket")
#: How each status reads in text: the bad ones in capitals, so they stand out.
_LABELS: dict[Status, str] = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


@dataclass(frozen=True, slots=True)
class Check:
    """One check's verdict. ``sign_in``: a failure that a fresh sign-in fixes (exit 3 rather than 1)."""

    name: str
    status: Status
    detail: str
    sign_in: bool = False


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the TLS layer of an answered request says: protocol version and the verified certificate."""

    version: str
    subject: str
    issuer: str
    not_after: float | None  # the certificate's notAfter, Unix seconds


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """An HTTP answer, whatever its status."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed_ms: float
    tls: TlsInfo | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A query's value (the other outcome of a query is the :class:`ConvexHttpError` it raised)."""

    value: Any


QueryOutcome = Answer | ConvexHttpError


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """How the sync socket's first attempt went: its first result, or the state it stopped in."""

    result: QueryResult | None
    state: ConnectionState
    state_detail: str | None
    elapsed_ms: float
    timed_out: bool


# -- verdicts: plain data in, a Check out ----------------------------------------------------------------


def _host_port(url: str) -> str:
    parsed = httpx.URL(url)
    return f"{parsed.host}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it was raised from or during (httpx wraps the socket's own error twice)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _tls_failure(url: str, exc: BaseException) -> str | None:
    """Why the TLS handshake failed, when that is what stopped the request."""
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or str(cause)
            return f"TLS certificate of {_host_port(url)} not verified: {why}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake with {_host_port(url)} failed: {getattr(cause, 'reason', None) or cause}"
    return None


def connect_failure(url: str, exc: BaseException, timeout: float) -> str:
    """Why a request to ``url`` got no HTTP answer, named as precisely as the exception allows."""
    tls = _tls_failure(url, exc)
    if tls is not None:
        return tls
    where = _host_port(url)
    for cause in _chain(exc):
        if isinstance(cause, socket.gaierror):
            return f"DNS lookup of {httpx.URL(url).host} failed ({cause.strerror or cause})"
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused by {where} (nothing listens there)"
        if isinstance(cause, httpx.ConnectTimeout):
            return f"connecting to {where} timed out after {timeout:g} s"
        if isinstance(cause, (httpx.TimeoutException, TimeoutError)):
            return f"{where} accepted the connection but sent no answer within {timeout:g} s"
        if isinstance(cause, httpx.RemoteProtocolError):
            return f"{where} answered something that is not HTTP ({cause})"
    for cause in _chain(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return f"cannot connect to {where}: {cause.strerror}"
    return f"no answer from {where}: {type(exc).__name__}: {exc}"


def reachable_verdict(url: str, probe: HttpAnswer | BaseException, timeout: float) -> Check:
    """Does the deployment answer HTTP at all? Any status counts: later checks judge the answer."""
    if isinstance(probe, BaseException):
        return Check("reachable", "fail", connect_failure(url, probe, timeout))
    return Check("reachable", "ok", f"{url} answered HTTP {probe.status} in {probe.elapsed_ms:.0f} ms")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def client_version_verdict(status: int, headers: Mapping[str, str], body: bytes) -> Check:
    """What the deployment's client-version middleware says about ``CLIENT_ID``.

    ``400 ClientVersionUnsupported`` (body ``{code, message}``) is a refusal, as is
    ``InvalidClientVersion`` (a version it cannot parse); the deprecation
    headers are a warning; anything else means it let us through. ``headers`` must be
    case-insensitive (httpx's are).
    """
    payload = _json_object(body)
    if status == 400 and payload.get("code") in REFUSED_CLIENT_CODES:
        message = payload.get("message")
        said = message if isinstance(message, str) and message else "no message"
        return Check("client_version", "fail", f"the deployment refuses {CLIENT_ID}: {said}")
    state = headers.get(DEPRECATION_STATE_HEADER)
    if state:
        message = headers.get(DEPRECATION_MESSAGE_HEADER) or "no message"
        return Check("client_version", "warn", f"{CLIENT_ID} is deprecated ({state}): {message}")
    return Check("client_version", "ok", f"{CLIENT_ID} supported")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def tls_verdict(url: str, probe: HttpAnswer | BaseException, now: float) -> Check:
    """https: the certificate verified and the TLS version. http: fine on loopback only."""
    parsed = httpx.URL(url)
    if parsed.scheme == "http":
        if _is_loopback(parsed.host):
            return Check("tls", "ok", "not used (http:// to a loopback host)")
        return Check("tls", "warn", f"not used: plain http:// to {parsed.host}, so the token travels in clear text")
    if isinstance(probe, BaseException):
        failure = _tls_failure(url, probe)
        return Check("tls", "fail", failure) if failure else Check("tls", "skip", "no connection to check")
    if probe.tls is None:
        return Check("tls", "skip", "the connection did not say how it was secured")
    info = probe.tls
    certificate = f"certificate for {info.subject} (issued by {info.issuer}) verified"
    if info.not_after is None:
        return Check("tls", "ok", f"{info.version}, {certificate}")
    until = time.strftime("%Y-%m-%d", time.gmtime(info.not_after))
    left = info.not_after - now
    if left < CERT_WARNING_SECONDS:
        return Check("tls", "warn", f"{info.version}, {certificate}, but it expires in {_duration(left)} ({until})")
    return Check("tls", "ok", f"{info.version}, {certificate}, valid until {until}")


def _duration(seconds: float) -> str:
    """``45 s``, ``4 min 59 s``, ``3 h 2 min``, ``2 d 3 h``: two units at most."""
    total = max(0, int(seconds))
    for unit, size, sub, sub_size in (("d", 86_400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if total >= size:
            rest = total % size // sub_size
            return f"{total // size} {unit} {rest} {sub}" if rest else f"{total // size} {unit}"
    return f"{total} s"


def token_verdict(*, source_error: str | None, expires_in: float | None, refusal: str | None,
                  untested: str | None) -> Check:
    """The token: present, unexpired, and accepted by the deployment.

    ``source_error`` is why the source holds no token (None: it holds one); ``expires_in`` the
    seconds until its ``exp`` (None: it has none); ``refusal`` the deployment's answer when it
    refused the token; ``untested`` why the deployment could not be asked.
    """
    if source_error is not None:
        return Check("token", "fail", f"no token, sign-in needed: {source_error}", sign_in=True)
    if expires_in is not None and expires_in <= 0:
        return Check("token", "fail", f"the token expired {_duration(-expires_in)} ago, sign-in needed", sign_in=True)
    lifetime = "expires in " + _duration(expires_in) if expires_in is not None else "has no exp claim"
    if untested is not None:
        return Check("token", "skip", f"present, {lifetime}; not tried: {untested}")
    if refusal is not None:
        return Check("token", "fail", f"refused by the deployment, sign-in needed: {refusal}", sign_in=True)
    return Check("token", "ok", f"accepted, {lifetime}")


def _failure(name: str, path: str, error: ConvexHttpError) -> Check:
    if isinstance(error, ConvexFunctionError):
        first_line = (error.error_message.splitlines() or [""])[0]
        return Check(name, "fail", f"{path} failed: {first_line}")
    return Check(name, "fail", str(error))


def lookup_verdict(outcome: QueryOutcome) -> Check:
    """``getByJobId`` for a job nobody has: null (a job object with a ``jobId`` is tolerated)."""
    name = "get_by_job_id"
    if isinstance(outcome, ConvexHttpError):
        return _failure(name, JOB_QUERY, outcome)
    value = outcome.value
    if value is None:
        return Check(name, "ok", f"{JOB_QUERY} answers null for an unknown job")
    if isinstance(value, dict) and isinstance(value.get("jobId"), str):
        return Check(name, "ok", f"{JOB_QUERY} answers a job object")
    return Check(name, "fail", f"{JOB_QUERY} answered {type(value).__name__}, not null or a job object")


def _list_problem(value: Any, statuses: frozenset[str], limit: int) -> str | None:
    """What is wrong with a ``list*Since`` answer, or None: a list of jobs in ``statuses``, at most ``limit``."""
    if not isinstance(value, list):
        return f"answered {type(value).__name__}, not a list"
    if len(value) > limit:
        return f"answered {len(value)} jobs for limit {limit}"
    for doc in value:
        if not isinstance(doc, dict) or not isinstance(doc.get("jobId"), str):
            return "answered a list holding something other than job objects with a jobId"
        if doc.get("status") not in statuses:
            return f"answered a job with status {str(doc.get('status'))[:40]!r}, not {' or '.join(sorted(statuses))}"
        if not is_finite_number(doc.get("completedAt")):
            return f"answered job {doc['jobId'][:80]!r} without a finite completedAt"
    return None


def list_verdict(name: str, path: str, outcome: QueryOutcome, statuses: frozenset[str], limit: int) -> Check:
    """A ``list*Since`` query answers a list of jobs in ``statuses`` with finite ``completedAt``."""
    if isinstance(outcome, ConvexHttpError):
        return _failure(name, path, outcome)
    problem = _list_problem(outcome.value, statuses, limit)
    if problem is not None:
        return Check(name, "fail", f"{path} {problem}")
    return Check(name, "ok", f"{path} answers a list of jobs ({len(outcome.value)} in the last hour, limit {limit})")


def page_verdict(outcome: QueryOutcome) -> Check:
    """The page query is optional: present or absent are both fine; present but odd is a warning."""
    name = "page_query"
    if isinstance(outcome, ConvexFunctionError) and MISSING_FUNCTION in outcome.error_message:
        return Check(name, "ok", f"absent: {PAGE_QUERY} does not exist (the real backend has none; "
                                 "the daemon reports gaps instead)")
    if isinstance(outcome, ConvexHttpError):
        failed = _failure(name, PAGE_QUERY, outcome)
        return Check(name, "warn", f"{failed.detail} (the daemon reports gaps instead)")
    page = outcome.value
    if (isinstance(page, dict) and isinstance(page.get("page"), list) and isinstance(page.get("isDone"), bool)
            and isinstance(page.get("continueCursor"), str)):
        return Check(name, "ok", f"present: {PAGE_QUERY} (gap-free catch-up available)")
    return Check(name, "warn", f"{PAGE_QUERY} answered {type(page).__name__}, not a page "
                               "{page, isDone, continueCursor}; the daemon reports gaps instead")


def sync_verdict(outcome: SyncOutcome, timeout: float, limit: int) -> Check:
    """The socket's first result, or the state it got stuck in."""
    name = "sync_socket"
    why = f": {outcome.state_detail}" if outcome.state_detail else ""
    result = outcome.result
    if isinstance(result, QueryValue):
        problem = _list_problem(result.value, frozenset({"succeeded"}), limit)
        if problem is not None:
            return Check(name, "fail", f"{SUCCEEDED_QUERY} on the socket {problem}")
        return Check(name, "ok", f"first result after {outcome.elapsed_ms:.0f} ms")
    if isinstance(result, QueryFailure):
        first_line = (result.error_message.splitlines() or [""])[0]
        return Check(name, "fail", f"{SUCCEEDED_QUERY} failed on the socket: {first_line}")
    if outcome.state is ConnectionState.AUTH_REQUIRED:
        return Check(name, "fail", f"the deployment refused the token on the socket{why}", sign_in=True)
    if outcome.state is ConnectionState.TOKEN_NEEDED:
        return Check(name, "fail", f"no usable token for the socket{why}", sign_in=True)
    if outcome.timed_out:
        return Check(name, "fail", f"no first result within {timeout:g} s (still {outcome.state.value}{why})")
    return Check(name, "fail", f"the socket ended before a first result{why}")


def state_folder_verdict(state: Path, findings: Sequence[Finding]) -> Check:
    """The layout's folders and files as ``run`` judges them: a refusal fails, a folder ``run`` would tighten warns."""
    name = "state_folder"
    refused = [finding for finding in findings if finding.tighten_to is None]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        return Check(name, "fail", f"{refused[0].message}{more}; the daemon refuses to start")
    if findings:
        return Check(name, "warn", "; ".join(f"{finding.path} {finding.problem}" for finding in findings)
                     + "; the daemon tightens it at start (chmod go-w)")
    return Check(name, "ok", f"{state}: no symlinks, ours, writable by nobody else")


def outputs_verdict(path: Path, free_bytes: int | None, error: str | None, needed_bytes: int) -> Check:
    """The outputs folder took a durable write; warn when it lacks room for the downloads that may run at once."""
    name = "outputs_folder"
    if error is not None:
        return Check(name, "fail", f"{path}: {error}")
    room = f"{free_bytes / 2**30:.1f} GiB free" if free_bytes is not None else "free space unknown"
    if free_bytes is not None and free_bytes < needed_bytes:
        return Check(name, "warn", f"{path} is writable but has only {free_bytes / 2**20:.0f} MiB free "
                                   f"(downloads may need {needed_bytes / 2**20:.0f} MiB at once)")
    return Check(name, "ok", f"{path} is writable ({room})")


def exit_code(checks: Sequence[Check]) -> int:
    """0 nothing failed (warnings allowed), 3 only sign-in failures, 1 anything else failed."""
    failed = [check for check in checks if check.status == "fail"]
    if not failed:
        return exits.OK
    return exits.SIGN_IN_NEEDED if all(check.sign_in for check in failed) else exits.FAILED


def render_text(checks: Sequence[Check]) -> str:
    """One aligned line per check: ``ok    reachable:      http://… answered HTTP 200 in 3 ms``."""
    width = max((len(check.name) for check in checks), default=0) + 2
    return "".join(f"{_LABELS[check.status]:<6}{check.name + ':':<{width}}{redact(check.detail)}\n"
                   for check in checks)


def render_json(checks: Sequence[Check]) -> str:
    """``{"ok", "checks": [{"name", "status", "detail"}]}`` on one line."""
    report = {
        "ok": exit_code(checks) == exits.OK,
        "checks": [{"name": check.name, "status": check.status, "detail": redact(check.detail)} for check in checks],
    }
    return json.dumps(report, ensure_ascii=False) + "\n"


# -- the edges: each gathers facts for one verdict -----------------------------------------------------------


def _tls_info(response: httpx.Response) -> TlsInfo | None:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if not isinstance(ssl_object, (ssl.SSLObject, ssl.SSLSocket)):
        return None
    certificate: dict[str, Any] = dict(ssl_object.getpeercert() or {})

    def common_name(field: str) -> str:
        for rdn in certificate.get(field, ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return "(no common name)"

    subject = common_name("subject")
    names = [str(value) for _kind, value in certificate.get("subjectAltName", ())]
    if subject == "(no common name)" and names:
        subject = names[0]
    not_after = certificate.get("notAfter")
    return TlsInfo(version=ssl_object.version() or "TLS", subject=subject, issuer=common_name("issuer"),
                   not_after=ssl.cert_time_to_seconds(not_after) if isinstance(not_after, str) else None)


async def _probe(url: str, timeout: float) -> HttpAnswer | BaseException:
    """One harmless query, as anyone without a token may send it; it goes through every /api middleware."""
    body = {"path": JOB_QUERY, "args": [{"jobId": str(uuid.uuid4())}], "format": "convex_encoded_json"}
    async with httpx.AsyncClient(timeout=timeout, headers=client_headers()) as client:
        started = time.monotonic()
        try:
            response = await client.post(f"{url}/api/query", json=body)
        except httpx.HTTPError as exc:
            return exc
        return HttpAnswer(response.status_code, response.headers, response.content,
                          (time.monotonic() - started) * 1000, _tls_info(response))


async def _query(http: ConvexHttpClient, path: str, args: dict[str, Any], token: str | None) -> QueryOutcome:
    try:
        return Answer(await http.query(path, args, token))
    except ConvexHttpError as exc:
        return exc


async def _sync_outcome(url: str, provider: TokenProvider | None, args: dict[str, Any],
                        timeout: float) -> SyncOutcome:
    """Subscribe once and wait for the first result, or for the first sign that none will come."""
    started = time.monotonic()
    async with SyncClient(url, provider, open_timeout=timeout) as client:

        async def stuck() -> None:
            """Return at the first state no first result can follow without help: refused, signed out, dropped."""
            tried = False
            async for change in client.state_changes():
                tried = tried or change.state is ConnectionState.CONNECTING
                if change.state in (ConnectionState.AUTH_REQUIRED, ConnectionState.TOKEN_NEEDED) or (
                        tried and change.state is ConnectionState.DISCONNECTED):
                    return

        subscription = client.subscribe(SUCCEEDED_QUERY, args)
        first = asyncio.ensure_future(anext(subscription))
        watcher = asyncio.ensure_future(stuck())
        done, _ = await asyncio.wait([first, watcher], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in (first, watcher):
            task.cancel()
        await asyncio.gather(first, watcher, return_exceptions=True)
        result = first.result() if first in done else None
        return SyncOutcome(result, client.state, client.state_detail, (time.monotonic() - started) * 1000,
                           timed_out=not done)


def _outputs_facts(settings: Settings) -> tuple[Path, int | None, str | None]:
    """Create the outputs folder as the daemon would and write, fsync and remove a file in it."""
    layout = settings.daemon.layout
    try:
        layout.media.mkdir(parents=True, exist_ok=True, mode=0o700)
        with OutputStore(layout.outputs) as store, store.temp_file("doctor") as probe:
            probe.write(b"materializer doctor\n")
            os.fsync(probe.fileno())
        return layout.outputs, shutil.disk_usage(layout.outputs).free, None
    except StorageError as exc:
        return layout.outputs, None, str(exc)
    except OSError as exc:
        return layout.outputs, None, f"{type(exc).__name__}: {exc.strerror or exc}"


async def run_checks(settings: Settings, url: str, provider: TokenProvider, *,
                     timeout: float = DEFAULT_TIMEOUT) -> list[Check]:
    """Every check, in order. ``url`` is the deployment; the token comes from ``provider``."""
    probe = await _probe(url, timeout)
    checks = [reachable_verdict(url, probe, timeout)]
    if isinstance(probe, HttpAnswer):
        checks.append(client_version_verdict(probe.status, probe.headers, probe.body))
    else:
        checks.append(Check("client_version", "skip", "the deployment did not answer"))
    checks.append(tls_verdict(url, probe, time.time()))
    blocked = {"fail": "the deployment refuses this client", "skip": "the deployment did not answer"}.get(
        checks[1].status)
    async with ConvexHttpClient(url, timeout=timeout) as http:
        checks += await _server_checks(url, http, provider, blocked, timeout)
    daemon = settings.daemon
    findings = await asyncio.to_thread(inspect_layout, daemon.layout, daemon.root)
    trust = state_folder_verdict(daemon.layout.state, findings)
    checks.append(trust)
    if trust.status == "fail":
        checks.append(Check("outputs_folder", "skip", "the state folder is refused"))
        return checks
    path, free, error = await asyncio.to_thread(_outputs_facts, settings)
    checks.append(outputs_verdict(path, free, error, settings.fetch.max_bytes * settings.daemon.download_concurrency))
    return checks


async def _server_checks(url: str, http: ConvexHttpClient, provider: TokenProvider, blocked: str | None,
                         timeout: float) -> list[Check]:
    """The token, the queries and the socket; without a token when it is missing, expired or refused."""
    token = await provider.get()
    timing = token_timing(token, received_at=time.time()) if token is not None else None
    expires_in = timing.expires_at - time.time() if timing is not None else None
    usable = token if token is not None and (expires_in is None or expires_in > 0) else None
    source_error = None if token is not None else provider.last_error or "the token source holds no token"
    # The lookup with the token is also the token's test: a refusal is a 401/403 before any function runs.
    lookup: QueryOutcome | None = None
    if blocked is None and usable is not None:
        lookup = await _query(http, JOB_QUERY, {"jobId": str(uuid.uuid4())}, usable)
    refusal = str(lookup) if isinstance(lookup, ConvexAuthError) else None
    token_check = token_verdict(source_error=source_error, expires_in=expires_in, refusal=refusal,
                                untested=blocked if usable is not None else None)
    if blocked is not None:
        return [token_check, *(Check(name, "skip", blocked) for name in _SERVER_CHECKS)]
    accepted = usable if refusal is None else None
    if lookup is None or refusal is not None:
        lookup = await _query(http, JOB_QUERY, {"jobId": str(uuid.uuid4())}, accepted)
    since = time.time() * 1000 - LOOKBACK_MS
    list_args = {"since": since, "limit": LIST_LIMIT}
    checks = [lookup_verdict(lookup)]
    for name, path, statuses in (("list_succeeded_since", SUCCEEDED_QUERY, {"succeeded"}),
                                 ("list_failed_since", FAILED_QUERY, {"failed", "unknown"})):
        outcome = await _query(http, path, list_args, accepted)
        checks.append(list_verdict(name, path, outcome, frozenset(statuses), LIST_LIMIT))
    page_args = {"since": since, "paginationOpts": {"numItems": 1, "cursor": None}}
    checks.append(page_verdict(await _query(http, PAGE_QUERY, page_args, accepted)))
    sync = await _sync_outcome(url, provider if accepted is not None else None, list_args, timeout)
    checks.append(sync_verdict(sync, timeout, LIST_LIMIT))
    if accepted is None:
        checks = [_without_token(check) for check in checks]
    return [token_check, *checks]


def _without_token(check: Check) -> Check:
    """Say so on a check that passed without a token: it proves the deployment, not the sign-in."""
    if check.status in ("ok", "warn"):
        return Check(check.name, check.status, f"{check.detail}; checked without a token")
    return check


def run_doctor(settings: Settings, *, as_json: bool, out: TextIO = sys.stdout, timeout: float = DEFAULT_TIMEOUT) -> int:
    """The ``doctor`` command: run the checks, print them, return the exit code (2 for a bad setup)."""
    try:
        values = settings_values(settings)
        url = convex_url(values["daemon.convex_url"])
        provider = provider_from_values(values)
    except (ConfigError, TokenSourceError) as exc:
        print(f"materializer doctor: {exc}", file=sys.stderr)
        return exits.USAGE

    async def run() -> list[Check]:
        try:
            return await run_checks(settings, url, provider, timeout=timeout)
        finally:
            await provider.aclose()

    checks = asyncio.run(run())
    out.write(render_json(checks) if as_json else render_text(checks))
    out.flush()
    return exit_code(checks)
