"""One-shot HTTP queries against the local backend, and against a server that answers badly on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from materializer import __version__
from materializer.convex.http import ConvexAuthError, ConvexFunctionError, ConvexHttpClient, ConvexHttpError
from materializer.convex.values import ConvexValueError, Int64, from_convex_json
from stella_devbackend.control import DevBackend

LIST = "media_jobs:listSucceededSince"


async def test_query_returns_the_decoded_value(backend: DevBackend) -> None:
    [job] = await asyncio.to_thread(backend.create_jobs, count=1, images=2)
    async with ConvexHttpClient(backend.url) as client:
        jobs = await client.query(LIST, {"since": 0, "limit": 10}, backend.token)
        raw = (await asyncio.to_thread(backend.query, LIST, {"since": 0, "limit": 10})).json()["value"]
        assert jobs == from_convex_json(raw)
        assert [j["jobId"] for j in jobs] == [job] and len(jobs[0]["output"]["images"]) == 2
        assert await client.query("media_jobs:getByJobId", {"jobId": job}, backend.token) == jobs[0]
        other = await asyncio.to_thread(backend.mint_token, "someone-else")
        assert await client.query("media_jobs:getByJobId", {"jobId": job}, other) is None
        assert await client.query(LIST, {"since": 0}, None) == []  # no identity: no jobs


async def test_function_error_is_typed(backend: DevBackend) -> None:
    async with ConvexHttpClient(backend.url) as client:
        with pytest.raises(ConvexFunctionError, match="ArgumentValidationError") as caught:
            await client.query(LIST, {"since": "yesterday"}, backend.token)
        assert caught.value.error_data is None


@pytest.mark.parametrize("kind", ["garbage", "expired"])
async def test_refused_token_is_an_auth_error_that_does_not_quote_it(backend: DevBackend, kind: str) -> None:
    token = "garbage" if kind == "garbage" else await asyncio.to_thread(backend.mint_token, "demo-user", -5)
    async with ConvexHttpClient(backend.url) as client:
        with pytest.raises(ConvexAuthError) as caught:
            await client.query(LIST, {"since": 0}, token)
    assert caught.value.status == 401
    assert token not in str(caught.value)


async def test_unreachable_deployment_is_a_clear_error(unused_tcp_port: int) -> None:
    async with ConvexHttpClient(f"http://127.0.0.1:{unused_tcp_port}") as client:
        with pytest.raises(ConvexHttpError, match="POST .*/api/query failed: ConnectError"):
            await client.query(LIST, {"since": 0}, None)


def test_bad_url_and_args_are_refused_before_any_request() -> None:
    with pytest.raises(ValueError, match="http"):
        ConvexHttpClient("ftp://example.com")


async def test_args_must_be_a_convex_object() -> None:
    async with ConvexHttpClient("http://127.0.0.1:9") as client:
        with pytest.raises(ConvexValueError):
            await client.query(LIST, ["since"], None)  # type: ignore[arg-type]
        with pytest.raises(ConvexValueError):
            await client.query(LIST, {"since": object()}, None)


# -- a server that answers as told ---------------------------------------------------------------------------


Answer = Callable[[], web.Response]


@pytest.fixture
async def crafted() -> AsyncIterator[tuple[str, list[Answer], list[dict[str, Any]]]]:
    """An HTTP server on loopback that answers each request with the next queued answer and records requests."""
    answers: list[Answer] = []
    requests: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        requests.append({"path": request.path, "headers": dict(request.headers), "body": await request.json()})
        return answers.pop(0)()

    app = web.Application()
    app.router.add_post("/api/query", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", answers, requests
    await runner.cleanup()


async def test_request_shape(crafted: tuple[str, list[Answer], list[dict[str, Any]]]) -> None:
    url, answers, requests = crafted
    answers.append(lambda: web.json_response({"status": "success", "value": {"$integer": "BwAAAAAAAAA="},
                                              "logLines": []}))
    async with ConvexHttpClient(url + "/") as client:
        value = await client.query("media_jobs:getByJobId", {"jobId": "job_1", "n": 3}, "the-token")
    assert value == 7 and isinstance(value, Int64)
    [request] = requests
    assert request["body"] == {"path": "media_jobs:getByJobId", "args": [{"jobId": "job_1", "n": 3.0}],
                               "format": "convex_encoded_json"}
    assert request["headers"]["Authorization"] == "Bearer the-token"
    assert request["headers"]["Convex-Client"] == f"stella-materializer-{__version__}"


async def test_function_error_carries_error_data(crafted: tuple[str, list[Answer], list[dict[str, Any]]]) -> None:
    url, answers, requests = crafted
    answers.append(lambda: web.json_response(
        {"status": "error", "errorMessage": "Uncaught ConvexError: nope", "errorData": {"code": {"$integer":
                                                                                                  "AQAAAAAAAAA="}}},
        status=560))
    async with ConvexHttpClient(url) as client:
        with pytest.raises(ConvexFunctionError) as caught:
            await client.query("m:f", {}, None)
    assert caught.value.error_message == "Uncaught ConvexError: nope"
    assert caught.value.error_data == {"code": Int64(1)}
    assert "Authorization" not in requests[0]["headers"]


@pytest.mark.parametrize("status", [200, 560])
async def test_an_error_answer_is_a_function_error_at_200_and_560(
        crafted: tuple[str, list[Answer], list[dict[str, Any]]], status: int) -> None:
    """The open-source backend answers a thrown or missing function with HTTP 200 and status "error"
    (get-convex/convex-backend crates/local_backend/src/public_api.rs, public_query_post); the JS client
    also takes 560 (get-convex/convex-js src/browser/http_client.ts, STATUS_CODE_UDF_FAILED)."""
    url, answers, _ = crafted
    answers.append(lambda: web.json_response(
        {"status": "error", "errorMessage": "Could not find public function for 'media_jobs:nope'.",
         "logLines": []}, status=status))
    async with ConvexHttpClient(url) as client:
        with pytest.raises(ConvexFunctionError, match="Could not find public function"):
            await client.query("media_jobs:nope", {}, None)


async def test_a_refused_client_version_names_the_code_and_the_message(
        crafted: tuple[str, list[Answer], list[dict[str, Any]]], caplog: pytest.LogCaptureFixture) -> None:
    """Mirrors client_version_state_middleware (convex-backend crates/common/src/http/mod.rs): 400 with
    {code, message} and the deprecation headers (crates/convex/sync_types/src/headers.rs), logged once."""
    url, answers, _ = crafted
    message = "The Convex npm package at version 0.1.0 is no longer supported."
    refusal = {"code": "ClientVersionUnsupported", "message": message}
    headers = {"x-convex-deprecation-state": "Unsupported", "x-convex-deprecation-message": message}
    answers.extend([lambda: web.json_response(refusal, status=400, headers=headers)] * 2)
    caplog.set_level("WARNING", logger="materializer.convex")
    async with ConvexHttpClient(url) as client:
        for _ in range(2):
            with pytest.raises(ConvexHttpError, match=f"HTTP 400: ClientVersionUnsupported: {message}"):
                await client.query(LIST, {"since": 0}, None)
    notes = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert notes == [f"the Convex deployment says this client is deprecated (Unsupported: {message})"]


BAD_ANSWERS: dict[str, tuple[Answer, type[Exception], str]] = {
    "forbidden": (lambda: web.json_response({"code": "Forbidden", "message": "no access"}, status=403),
                  ConvexAuthError, r"refused the token \(HTTP 403\): Forbidden: no access"),
    "bad-request": (lambda: web.json_response({"code": "BadJsonBody", "message": "args: nope"}, status=400),
                    ConvexHttpError, "HTTP 400: BadJsonBody: args: nope"),
    "bad-gateway-html": (lambda: web.Response(status=502, text="<html>Bad Gateway</html>"),
                         ConvexHttpError, "HTTP 502: <html>Bad Gateway</html>"),
    "not-json": (lambda: web.Response(status=200, text="{"), ConvexHttpError, "is not {status: 'success', value}"),
    "no-value": (lambda: web.json_response({"status": "success"}), ConvexHttpError, "is not {status"),
    "bad-value": (lambda: web.json_response({"status": "success", "value": {"$integer": 5}}), ConvexHttpError,
                  "not Convex JSON"),
    "560-no-message": (lambda: web.json_response({"status": "error"}, status=560), ConvexHttpError,
                       "has no errorMessage"),
    "560-bad-data": (lambda: web.json_response({"status": "error", "errorMessage": "x", "errorData": {"$x": 1}},
                                               status=560), ConvexHttpError, "errorData is not Convex JSON"),
    "560-not-convex": (lambda: web.Response(status=560, text="upstream says no"), ConvexHttpError,
                       "HTTP 560: upstream says no"),
}


@pytest.mark.parametrize("case", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
async def test_bad_answers_raise_clear_errors(crafted: tuple[str, list[Answer], list[dict[str, Any]]],
                                              case: tuple[Answer, type[Exception], str]) -> None:
    url, answers, _ = crafted
    answer, error, message = case
    answers.append(answer)
    async with ConvexHttpClient(url) as client:
        with pytest.raises(error, match=message) as caught:
            await client.query("m:f", {}, "tok")
    assert type(caught.value) is error
