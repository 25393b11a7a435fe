"""A resilient Convex sync client on ``websockets``: one session, as many sockets as it takes.

:class:`SyncClient` drives :class:`~materializer.convex.protocol.SyncProtocol`
over real sockets. On every socket it sends ``Connect``, ``Authenticate`` and
re-adds every active query; it reconnects with jittered exponential backoff
after anything goes wrong (a close, a ``FatalError``, a frame that breaks the
protocol, a server silent past the inactivity limit) and never raises out of
its background task.

Identity: every upgrade request names the client in ``Convex-Client``
(:mod:`materializer.convex.identity`) and the path carries no version. An
upgrade the server refuses (any HTTP status) is logged once per distinct
refusal, kept as the state's detail, and retried on the usual backoff.

Auth: tokens come from a :class:`~materializer.tokens.TokenProvider`. When the
server refuses a token, the client asks the provider for a fresh one and tries
once more; refused again, it enters ``AUTH_REQUIRED`` and opens no socket until
the provider's token changes (no timer). Ahead of a JWT's expiry
(:mod:`materializer.convex.token_timing`) it asks the provider for a newer
token and re-authenticates on the live socket; a changed token file
re-authenticates the same way. No socket runs on an expired token: when the
source has nothing newer by then (or the server says the token expired, as it
does lazily, with ``authUpdateAttempted: false``), the client closes the socket
and waits in ``TOKEN_NEEDED`` until the source holds a usable token.

Subscriptions deliver every distinct result in order (see :class:`Subscription`).
A transition too large to take (a frame over ``max_message_bytes``, or chunks
adding up to more) ends the socket; the same query set would bring it back on
the next one, so every subscription hears a ``QueryFailure`` with
``too_large`` set (which query's result made it so cannot be told from the
frame) and may ask for less before the client reconnects.

Server time: :meth:`SyncClient.server_now_ms` is the server's clock as the
last transition's ``serverTs`` told it, carried forward on the monotonic
clock (else our clock corrected by the reported ``clientClockSkew``), so
that whatever depends on "now" need not trust the local clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode

from materializer.convex.identity import client_headers, note_deprecation
from materializer.convex.protocol import (
    DEFAULT_MAX_TRANSITION_CHARS,
    AuthRefused,
    PingReceived,
    ProtocolError,
    QueryFailure,
    QueryResult,
    ServerFatal,
    SyncProtocol,
    TransitionApplied,
)
from materializer.convex.token_timing import TokenTiming, token_timing
from materializer.tokens import TokenProvider

__all__ = [
    "Backoff",
    "BackoffPolicy",
    "ConnectionState",
    "RetryKind",
    "StateChange",
    "Subscription",
    "SyncClient",
    "sync_url",
]

log = logging.getLogger("materializer.convex")

#: Close reasons / fatal errors by which Convex says it is overloaded (a longer first wait).
OVERLOAD_REASONS = (
    "TooManyConcurrentRequests",
    "SubscriptionsWorkerFullError",
    "CommitterFullError",
    "AwsTooManyRequestsException",
    "ExecuteFullError",
    "SystemTimeoutError",
    "ExpiredInQueue",
    "VectorIndexTooLarge",
    "SearchIndexTooLarge",
    "TooManyWritesInTimePeriod",
)


class ConnectionState(enum.Enum):
    """Where the client stands with the server."""

    CONNECTING = "connecting"  # opening a socket, or waiting for the server to apply what was sent
    CONNECTED = "connected"  # the server has applied the Connect, the token and the query set
    DISCONNECTED = "disconnected"  # waiting (backoff) before the next socket
    AUTH_REQUIRED = "auth_required"  # the server refused the token: waiting for the token provider to change
    TOKEN_NEEDED = "token_needed"  # no token, or only an expired one: waiting for the provider to have one
    CLOSED = "closed"  # close() was called


@dataclass(frozen=True, slots=True)
class StateChange:
    state: ConnectionState
    detail: str | None = None


class RetryKind(enum.Enum):
    """Why a socket ended, which decides the first wait before the next one."""

    CLEAN = "clean"  # no sign of a server problem (a normal close)
    ERROR = "error"  # errors, silence, broken frames, unreachable server
    OVERLOAD = "overload"  # the server named an overload


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """First waits per :class:`RetryKind` and the cap, in seconds (defaults as the JS client)."""

    clean_initial: float = 0.1
    error_initial: float = 1.0
    overload_initial: float = 3.0
    maximum: float = 16.0


class Backoff:
    """Jittered exponential backoff: ``initial(kind) * 2**retries``, capped, times 0.5..1.5."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.retries = 0
        self._rng = rng or random.Random()

    def next_delay(self, kind: RetryKind) -> float:
        initial = {
            RetryKind.CLEAN: self.policy.clean_initial,
            RetryKind.ERROR: self.policy.error_initial,
            RetryKind.OVERLOAD: self.policy.overload_initial,
        }[kind]
        base = min(initial * 2.0**self.retries, self.policy.maximum)
        self.retries += 1
        return base + base * (self._rng.random() - 0.5)

    def reset(self) -> None:
        self.retries = 0


