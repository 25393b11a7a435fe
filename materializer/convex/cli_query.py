"""``materializer query PATH [ARGS_JSON] --url URL [--token-file F | --token-stdin | --token T] [--watch]``.

The token comes from a file, the first line of stdin, ``$STELLA_TOKEN``, or
``--token`` (which warns: a command line is visible to every user of the
machine). What the server says on stderr (errors, refusals, states) passes
through :func:`materializer.redaction.redact`: a server may quote the token back.

Without ``--watch`` the query runs once over HTTP (``POST /api/query``) and
its value is printed as one JSON line. With ``--watch`` it is subscribed over
the sync protocol and every new value is printed as one JSON line, across
disconnects and backend restarts, until the caller cancels the coroutine
(Ctrl-C).

Values are printed in Convex JSON (``{"$integer": …}`` for 64-bit integers,
``{"$bytes": …}`` for bytes) with whole numbers written without a fraction,
which is the same Convex value. A function error goes to stderr as one JSON
line ``{"error": message, "errorData": …}``.

Exit codes: 0 the value was printed, 1 the function threw or the query
failed, 2 the args are not Convex values, 3 sign-in needed (the token was
refused or there is none).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO

from materializer import exits
from materializer.convex.http import ConvexAuthError, ConvexFunctionError, ConvexHttpClient, ConvexHttpError
from materializer.convex.protocol import QueryFailure, QueryValue
from materializer.convex.transport import ConnectionState, StateChange, SyncClient
from materializer.convex.values import ConvexValueError, to_convex_json
from materializer.redaction import redact
from materializer.tokens import TokenProvider

__all__ = ["display_json", "run_query_command"]

_WHOLE_FLOAT_LIMIT = 2.0**53


def display_json(value: Any) -> str:
    """One line of Convex JSON for ``value``, whole numbers without a fraction."""
    return json.dumps(_tidy(to_convex_json(value)), ensure_ascii=False, separators=(",", ":"))


def _tidy(wire: Any) -> Any:
    if isinstance(wire, float) and wire.is_integer() and abs(wire) <= _WHOLE_FLOAT_LIMIT:
        return int(wire)
    if isinstance(wire, list):
        return [_tidy(item) for item in wire]
    if isinstance(wire, dict):
        return {key: _tidy(item) for key, item in wire.items()}
    return wire


def _error_line(message: str, error_data: Any) -> str:
    body: dict[str, Any] = {"error": redact(message)}
    if error_data is not None:
        body["errorData"] = _tidy(to_convex_json(error_data))
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


async def run_query_command(
    path: str, args: dict[str, Any], url: str, token_provider: TokenProvider | None, watch: bool, out: TextIO
) -> int:
    """Run the ``query`` command; return its exit code. Errors and state changes go to stderr."""
    try:
        if not isinstance(args, dict):
            raise ConvexValueError(f"ARGS_JSON must be a JSON object, got {type(args).__name__}")
        to_convex_json(args)
    except ConvexValueError as exc:
        print(f"materializer query: bad args: {exc}", file=sys.stderr)
        return exits.USAGE
    if watch:
        return await _watch(path, args, url, token_provider, out)
    return await _once(path, args, url, token_provider, out)


async def _once(path: str, args: dict[str, Any], url: str, token_provider: TokenProvider | None, out: TextIO) -> int:
    token = None
    if token_provider is not None:
        token = await token_provider.get()
        if token is None:
            print(f"materializer query: no token: {token_provider.last_error}", file=sys.stderr)
            return exits.SIGN_IN_NEEDED
    async with ConvexHttpClient(url) as client:
        try:
            value = await client.query(path, args, token)
        except ConvexFunctionError as exc:
            print(_error_line(exc.error_message, exc.error_data), file=sys.stderr)
            return exits.FAILED
        except ConvexAuthError as exc:
            print(f"materializer query: {redact(str(exc))}", file=sys.stderr)
            return exits.SIGN_IN_NEEDED
        except ConvexHttpError as exc:
            print(f"materializer query: {redact(str(exc))}", file=sys.stderr)
            return exits.FAILED
    print(display_json(value), file=out, flush=True)
    return exits.OK


async def _watch(path: str, args: dict[str, Any], url: str, token_provider: TokenProvider | None, out: TextIO) -> int:
    async with SyncClient(url, token_provider) as client:
        subscription = client.subscribe(path, args)
        reporter = asyncio.create_task(_report_states(client.state_changes()))
        try:
            async for result in subscription:
                if isinstance(result, QueryValue):
                    print(display_json(result.value), file=out, flush=True)
                else:
                    assert isinstance(result, QueryFailure)
                    print(_error_line(result.error_message, result.error_data), file=sys.stderr, flush=True)
        finally:
            await client.close()
            await reporter  # ends with the CLOSED state
    return exits.OK


async def _report_states(states: AsyncIterator[StateChange]) -> None:
    """Tell the person at the terminal when the connection drops, needs sign-in, or is back."""
    async for change in states:
        if change.state in (ConnectionState.DISCONNECTED, ConnectionState.AUTH_REQUIRED, ConnectionState.CONNECTED):
            detail = f": {redact(change.detail)}" if change.detail else ""
            print(f"materializer query: {change.state.value}{detail}", file=sys.stderr, flush=True)
