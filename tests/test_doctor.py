"""``materializer doctor``: its verdicts on plain data, and the command against real deployments on loopback.

The good deployment is the local backend; the broken ones are small aiohttp
servers that answer the way a broken real deployment does (a refused client
version, missing functions, a refused socket upgrade, TLS it cannot verify).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from materializer.config import Settings
from materializer.convex.http import ConvexFunctionError, ConvexHttpError
from materializer.convex.identity import CLIENT_ID
from materializer.convex.protocol import QueryFailure, QueryValue
from materializer.convex.transport import ConnectionState
from materializer.doctor import (
    Answer,
    Check,
    HttpAnswer,
    SyncOutcome,
    TlsInfo,
    client_version_verdict,
    connect_failure,
    exit_code,
    list_verdict,
    lookup_verdict,
    outputs_verdict,
    page_verdict,
    reachable_verdict,
    render_json,
    render_text,
    run_checks,
    sync_verdict,
    tls_verdict,
    token_verdict,
)
from materializer.tokens import StaticTokenProvider
from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend
from stella_devbackend.jwt import sign_hs256

NAMES = ["reachable", "client_version", "tls", "token", "get_by_job_id", "list_succeeded_since",
         "list_failed_since", "page_query", "sync_socket", "state_folder", "outputs_folder"]
UNSUPPORTED_MESSAGE = ("The Convex npm package at version 0.1.0 is no longer supported. Update your Convex npm "
                       "version with `npx convex update` or `npm update`.")
MISSING = ("Could not find public function for '{path}'. Did you forget to run `npx convex dev` or "
           "`npx convex deploy`?")
FAR_FUTURE = time.time() + 400 * 86_400
SUCCEEDED, FAILED = frozenset({"succeeded"}), frozenset({"failed", "unknown"})


# -- verdicts on plain data ----------------------------------------------------------------------------------


def test_client_version_refused_deprecated_or_supported() -> None:
    body = json.dumps({"code": "ClientVersionUnsupported", "message": UNSUPPORTED_MESSAGE}).encode()
    refused = client_version_verdict(400, httpx.Headers(), body)
    assert refused.status == "fail" and UNSUPPORTED_MESSAGE in refused.detail and CLIENT_ID in refused.detail
    headers = httpx.Headers({"X-Convex-Deprecation-State": "Deprecated",
                             "X-Convex-Deprecation-Message": "Upgrade within 30 days."})
    deprecated = client_version_verdict(200, headers, b'{"status": "success", "value": null}')
    assert deprecated.status == "warn" and "Deprecated" in deprecated.detail and "30 days" in deprecated.detail
    assert client_version_verdict(200, httpx.Headers(), b"{}") == Check("client_version", "ok",
                                                                        f"{CLIENT_ID} supported")
    unparseable = json.dumps({"code": "InvalidClientVersion", "message": "Invalid client version"}).encode()
    assert client_version_verdict(400, httpx.Headers(), unparseable).status == "fail"
    other_400 = client_version_verdict(400, httpx.Headers(), b'{"code": "BadJsonBody", "message": "no"}')
    assert other_400.status == "ok"
    assert client_version_verdict(400, httpx.Headers(), b"<html>").status == "ok"


def _raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` raised from ``inner``, as httpx wraps the socket's own error."""
    try:
        try:
            raise inner
        except BaseException as cause:
            raise outer from cause
    except BaseException as exc:
        return exc


