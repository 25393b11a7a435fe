"""Tokens as the real backend issues them, and the token endpoint the desktop app calls.

Sources: ruuxi/stella-v2 ``backend/convex/auth.ts`` (Better Auth's Convex plugin,
``DEFAULT_JWT_EXPIRATION_SECONDS = 5 * 60``) and
``packages/desktop/electron/services/auth-service.ts`` (``GET
<site>/api/auth/convex/token`` with the Better Auth session cookie, answer
``{token}``).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from materializer.jwt import unverified_claims
from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend


def lifetime(token: str) -> int:
    claims = unverified_claims(token)
    assert claims is not None
    assert isinstance(claims["iat"], int) and isinstance(claims["exp"], int)  # whole seconds, as a real JWT
    return claims["exp"] - claims["iat"]


def test_tokens_live_five_minutes_by_default(backend: DevBackend) -> None:
    """backend/convex/auth.ts DEFAULT_JWT_EXPIRATION_SECONDS = 5 * 60, for the ready line's token too."""
    assert lifetime(backend.token) == 300
    assert lifetime(backend.fetch_token()) == 300


def test_token_ttl_still_sets_the_lifetime(tmp_path: Path) -> None:
    with DevBackend.start(tmp_path / "b", token_ttl=42.5) as backend:
        assert lifetime(backend.token) == 43
        assert lifetime(backend.fetch_token()) == 43


def test_the_session_cookie_fetches_a_token_that_works(backend: DevBackend) -> None:
    """auth-service.ts getConvexAuthToken: GET /api/auth/convex/token with the cookie, answer {token}."""
    answer = httpx.get(backend.token_url, headers=backend.session_headers())
    assert answer.status_code == 200 and set(answer.json()) == {"token"}
    token = answer.json()["token"]
    claims = unverified_claims(token)
    assert claims is not None and claims["sub"] == "demo-user"
    assert backend.query("media_jobs:listSucceededSince", {"since": 0}, token).status_code == 200
    admin = httpx.get(backend.token_url, headers={"X-Dev-Admin-Key": backend.admin_key})
    assert admin.status_code == 200 and admin.json()["token"]


@pytest.mark.parametrize("headers", [
    {},
    {"Cookie": "better-auth.session_token=wrong"},
    {"Cookie": "session_token=SECRET"},  # not Better Auth's cookie name
    {"Authorization": "Bearer SECRET"},  # Better Auth's bearer plugin is not enabled (backend/convex/auth.ts)
    {"X-Dev-Admin-Key": "wrong"},
])
def test_without_the_session_the_endpoint_answers_401(backend: DevBackend, headers: dict[str, str]) -> None:
    """Better Auth's sessionMiddleware throws APIError("UNAUTHORIZED") before the Convex plugin mints a token."""
    secret = backend.session_secret
    sent = {key: value.replace("SECRET", secret) for key, value in headers.items()}
    refused = httpx.get(backend.token_url, headers=sent)
    assert refused.status_code == 401 and refused.json() == {"code": "UNAUTHORIZED"}


@pytest.fixture
def bearer(tmp_path: Path) -> Iterator[DevBackend]:
    with DevBackend.start(tmp_path / "bearer", extensions=["bearer-session"]) as backend:
        yield backend


def test_bearer_session_is_an_extension(bearer: DevBackend) -> None:
    """Only with --extension bearer-session does 'Authorization: Bearer <session secret>' stand for the cookie."""
    answer = httpx.get(bearer.token_url, headers={"Authorization": f"Bearer {bearer.session_secret}"})
    assert answer.status_code == 200 and lifetime(answer.json()["token"]) == 300
    assert httpx.get(bearer.token_url, headers={"Authorization": "Bearer nope"}).status_code == 401


def test_the_session_secret_is_a_private_file_that_survives_restarts(backend: DevBackend) -> None:
    secret = backend.session_secret
    assert len(secret) >= 32
    assert stat.S_IMODE(os.stat(backend.session_secret_path).st_mode) == 0o600
    backend.restart()
    assert backend.session_secret == secret
    assert backend.fetch_token()


def test_the_ready_line_names_the_token_endpoint_and_the_secret_file(tmp_path: Path) -> None:
    process = forkserver.Popen([sys.executable, "-m", "stella_devbackend", "--data", str(tmp_path / "d")],
                               stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        ready = json.loads(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(timeout=15)
        assert process.stdout is not None
        process.stdout.close()
    assert ready["token_url"] == ready["url"] + "/api/auth/convex/token"
    assert ready["session_secret_file"] == str(tmp_path / "d" / "session-secret")
    assert lifetime(ready["token"]) == 300