def retry_kind(reason: str | None, otherwise: RetryKind) -> RetryKind:
    """OVERLOAD when ``reason`` names an overload, else ``otherwise``."""
    if reason and any(name in reason for name in OVERLOAD_REASONS):
        return RetryKind.OVERLOAD
    return otherwise


def sync_url(deployment_url: str) -> str:
    """``http(s)://host[/prefix]`` -> ``ws(s)://host[/prefix]/api/sync``.

    No version in the path: a Convex deployment reads one as the npm client's and refuses ours
    (see :mod:`materializer.convex.identity`); we name ourselves in the header instead, as the
    Rust client does.
    """
    parts = urlsplit(deployment_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"deployment URL must be http:// or https://, got {deployment_url!r}")
    return urlunsplit((scheme, parts.netloc, f"{parts.path.rstrip('/')}/api/sync", "", ""))


def refusal_text(exc: InvalidStatus) -> str:
    """``HTTP 400 ClientVersionUnsupported: <the server's message>`` for a refused upgrade."""
    response = exc.response
    text = f"HTTP {response.status_code}"
    try:
        body = json.loads(response.body or b"")
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict):
        code, message = body.get("code"), body.get("message")
        if isinstance(code, str) and code:
            text += f" {code[:80]}"
        if isinstance(message, str) and message:
            text += f": {message[:300]}"
    elif response.body:
        excerpt = response.body[:200].decode("utf-8", "replace").strip()
        if excerpt:
            text += f": {excerpt}"
    elif response.reason_phrase:
        text += f" {response.reason_phrase}"
    return "".join(ch if ch.isprintable() else " " for ch in text)


@dataclass(frozen=True, slots=True)
class _Ending:
    """How a socket ended: what to wait, what to tell the server next time, and any auth refusal."""

    kind: RetryKind
    close_reason: str
    refused: AuthRefused | None = None
    token_expired: bool = False  # the token ran out with nothing newer to take its place
    upgrade_refused: str | None = None  # the server's answer to a refused WebSocket upgrade
    too_large: str | None = None  # a transition over the size limit ended it (why)


class Subscription:
    """One query the client keeps subscribed, across sockets.

    ``async for result in subscription`` yields every distinct result
    (:class:`~materializer.convex.protocol.QueryValue` or
    :class:`~materializer.convex.protocol.QueryFailure`) in the order the
    server produced them. Nothing is dropped: results queue until read (read
    promptly), and a result equal to the previous one (as after a reconnect)
    is not a new result. Each result carries the ``args`` it answers, so the
    results still queued when :meth:`update_args` is called stay
    attributable. Iteration ends after :meth:`unsubscribe` or
    :meth:`SyncClient.close`, once the queued results are read.
    """

    def __init__(self, client: SyncClient, query_id: int, udf_path: str) -> None:
        self._client = client
        self.query_id = query_id
        self.udf_path = udf_path
        self._queue: asyncio.Queue[QueryResult | None] = asyncio.Queue()
        self._ended = False

    def __repr__(self) -> str:
        return f"Subscription(udf_path={self.udf_path!r}, query_id={self.query_id})"

    @property
    def latest(self) -> QueryResult | None:
        """The latest result for the current args (None before the first or after unsubscribing)."""
        return self._client._core.latest(self.query_id)

    @property
    def active(self) -> bool:
        return not self._ended

    def update_args(self, args: dict[str, Any]) -> None:
        """Subscribe with new args instead (one ModifyQuerySet: Remove the old query, Add the new)."""
        if self._ended:
            raise RuntimeError(f"{self!r} has ended")
        self.query_id = self._client._replace(self.query_id, args, self)

    def unsubscribe(self) -> None:
        """Stop the subscription; iteration ends after the results already queued."""
        if not self._ended:
            self._client._remove(self.query_id)
            self._end()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> QueryResult:
        if self._ended and self._queue.empty():
            raise StopAsyncIteration
        result = await self._queue.get()
        if result is None:
            raise StopAsyncIteration
        return result

    def _deliver(self, result: QueryResult) -> None:
        self._queue.put_nowait(result)

    def _end(self) -> None:
        self._ended = True
        self._queue.put_nowait(None)