def test_connection_failures_are_named_precisely() -> None:
    url = "http://deploy.example:8000"
    dns = _raised_from(httpx.ConnectError("x"), socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert connect_failure(url, dns, 10) == "DNS lookup of deploy.example failed (Name or service not known)"
    refused = _raised_from(httpx.ConnectError("All connection attempts failed"),
                           _raised_from(OSError("All connection attempts failed"), ConnectionRefusedError(111, "x")))
    assert connect_failure(url, refused, 10) == "connection refused by deploy.example:8000 (nothing listens there)"
    timed_out = connect_failure(url, httpx.ConnectTimeout("t"), 2.5)
    assert timed_out == "connecting to deploy.example:8000 timed out after 2.5 s"
    assert "sent no answer within 10 s" in connect_failure(url, httpx.ReadTimeout("t"), 10)
    unverified = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unverified.verify_message = "self-signed certificate"
    tls = connect_failure("https://deploy.example", _raised_from(httpx.ConnectError("x"), unverified), 10)
    assert tls == "TLS certificate of deploy.example:443 not verified: self-signed certificate"
    unreachable = _raised_from(httpx.ConnectError("x"), OSError(101, "Network is unreachable"))
    assert connect_failure(url, unreachable, 10) == "cannot connect to deploy.example:8000: Network is unreachable"
    failed = reachable_verdict(url, refused, 10)
    assert failed.status == "fail" and "connection refused" in failed.detail
    answered = reachable_verdict(url, HttpAnswer(404, httpx.Headers(), b"", 3.2), 10)
    assert answered == Check("reachable", "ok", f"{url} answered HTTP 404 in 3 ms")


def test_tls_verdicts() -> None:
    now = time.time()
    plain = HttpAnswer(200, httpx.Headers(), b"", 1)
    assert tls_verdict("http://127.0.0.1:3210", plain, now).status == "ok"
    assert tls_verdict("http://[::1]:3210", plain, now).status == "ok"
    assert tls_verdict("http://localhost:3210", plain, now).status == "ok"
    clear = tls_verdict("http://10.0.0.5:3210", plain, now)
    assert clear.status == "warn" and "clear text" in clear.detail
    info = TlsInfo("TLSv1.3", "deploy.example", "Some CA", now + 90 * 86_400)
    secured = tls_verdict("https://deploy.example", HttpAnswer(200, httpx.Headers(), b"", 1, info), now)
    assert secured.status == "ok" and "TLSv1.3" in secured.detail and "deploy.example" in secured.detail
    expiring = TlsInfo("TLSv1.2", "deploy.example", "Some CA", now + 3 * 86_400)
    soon = tls_verdict("https://deploy.example", HttpAnswer(200, httpx.Headers(), b"", 1, expiring), now)
    assert soon.status == "warn" and "expires in 3 d" in soon.detail
    unverified = _raised_from(httpx.ConnectError("x"), ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert tls_verdict("https://deploy.example", unverified, now).status == "fail"
    assert tls_verdict("https://deploy.example", httpx.ConnectTimeout("t"), now).status == "skip"


def test_token_verdicts() -> None:
    missing = token_verdict(source_error="environment variable STELLA_TOKEN is unset or empty", expires_in=None,
                            refusal=None, untested=None)
    assert missing.status == "fail" and missing.sign_in and "STELLA_TOKEN" in missing.detail
    expired = token_verdict(source_error=None, expires_in=-125, refusal=None, untested=None)
    assert expired.status == "fail" and expired.sign_in and "expired 2 min 5 s ago" in expired.detail
    refused = token_verdict(source_error=None, expires_in=200, refusal="HTTP 401: bad signature", untested=None)
    assert refused.status == "fail" and refused.sign_in and "bad signature" in refused.detail
    untested = token_verdict(source_error=None, expires_in=299, refusal=None, untested="the deployment did not answer")
    assert untested.status == "skip" and "expires in 4 min 59 s" in untested.detail
    assert token_verdict(source_error=None, expires_in=3 * 3600 + 120, refusal=None, untested=None) == Check(
        "token", "ok", "accepted, expires in 3 h 2 min")
    assert token_verdict(source_error=None, expires_in=None, refusal=None, untested=None).detail == \
        "accepted, has no exp claim"


def _job(status: str = "succeeded", **fields: Any) -> dict[str, Any]:
    return {"jobId": "5d0c", "status": status, "completedAt": 1.7e12, **fields}


def test_query_shape_verdicts() -> None:
    assert lookup_verdict(Answer(None)).status == "ok"
    assert lookup_verdict(Answer(_job())).status == "ok"
    assert lookup_verdict(Answer([])).status == "fail"
    missing = lookup_verdict(ConvexFunctionError(MISSING.format(path="media_jobs:getByJobId") + "\nmore"))
    assert missing.status == "fail" and missing.detail.startswith("media_jobs:getByJobId failed: Could not find")
    assert "more" not in missing.detail
    assert lookup_verdict(ConvexHttpError("media_jobs:getByJobId: HTTP 500")).detail == \
        "media_jobs:getByJobId: HTTP 500"

    def listed(value: Any, statuses: frozenset[str] = SUCCEEDED) -> Check:
        return list_verdict("list_succeeded_since", "media_jobs:listSucceededSince", Answer(value), statuses, 1)

    assert listed([]).status == "ok" and listed([_job()]).status == "ok"
    assert listed([_job("unknown")], FAILED).status == "ok" and listed([_job("failed")], FAILED).status == "ok"
    assert "not a list" in listed({"page": []}).detail
    assert "status 'failed'" in listed([_job("failed")]).detail
    assert "finite completedAt" in listed([_job(completedAt=math.inf)]).detail
    assert "finite completedAt" in listed([_job(completedAt=True)]).detail
    assert "finite completedAt" in listed([{"jobId": "x", "status": "succeeded"}]).detail
    assert "2 jobs for limit 1" in listed([_job(), _job()]).detail
    assert "job objects" in listed([["not", "a", "job"]]).detail


def test_page_query_present_absent_or_odd() -> None:
    present = page_verdict(Answer({"page": [], "isDone": True, "continueCursor": ""}))
    assert present.status == "ok" and present.detail.startswith("present")
    absent = page_verdict(ConvexFunctionError(MISSING.format(path="media_jobs:listSucceededPage")))
    assert absent.status == "ok" and absent.detail.startswith("absent")
    assert page_verdict(ConvexFunctionError("ArgumentValidationError: extra field")).status == "warn"
    assert page_verdict(Answer([])).status == "warn"


def test_sync_verdicts() -> None:
    def outcome(result: Any = None, state: ConnectionState = ConnectionState.CONNECTING, detail: str | None = None,
                timed_out: bool = False) -> SyncOutcome:
        return SyncOutcome(result, state, detail, 42.4, timed_out)

    value = QueryValue(0, "media_jobs:listSucceededSince", {}, [])
    assert sync_verdict(outcome(value, ConnectionState.CONNECTED), 10, 1) == Check(
        "sync_socket", "ok", "first result after 42 ms")
    assert sync_verdict(outcome(QueryValue(0, "q", {}, {"x": 1})), 10, 1).status == "fail"
    failure = sync_verdict(outcome(QueryFailure(0, "q", {}, "Uncaught Error: boom\nat x")), 10, 1)
    assert failure.status == "fail" and failure.detail.endswith("boom")
    refused = "HTTP 400 ClientVersionUnsupported: " + UNSUPPORTED_MESSAGE
    upgrade = sync_verdict(outcome(state=ConnectionState.DISCONNECTED, detail=refused), 10, 1)
    assert upgrade.status == "fail" and not upgrade.sign_in and refused in upgrade.detail
    auth = sync_verdict(outcome(state=ConnectionState.AUTH_REQUIRED, detail="the server refused the token"), 10, 1)
    assert auth.status == "fail" and auth.sign_in
    assert sync_verdict(outcome(state=ConnectionState.TOKEN_NEEDED), 10, 1).sign_in
    slow = sync_verdict(outcome(timed_out=True), 2, 1)
    assert slow.status == "fail" and "within 2 s (still connecting)" in slow.detail


def test_outputs_verdicts(tmp_path: Path) -> None:
    assert outputs_verdict(tmp_path, 5 * 2**30, None, 2**28).detail == f"{tmp_path} is writable (5.0 GiB free)"
    low = outputs_verdict(tmp_path, 2**20, None, 2**28)
    assert low.status == "warn" and "1 MiB free" in low.detail
    assert outputs_verdict(tmp_path, None, "NotADirectoryError: Not a directory", 1).status == "fail"


def test_exit_codes_and_rendering() -> None:
    ok, warn = Check("reachable", "ok", "fine"), Check("tls", "warn", "clear text")
    sign_in, broken = Check("token", "fail", "expired", sign_in=True), Check("get_by_job_id", "fail", "missing")
    assert exit_code([ok, warn, Check("page_query", "skip", "x")]) == 0
    assert exit_code([ok, sign_in]) == 3
    assert exit_code([ok, sign_in, broken]) == 1
    token = sign_hs256({"sub": "u", "exp": FAR_FUTURE}, b"secret")
    text = render_text([ok, warn, Check("get_by_job_id", "fail", f"server said: {token}")])
    assert text.splitlines() == ["ok    reachable:     fine", "WARN  tls:           clear text",
                                 "FAIL  get_by_job_id: server said: [redacted]"]
    report = json.loads(render_json([ok, sign_in]))
    assert report == {"ok": False, "checks": [{"name": "reachable", "status": "ok", "detail": "fine"},
                                              {"name": "token", "status": "fail", "detail": "expired"}]}


# -- the command against real deployments -------------------------------------------------------------------


def doctor(*args: str, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (),
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``materializer doctor`` as a process, with no token or state folder leaking in from this environment."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MATERIALIZER_") and k not in ("STELLA_TOKEN", "STELLA_DATA_DIR", "SSL_CERT_FILE")}
    return forkserver.run([sys.executable, "-m", "materializer", "doctor", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, "XDG_CONFIG_HOME": "/nonexistent", **(env or {})},
                          stdin=subprocess.DEVNULL, pass_fds=pass_fds)


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """name -> (label, detail), from the text output."""
    parsed = {}
    for line in result.stdout.splitlines():
        label, rest = line[:6].strip(), line[6:]
        name, _, detail = rest.partition(":")
        parsed[name] = (label, detail.strip())
    assert list(parsed) == NAMES, result.stdout
    return parsed


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    return path


def test_good_backend_every_check_ok(backend: DevBackend, tmp_path: Path) -> None:
    result = doctor("--convex-url", backend.url, "--token-file", str(token_file(tmp_path, backend.token)),
                    "--root", str(tmp_path / "root"))
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines(result)
    assert all(label == "ok" for label, _ in checks.values()), result.stdout
    assert checks["page_query"][1].startswith("absent")
    assert checks["token"][1].startswith("accepted, expires in")
    assert checks["outputs_folder"][1].startswith(f"{tmp_path / 'root' / 'state' / 'media' / 'outputs'} is writable")
    assert (tmp_path / "root/state/media").stat().st_mode & 0o777 == 0o700
    assert os.listdir(tmp_path / "root/state/media/outputs") == []
    # Every detail starts in the same column.
    starts = {len(line) - len(line[6:].split(":", 1)[1].lstrip()) for line in result.stdout.splitlines()}
    assert len(starts) == 1


def test_page_query_present(paging_backend: DevBackend, tmp_path: Path) -> None:
    result = doctor("--convex-url", paging_backend.url, "--token-file", str(token_file(tmp_path, paging_backend.token)),
                    "--root", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result)["page_query"] == ("ok", "present: media_jobs:listSucceededPage (gap-free catch-up available)")


def test_json_report_and_no_token_in_any_output(backend: DevBackend, tmp_path: Path) -> None:
    state = tmp_path / "desktop-state"
    result = doctor("--json", "--log-level", "debug", "--convex-url", backend.url, "--root", str(tmp_path),
                    "--state-dir", str(state), env={"STELLA_TOKEN": backend.token})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and [check["name"] for check in report["checks"]] == NAMES
    assert all(set(check) == {"name", "status", "detail"} and check["status"] == "ok" for check in report["checks"])
    assert str(state / "media" / "outputs") in report["checks"][-1]["detail"]
    assert backend.token not in result.stdout + result.stderr
    assert result.stderr  # debug logging did run


def test_token_from_a_pipe(backend: DevBackend, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, backend.token.encode() + b"\n")
        os.close(write_end)
        result = doctor("--convex-url", backend.url, "--token-fd", str(read_end), "--root", str(tmp_path),
                        pass_fds=(read_end,))
    finally:
        os.close(read_end)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result)["token"][1].startswith("accepted")
    assert backend.token not in result.stdout + result.stderr


