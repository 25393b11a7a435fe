"""One-shot Convex queries over HTTP (``POST /api/query``), for replay and the ``query`` command."""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import httpx

from materializer.convex.identity import client_headers, note_deprecation
from materializer.convex.values import ConvexValueError, from_convex_json, to_convex_json
from materializer.httpx_shared import tls_context

__all__ = ["ConvexAuthError", "ConvexFunctionError", "ConvexHttpClient", "ConvexHttpError"]

#: The JS client's ``STATUS_CODE_UDF_FAILED`` (``src/browser/http_client.ts``): some deployments answer a
#: function that threw with it. The open-source backend answers HTTP 200 with ``status: "error"``
#: (``crates/local_backend/src/public_api.rs`` ``public_query_post``). Both are a function error.
FUNCTION_ERROR_STATUS = 560


class ConvexHttpError(Exception):
    """A query that could not be answered: unreachable, refused or malformed."""


class ConvexAuthError(ConvexHttpError):
    """The deployment refused the token (HTTP 401 or 403)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ConvexFunctionError(ConvexHttpError):
    """The query function failed: it threw, it does not exist, or its arguments were refused.

    ``error_data`` is the ``ConvexError`` payload, if any.
    """

    def __init__(self, message: str, error_data: Any = None) -> None:
        super().__init__(message)
        self.error_message = message
        self.error_data = error_data


class ConvexHttpClient:
    """Runs Convex queries over HTTP against one deployment, reusing one connection pool."""

    def __init__(self, url: str, *, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"deployment URL must be http:// or https://, got {url!r}")
        self.url = str(parsed).rstrip("/")
        self._client = httpx.AsyncClient(
            timeout=timeout, transport=transport, headers=client_headers(), verify=tls_context(trust_env=True)
        )

    def __repr__(self) -> str:
        return f"ConvexHttpClient(url={self.url!r})"

    async def __aenter__(self) -> ConvexHttpClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def query(self, path: str, args: dict[str, Any], token: str | None) -> Any:
        """Run query ``path`` with ``args`` once and return its value (decoded from Convex JSON)."""
        if not isinstance(args, dict):
            raise ConvexValueError(f"query args must be an object (dict), got {type(args).__name__}")
        body = {"path": path, "args": [to_convex_json(args)], "format": "convex_encoded_json"}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        endpoint = f"{self.url}/api/query"
        try:
            response = await self._client.post(endpoint, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ConvexHttpError(f"POST {endpoint} failed: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        note_deprecation(response.headers)
        payload = _json_or_none(response)
        if status in (401, 403):
            raise ConvexAuthError(f"{path}: the deployment refused the token (HTTP {status}){_detail(payload)}", status)
        if status in (200, FUNCTION_ERROR_STATUS) and isinstance(payload, dict) and payload.get("status") == "error":
            message = payload.get("errorMessage")
            if not isinstance(message, str):
                raise ConvexHttpError(f"{path}: HTTP {status} error answer has no errorMessage")
            try:
                error_data = from_convex_json(payload.get("errorData"))
            except (ConvexValueError, RecursionError) as exc:
                raise ConvexHttpError(f"{path}: errorData is not Convex JSON: {exc}") from None
            raise ConvexFunctionError(message, error_data)
        if status != 200:
            raise ConvexHttpError(f"{path}: HTTP {status}{_detail(payload) or _text_excerpt(response)}")
        if not isinstance(payload, dict) or payload.get("status") != "success" or "value" not in payload:
            raise ConvexHttpError(f"{path}: HTTP 200 answer is not {{status: 'success', value}}")
        try:
            return from_convex_json(payload["value"])
        except (ConvexValueError, RecursionError) as exc:
            raise ConvexHttpError(f"{path}: answer value is not Convex JSON: {exc}") from None


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content)
    except (ValueError, RecursionError):
        return None


def _detail(payload: Any) -> str:
    """The message of a Convex error body (``{code, message}`` or ``{error}``), if there is one."""
    if isinstance(payload, dict):
        code = payload.get("code")
        prefix = f"{code[:80]}: " if isinstance(code, str) and code else ""
        for key in ("message", "errorMessage", "error"):
            if isinstance(payload.get(key), str):
                return f": {prefix}{payload[key][:500]}"
    return ""


def _text_excerpt(response: httpx.Response) -> str:
    text = response.content[:200].decode("utf-8", "replace").strip()
    return f": {text}" if text else ""