class SyncClient:
    """A Convex sync session that outlives sockets, tokens and server restarts.

    Use ``async with SyncClient(url, provider) as client`` (or :meth:`start`
    and :meth:`close`), then :meth:`subscribe`. ``token_provider=None`` means
    no identity at all. ``connection_attempts`` counts the sockets tried,
    ``reauthentications`` the fresh tokens sent on live sockets.
    """

    def __init__(
        self,
        url: str,
        token_provider: TokenProvider | None = None,
        *,
        inactivity_timeout: float = 60.0,
        backoff: BackoffPolicy = BackoffPolicy(),
        open_timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_TRANSITION_CHARS,
        rng: random.Random | None = None,
    ) -> None:
        self.url = sync_url(url)
        self._provider = token_provider
        self._inactivity_timeout = inactivity_timeout
        self._backoff = Backoff(backoff, rng)
        self._open_timeout = open_timeout
        self._max_message_bytes = max_message_bytes
        self._core = SyncProtocol(max_transition_chars=max_message_bytes)
        self._subscriptions: dict[int, Subscription] = {}
        self._outbox: asyncio.Queue[str] | None = None
        self._last_close_reason: str | None = "InitialConnect"
        self._refusals = 0
        self._force_refresh = False
        self._token_in_use: str | None = None  # the token the current socket authenticated with last
        self._expired_token: str | None = None  # the last token that ran out on a socket
        self._token_seen: dict[str, float] = {}  # when each recent token first came (the last few)
        self._clock_skew_ms: float | None = None
        self._server_ts: tuple[float, float] | None = None  # the last serverTs (ms), and time.monotonic() then
        self._upgrade_refusal: str | None = None
        self._state = ConnectionState.DISCONNECTED
        self._detail: str | None = None
        self._state_event = asyncio.Event()
        self._watchers: set[asyncio.Queue[StateChange]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.connection_attempts = 0
        self.reauthentications = 0

    def __repr__(self) -> str:
        return f"SyncClient(url={self.url!r}, state={self._state.value})"

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background (idempotent)."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="convex sync")

    async def close(self) -> None:
        """Close the socket, end every subscription and stop for good."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for subscription in list(self._subscriptions.values()):
            subscription._end()
        self._subscriptions.clear()
        self._set_state(ConnectionState.CLOSED, None)

    async def __aenter__(self) -> SyncClient:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- subscriptions ------------------------------------------------------------------------------

    def subscribe(self, udf_path: str, args: dict[str, Any]) -> Subscription:
        """Subscribe to query ``udf_path`` (``module:function``) with ``args``."""
        if self._closed:
            raise RuntimeError("the client is closed")
        query_id, messages = self._core.add_query(udf_path, args)
        subscription = Subscription(self, query_id, udf_path)
        self._subscriptions[query_id] = subscription
        self._send(messages)
        return subscription

    def _replace(self, query_id: int, args: dict[str, Any], subscription: Subscription) -> int:
        new_id, messages = self._core.replace_query(query_id, args)
        del self._subscriptions[query_id]
        self._subscriptions[new_id] = subscription
        self._send(messages)
        return new_id

    def _remove(self, query_id: int) -> None:
        if self._closed:
            return
        self._send(self._core.remove_query(query_id))
        del self._subscriptions[query_id]

    # -- state --------------------------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    def server_now_ms(self) -> float | None:
        """The server's clock now, in Unix ms, as far as the sockets have told it (None before any word)."""
        if self._server_ts is not None:
            server_ms, at = self._server_ts
            return server_ms + (time.monotonic() - at) * 1000
        if self._clock_skew_ms is not None:
            return time.time() * 1000 - self._clock_skew_ms
        return None

    @property
    def state_detail(self) -> str | None:
        """Why the client is in its state (e.g. the server's refusal in AUTH_REQUIRED); never a token."""
        return self._detail

    async def wait_for_state(self, *states: ConnectionState) -> ConnectionState:
        """Wait until the client is in one of ``states``; return that state."""
        while self._state not in states:
            await self._state_event.wait()
        return self._state

    async def state_changes(self) -> AsyncIterator[StateChange]:
        """The current state, then every change, until CLOSED."""
        queue: asyncio.Queue[StateChange] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            change = StateChange(self._state, self._detail)
            while True:
                yield change
                if change.state is ConnectionState.CLOSED:
                    return
                change = await queue.get()
        finally:
            self._watchers.discard(queue)

    def _set_state(self, state: ConnectionState, detail: str | None) -> None:
        if (state, detail) == (self._state, self._detail):
            return
        self._state, self._detail = state, detail
        log.info("convex sync %s%s", state.value, f": {detail}" if detail else "")
        event, self._state_event = self._state_event, asyncio.Event()
        event.set()
        change = StateChange(state, detail)
        for queue in self._watchers:
            queue.put_nowait(change)

    # -- the connection loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._one_socket()
            except Exception:  # the daemon's lifeline: a bug here must not end the session
                log.exception("convex sync: unexpected failure; reconnecting")
                await self._wait_before_retry(RetryKind.ERROR, "InternalClientError")

    async def _one_socket(self) -> None:
        """Get a token, run one socket to its end, then decide how and when to go again."""
        token: str | None = None
        if self._provider is not None:
            token = await self._usable_token()
            if token is None:
                return  # waited in TOKEN_NEEDED for the source to change: look again
            self._core.set_auth(token)
        self._token_in_use = token
        ending = await self._connect_and_serve(token)
        self._last_close_reason = ending.close_reason
        if ending.too_large is not None:
            log.warning("convex sync: an answer too large to take ended the socket (%s)", ending.too_large)
            for query_id, subscription in list(self._subscriptions.items()):
                subscription._deliver(QueryFailure(query_id, subscription.udf_path, self._core.query_args(query_id),
                                                   f"the answer was too large to take: {ending.too_large}",
                                                   too_large=True))
        refused = ending.refused
        if ending.token_expired or (refused is not None and not refused.stale and not refused.auth_update_attempted):
            # Expiry, noticed by us or (lazily, after a query re-run) by the server: not a refusal.
            log.info("convex sync: the token expired; asking the token source for a fresh one")
            self._expired_token = self._token_in_use
            self._force_refresh = True
            return
        if refused is not None and not refused.stale and self._provider is not None:
            self._refusals += 1
            if self._refusals >= 2:
                await self._await_token_change(token, ConnectionState.AUTH_REQUIRED,
                                               f"the server refused the token: {refused.message}")
            else:
                log.info("convex sync: token refused (%s); asking the token source for a fresh one", refused.message)
                self._force_refresh = True
            return
        await self._wait_before_retry(ending.kind, ending.upgrade_refused or ending.close_reason)

    async def _usable_token(self) -> str | None:
        """The provider's token if a socket may run on it; else wait in TOKEN_NEEDED and return None."""
        assert self._provider is not None
        token = await self._provider.get(force_refresh=self._force_refresh)
        self._force_refresh = False
        if token is not None and self._is_expired(token):
            token = await self._provider.get(force_refresh=True)
        if token is None:
            await self._await_token_change(None, ConnectionState.TOKEN_NEEDED,
                                           self._provider.last_error or "the token source holds no token")
            return None
        if self._is_expired(token):
            timing = self._timing(token)
            until = f" at {time.strftime('%H:%M:%S', time.localtime(timing.expires_at))}" if timing else ""
            await self._await_token_change(token, ConnectionState.TOKEN_NEEDED,
                                           f"the token expired{until} and the token source has no newer one")
            return None
        return token

    def _timing(self, token: str) -> TokenTiming | None:
        received_at = self._token_seen.get(token)
        if received_at is None:
            received_at = self._token_seen[token] = time.time()
            while len(self._token_seen) > 4:
                del self._token_seen[next(iter(self._token_seen))]
        return token_timing(token, received_at=received_at, clock_skew_ms=self._clock_skew_ms)

    def _is_expired(self, token: str) -> bool:
        if token == self._expired_token:
            return True
        timing = self._timing(token)
        return timing is not None and timing.expired(time.time())

    async def _wait_before_retry(self, kind: RetryKind, reason: str) -> None:
        delay = self._backoff.next_delay(kind)
        self._set_state(ConnectionState.DISCONNECTED, reason)
        await asyncio.sleep(delay)

    async def _await_token_change(self, current: str | None, state: ConnectionState, detail: str) -> None:
        assert self._provider is not None
        self._set_state(state, detail)
        await self._provider.wait_changed(current)
        self._refusals = 0
        self._backoff.reset()

    async def _connect_and_serve(self, token: str | None) -> _Ending:
        self.connection_attempts += 1
        self._set_state(ConnectionState.CONNECTING, None)
        headers = client_headers()
        try:
            ws = await connect(
                self.url,
                open_timeout=self._open_timeout,
                close_timeout=1.0,
                max_size=self._max_message_bytes,
                additional_headers={k: v for k, v in headers.items() if k != "User-Agent"},
                user_agent_header=headers["User-Agent"],
                # No permessage-deflate, as the official Python (Rust) client: it costs CPU on
                # both ends for frames that are small, and it adds a suspension to every send.
                compression=None,
            )
        except InvalidStatus as exc:
            note_deprecation(exc.response.headers)
            refusal = refusal_text(exc)
            if refusal != self._upgrade_refusal:
                self._upgrade_refusal = refusal
                log.error("convex sync: %s refused the WebSocket upgrade: %s", self.url, refusal)
            return _Ending(retry_kind(refusal, RetryKind.ERROR), "ConnectionFailed", upgrade_refused=refusal)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            log.info("convex sync: cannot connect to %s: %s", self.url, exc)
            return _Ending(retry_kind(str(exc), RetryKind.ERROR), "ConnectionFailed")
        self._upgrade_refusal = None
        if ws.response is not None:
            note_deprecation(ws.response.headers)
        outbox: asyncio.Queue[str] = asyncio.Queue()
        self._outbox = outbox
        self._send(self._core.socket_opened(time.time() * 1000, self._last_close_reason))
        if self._core.caught_up:
            self._on_caught_up()
        sender = asyncio.create_task(self._send_loop(ws, outbox), name="convex sync sender")
        receiver = asyncio.create_task(self._receive_loop(ws), name="convex sync receiver")
        tasks: list[asyncio.Task[Any]] = [receiver, sender]
        if token is not None:
            tasks.append(asyncio.create_task(self._keep_token_fresh(token), name="convex token refresh"))
        try:
            # The receiver ends the socket; so does the refresher, when the token runs out.
            while True:
                done, _ = await asyncio.wait([t for t in tasks if t is not sender], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    result = task.result()
                    if isinstance(result, _Ending):
                        return result
                tasks = [t for t in tasks if t not in done]
        finally:
            self._outbox = None
            self._core.socket_closed()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await ws.close()

    def _send(self, messages: list[dict[str, Any]]) -> None:
        if self._outbox is None:
            return
        for message in messages:
            self._outbox.put_nowait(json.dumps(message, separators=(",", ":")))

    @staticmethod
    async def _send_loop(ws: ClientConnection, outbox: asyncio.Queue[str]) -> None:
        try:
            while True:
                await ws.send(await outbox.get())
        except ConnectionClosed:
            return

    async def _receive_loop(self, ws: ClientConnection) -> _Ending:
        while True:
            try:
                async with asyncio.timeout(self._inactivity_timeout):
                    frame = await ws.recv()
            except TimeoutError:
                log.warning("convex sync: server silent for %g s; reconnecting", self._inactivity_timeout)
                return _Ending(RetryKind.ERROR, "InactiveServer")
            except ConnectionClosed as exc:
                return self._ending_for_close(exc)
            event = self._core.receive(frame)
            if event is None or isinstance(event, PingReceived):
                continue
            if isinstance(event, TransitionApplied):
                self._on_transition(event)
            elif isinstance(event, AuthRefused):
                log.warning("convex sync: server refused the token: %s", event.message)
                return _Ending(RetryKind.ERROR, "AuthError", refused=event)
            elif isinstance(event, ServerFatal):
                log.warning("convex sync: server fatal error: %s", event.message)
                return _Ending(retry_kind(event.message, RetryKind.ERROR), event.message[:200] or "FatalError")
            else:
                assert isinstance(event, ProtocolError)
                log.warning("convex sync: protocol error, reconnecting: %s", event.reason)
                return _Ending(RetryKind.ERROR, "InvalidServerMessage",
                               too_large=event.reason if event.too_large else None)

    @staticmethod
    def _ending_for_close(exc: ConnectionClosed) -> _Ending:
        received = exc.rcvd
        if received is None:
            # Broken, or failed by us (a frame over the size limit: 1009, with the reason why).
            sent = exc.sent
            reason = sent.reason if sent is not None and sent.reason else "ConnectionLost"
            too_large = sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG
            return _Ending(RetryKind.ERROR, reason, too_large=reason if too_large else None)
        reason = received.reason or f"CloseCode{received.code}"
        clean = RetryKind.CLEAN if received.code in (1000, 1001) else RetryKind.ERROR
        return _Ending(retry_kind(received.reason, clean), reason)

    def _on_transition(self, event: TransitionApplied) -> None:
        if event.client_clock_skew_ms is not None:
            self._clock_skew_ms = event.client_clock_skew_ms
        if event.server_ts_ms is not None:
            self._server_ts = (event.server_ts_ms, time.monotonic())
        for result in event.results:
            subscription = self._subscriptions.get(result.query_id)
            if subscription is not None:
                subscription._deliver(result)
        if event.auth_confirmed:
            self._refusals = 0
        if event.caught_up and self._state is not ConnectionState.CONNECTED:
            self._on_caught_up()

    def _on_caught_up(self) -> None:
        self._backoff.reset()
        self._set_state(ConnectionState.CONNECTED, None)

    # -- token freshness on a live socket ------------------------------------------------------------------

    async def _keep_token_fresh(self, token: str) -> _Ending | None:
        """Re-authenticate on this socket when the provider's token changes or nears its expiry.

        Returns an ending (the socket must close) once the token in use may no longer be used and
        the provider has nothing newer; returns None when the token has no expiry and the provider
        can only be asked on a timer (nothing left to watch on this socket).
        """
        assert self._provider is not None
        in_use = token
        seen: str | None = token
        while True:
            timing = self._timing(in_use)
            now = time.time()
            if timing is None:
                delay = None
            elif now < timing.refresh_at:
                delay = timing.refresh_at - now
            elif now < timing.stop_at:
                # Due for a refresh and none came: ask again a few times before the token stops.
                delay = max(0.05, min(5.0, (timing.stop_at - now) / 4))
            else:
                log.warning("convex sync: the token expired and the token source has no newer one")
                return _Ending(RetryKind.CLEAN, "TokenExpired", token_expired=True)
            if delay is None and self._provider.polls_for_changes:
                return None
            try:
                async with asyncio.timeout(delay):
                    if self._provider.polls_for_changes:
                        await asyncio.Event().wait()  # only the expiry makes it worth asking
                    else:
                        await self._provider.wait_changed(seen)
                changed = True
            except TimeoutError:
                changed = False
            seen = await self._provider.get(force_refresh=not changed)
            if seen is not None and seen != in_use and not self._is_expired(seen):
                in_use = self._token_in_use = seen
                self.reauthentications += 1
                log.info("convex sync: re-authenticating with a %s token", "changed" if changed else "refreshed")
                self._send(self._core.set_auth(in_use))