def test_expired_refused_or_missing_token_means_sign_in(backend: DevBackend, tmp_path: Path) -> None:
    expired = backend.mint_token("demo-user", -30)
    now = int(time.time())
    foreign = sign_hs256({"iss": "stella-dev-backend", "sub": "demo-user", "iat": now, "exp": now + 300},
                         b"not the backend's secret")
    for token, says in ((expired, "expired"), (foreign, "refused by the deployment")):
        result = doctor("--convex-url", backend.url, "--token-file", str(token_file(tmp_path, token)),
                        "--root", str(tmp_path))
        assert result.returncode == 3, result.stdout + result.stderr
        checks = lines(result)
        assert checks["token"][0] == "FAIL" and says in checks["token"][1]
        assert token not in result.stdout + result.stderr
        # The rest of the deployment is fine, and says it was checked without the token.
        for name in NAMES[4:9]:
            assert checks[name][0] == "ok" and checks[name][1].endswith("; checked without a token"), result.stdout
    missing = doctor("--convex-url", backend.url, "--root", str(tmp_path), "--json")
    assert missing.returncode == 3
    token_check = json.loads(missing.stdout)["checks"][3]
    assert token_check["status"] == "fail" and "STELLA_TOKEN" in token_check["detail"]


class FakeDeployment:
    """An aiohttp server on loopback, in its own thread, answering every request with ``handler``."""

    def __init__(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.url = ""

    def __enter__(self) -> FakeDeployment:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        listener = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(self._runner, listener, ssl_context=self._ssl).start()
        self.url = f"{'https' if self._ssl else 'http'}://127.0.0.1:{listener.getsockname()[1]}"

    def __exit__(self, *_exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


def _unsupported() -> web.Response:
    return web.json_response({"code": "ClientVersionUnsupported", "message": UNSUPPORTED_MESSAGE}, status=400)


async def _refuses_every_client(_request: web.Request) -> web.StreamResponse:
    return _unsupported()


async def _has_no_functions(request: web.Request) -> web.StreamResponse:
    if request.path == "/api/query":
        path = (await request.json())["path"]
        return web.json_response({"status": "error", "errorMessage": MISSING.format(path=path), "logLines": []})
    return web.json_response({"code": "NotFound", "message": "no such route"}, status=404)


async def _queries_but_no_socket(request: web.Request) -> web.StreamResponse:
    """Queries answer like an empty real backend; the socket upgrade is refused."""
    if request.path != "/api/query":
        return _unsupported()
    path = (await request.json())["path"]
    if path.endswith("Since"):
        return web.json_response({"status": "success", "value": [], "logLines": []})
    if path.endswith("getByJobId"):
        return web.json_response({"status": "success", "value": None, "logLines": []})
    return web.json_response({"status": "error", "errorMessage": MISSING.format(path=path), "logLines": []})


@pytest.fixture
def live_token(tmp_path: Path) -> Path:
    """A token file holding a token that will not expire during the test (fakes do not check signatures)."""
    now = int(time.time())
    return token_file(tmp_path, sign_hs256({"sub": "demo-user", "iat": now, "exp": now + 300}, b"fake"))


def test_deployment_that_refuses_this_client_version(tmp_path: Path, live_token: Path) -> None:
    with FakeDeployment(_refuses_every_client) as fake:
        result = doctor("--convex-url", fake.url, "--token-file", str(live_token), "--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    checks = lines(result)
    assert checks["reachable"][0] == "ok" and "HTTP 400" in checks["reachable"][1]
    assert checks["client_version"] == ("FAIL", f"the deployment refuses {CLIENT_ID}: {UNSUPPORTED_MESSAGE}")
    assert checks["token"][0] == "skip" and "refuses this client" in checks["token"][1]
    assert {checks[name][0] for name in NAMES[4:9]} == {"skip"}
    assert checks["outputs_folder"][0] == "ok"


def test_deployment_without_the_media_functions(tmp_path: Path, live_token: Path) -> None:
    with FakeDeployment(_has_no_functions) as fake:
        result = doctor("--convex-url", fake.url, "--token-file", str(live_token), "--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    checks = lines(result)
    for name, path in (("get_by_job_id", "getByJobId"), ("list_succeeded_since", "listSucceededSince"),
                       ("list_failed_since", "listFailedSince")):
        assert checks[name] == ("FAIL", f"media_jobs:{path} failed: " + MISSING.format(path=f"media_jobs:{path}"))
    assert checks["page_query"][0] == "ok" and checks["page_query"][1].startswith("absent")
    assert checks["sync_socket"][0] == "FAIL" and "HTTP 404" in checks["sync_socket"][1]


def test_refused_socket_upgrade_names_the_servers_answer(tmp_path: Path, live_token: Path) -> None:
    with FakeDeployment(_queries_but_no_socket) as fake:
        result = doctor("--convex-url", fake.url, "--token-file", str(live_token), "--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    checks = lines(result)
    assert [checks[name][0] for name in NAMES[:8]] == ["ok"] * 8, result.stdout
    assert checks["sync_socket"] == (
        "FAIL", f"the socket ended before a first result: HTTP 400 ClientVersionUnsupported: {UNSUPPORTED_MESSAGE}")


def test_unreachable_port(tmp_path: Path) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    result = doctor("--convex-url", f"http://127.0.0.1:{port}", "--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    checks = lines(result)
    assert checks["reachable"] == ("FAIL", f"connection refused by 127.0.0.1:{port} (nothing listens there)")
    assert checks["client_version"][0] == "skip" and checks["tls"][0] == "ok"
    assert checks["token"][0] == "FAIL"
    assert {checks[name][0] for name in NAMES[4:9]} == {"skip"}
    assert checks["outputs_folder"][0] == "ok"


async def test_silent_server_times_out(tmp_path: Path) -> None:
    """A server that takes the connection and never answers: the doctor gives up after its timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = Settings.model_validate({"daemon": {"root": tmp_path, "convex_url": url}})
        checks = await run_checks(settings, url, StaticTokenProvider("not-a-real-token"), timeout=0.5)
    assert checks[0] == Check("reachable", "fail", f"127.0.0.1:{url.rsplit(':', 1)[1]} accepted the connection "
                                                   "but sent no answer within 0.5 s")
    assert [check.status for check in checks[4:9]] == ["skip"] * 5


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for 127.0.0.1, made with the openssl command."""
    ca_key, ca, key, csr, cert, ext = (tmp_path / name for name in
                                       ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "server.ext"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "30", "-subj", "/CN=Doctor CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "30", "-extfile", str(ext))
    return ca, cert, key


def test_https_certificate_verified_or_not(tmp_path: Path, certificates: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certificates
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with FakeDeployment(_queries_but_no_socket, context) as fake:
        trusted = doctor("--convex-url", fake.url, "--root", str(tmp_path), env={"SSL_CERT_FILE": str(ca)})
        untrusted = doctor("--convex-url", fake.url, "--root", str(tmp_path))
    verified = lines(trusted)
    assert verified["reachable"][0] == "ok"
    label, detail = verified["tls"]
    assert label == "ok" and detail.startswith("TLSv1.")
    assert "certificate for 127.0.0.1 (issued by Doctor CA) verified" in detail
    refused = lines(untrusted)
    assert refused["reachable"][0] == "FAIL" and "not verified" in refused["reachable"][1]
    assert refused["tls"][0] == "FAIL" and "not verified" in refused["tls"][1]
    assert untrusted.returncode == 1


def test_outputs_folder_that_cannot_be_created(backend: DevBackend, tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state folder should be")
    result = doctor("--convex-url", backend.url, "--token-file", str(token_file(tmp_path, backend.token)),
                    "--root", str(tmp_path))
    assert result.returncode == 1
    checks = lines(result)
    assert checks["state_folder"] == ("FAIL", f"{blocker} is not a folder; move it away; the daemon creates its own "
                                              "folder there; the daemon refuses to start")
    assert checks["outputs_folder"] == ("skip", "the state folder is refused")


def test_usage_and_configuration_errors(tmp_path: Path) -> None:
    no_url = doctor("--root", str(tmp_path))
    assert no_url.returncode == 2 and "convex_url" in no_url.stderr and no_url.stdout == ""
    closed_fd = doctor("--convex-url", "http://127.0.0.1:9", "--token-fd", "87", "--root", str(tmp_path))
    assert closed_fd.returncode == 2 and "file descriptor 87" in closed_fd.stderr
    bad = doctor("--convex-url", "ftp://example", "--root", str(tmp_path))
    assert bad.returncode == 2 and "daemon.convex_url" in bad.stderr
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\nconvex_urll = 'http://127.0.0.1:9'\n")
    assert doctor("--config", str(config), "--root", str(tmp_path)).returncode == 2
    assert doctor("--no-such-flag").returncode == 2
