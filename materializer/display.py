"""The Display sidebar socket: live sidebar events, resumable from the ledger.

A Unix stream socket at ``<root>/state/media/display.sock``, mode 0600,
speaking newline-delimited JSON (ASCII: non-ASCII text is ``\\u``-escaped).

Server to client:

- Events, one per line, exactly as the ledger keeps them::

      {"seq": 12, "type": "media.materialized", "payload": {...}}

  ``seq`` is the ledger's event seq: it only grows, and a client that
  remembers the last one it handled can resume with ``since``. Types are
  ``media.materialized``, ``media.failed`` and ``materializer.state``.
- ``{"type": "welcome", "since": n}``: the answer to a hello, before anything
  else. From here on the client receives every event with ``seq > n``, in
  order, each once. ``n`` is the client's ``since``, or the newest seq already
  published for a live-only hello, or ``0`` when the client's ``since`` lies
  beyond anything this ledger ever handed out (its position came from another
  ledger, e.g. a deleted and recreated root): it then gets this ledger's
  events from the start and should forget its old position.
- ``{"type": "materializer.pruned", "payload": {"fromSeq": a, "toSeq": b,
  "message": ...}}``: the events ``a..b`` the client asked for no longer
  exist (the ledger keeps only the newest ones). Not an event: it has no seq.
- ``{"type": "materializer.skipped", "payload": {"seq": n, "eventType": t,
  "message": ...}}``: event ``n`` (of type ``t``) is in the ledger but its
  stored payload no longer decodes (a damaged byte on disk), so it cannot be
  sent; it takes that event's place in the order, and the events after it
  follow. Not an event either: it has no top-level seq, and its payload is no
  ``DisplayPayload``, so a reader that shows ``media.materialized`` payloads
  (the desktop's ``isDisplayPayload``) never takes it for one.
- ``{"type": "error", "error": "..."}``: a client line was not understood; the
  line is ignored and the connection stays open.
- ``{"type": "error", "error": "...", "code": "too_many_clients"}``, then the
  end of the connection (or a reset, when the client's hello was left unread):
  ``max_clients`` clients are connected already (the daemon's
  ``daemon.max_sidebar_clients``). Nothing was sent or skipped; the client may
  try again later, with the same ``since``.

Client to server:

- ``{"type": "hello", "since": n}`` as the first line: every event with
  ``seq > n`` still in the ledger, then live events, with no hole and no
  duplicate at the switch-over. ``{"type": "hello"}`` (or ``"since": null``)
  asks for live events only; the welcome says where they start, so the client
  can resume from there after a disconnect without missing anything.
- A client that sends nothing within ``hello_timeout`` seconds, or whose
  first line is anything else (which gets an error line), receives the live
  events published since it connected, without a welcome.
- Later lines get an error line (there is nothing to ask after the hello).
  A line longer than 64 KiB gets an error line and the connection is closed.
  A client that closes its side of the connection is disconnected.

A slow or stuck client never blocks the daemon: :meth:`DisplayServer.publish`
only appends to each client's bounded queue. A client whose queue overflows,
or whose socket accepts nothing for ``write_timeout`` seconds, is dropped
(disconnected); it can reconnect and resume with ``since``.

A crowd of clients catching up does not slow the daemon either: the backlog
is read from the ledger a page at a time, one read at a time, decoded and
encoded in the ledger's executor; a page is read once for every client that
needs it while catch-ups run, and each client is written at most
``_WRITE_BATCH`` bytes before its socket must take them.

Events committed by other processes (``materializer replay`` announcing the
jobs it materialized) reach clients too: the server delivers the ledger's
events strictly in seq order, reading any it was not handed from the ledger
(when :meth:`~DisplayServer.publish` skips seqs, and every ``poll_interval``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import tempfile
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from materializer.layout import UntrustedPath, check_file
from materializer.ledger import Event, EventPage, Ledger, LedgerError

__all__ = [
    "ERROR",
    "HELLO",
    "TOO_MANY_CLIENTS",
    "PRUNED",
    "SKIPPED",
    "WELCOME",
    "DisplayServer",
    "DisplaySocketError",
    "DisplaySocketInUseError",
    "encode_event",
]

HELLO = "hello"
WELCOME = "welcome"
PRUNED = "materializer.pruned"
SKIPPED = "materializer.skipped"
ERROR = "error"
#: The ``code`` of the error line a client over ``max_clients`` gets before the connection ends.
TOO_MANY_CLIENTS = "too_many_clients"

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Events read from the ledger per query (backlogs and catch-ups page through it).
_PAGE_SIZE = 500
#: Events per page of a client's backlog: one ledger read, a few milliseconds of the ledger's thread.
_BACKLOG_PAGE = 100
#: Backlog pages kept for the next client that needs them, while any client is catching up.
_KEPT_PAGES = 8
#: Most bytes written to a client before its socket must take them (the transport buffers what it cannot).
_WRITE_BATCH = 64 * 1024
#: Connections accepted per wakeup of the listening socket (as asyncio's own servers do).
_ACCEPTS_PER_WAKEUP = 100
#: Refused connections kept open at once until their client closes (each costs a descriptor).
_MAX_REFUSED_WAITING = 128
#: Longest client line accepted; a hello is a few dozen bytes.
_MAX_CLIENT_LINE = 64 * 1024
#: ``sun_path`` is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
#: Seqs are SQLite integers.
_MAX_SEQ = 2**63 - 1


class DisplaySocketError(Exception):
    """The sidebar socket could not be set up; the message says why."""


class DisplaySocketInUseError(DisplaySocketError):
    """Another live process is answering on the sidebar socket."""


def encode_event(event: Event) -> bytes:
    """One event as its socket line; an event whose payload could not be read, as the notice that replaces it."""
    if event.unreadable is not None:
        message = f"event {event.seq} ({event.type}) could not be read from the ledger and was skipped: " \
                  f"{event.unreadable}"
        return _encode({"type": SKIPPED, "payload": {"seq": event.seq, "eventType": event.type, "message": message}})
    return _encode({"seq": event.seq, "type": event.type, "payload": event.payload})


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("ascii") + b"\n"


class _ProtocolError(Exception):
    """A client line that is not understood; answered with an error line."""


class _Stalled(Exception):
    """A client's socket accepted nothing for ``write_timeout`` seconds."""


@dataclass(eq=False)
class _Client:
    """One connected client and the live events waiting for it."""

    writer: asyncio.StreamWriter
    registered_at: int
    """The newest seq published when the client connected: later events reach it through ``queue``."""
    sent_seq: int
    """Events up to here were sent (or are covered by the client's ``since``)."""
    queue: deque[tuple[int | None, bytes]] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False
    idle: bool = False
    """Its sender is waiting for lines, with nothing queued: a line can be written at once."""


@dataclass(frozen=True)
class _BacklogPage:
    """Events after ``after_seq`` as socket lines, read and encoded off the event loop."""

    lines: tuple[tuple[int, bytes], ...]
    #: The pruned-events line, when events after ``after_seq`` were pruned before the first of ``lines``.
    pruned: bytes | None
    #: The newest seq the ledger ever handed out, when the page was read.
    last_seq: int
    #: Whether the page is as long as asked: then no later event can join it (and it may be kept).
    full: bool


def _read_backlog_page(ledger: Ledger, after_seq: int) -> _BacklogPage:
    """One page of a backlog, encoded (in the ledger's executor)."""
    page = ledger.events_after(after_seq, _BACKLOG_PAGE)
    return _BacklogPage(tuple((event.seq, encode_event(event)) for event in page.events),
                        _pruned_line(page) if page.gap else None, page.last_seq, len(page.events) == _BACKLOG_PAGE)


class _Backlog:
    """Backlog pages for clients catching up: one ledger read at a time, each full page read once for all.

    Only full pages are kept (a short one is the end of the log, which grows), at most
    :data:`_KEPT_PAGES`, and only while some client is catching up, so that what a kept page says
    about pruning stays current.
    """

    def __init__(self, read: Callable[[int], Awaitable[_BacklogPage]]) -> None:
        self._read = read
        self._lock = asyncio.Lock()
        self._pages: OrderedDict[int, _BacklogPage] = OrderedDict()
        self.readers = 0

    async def page(self, after_seq: int) -> _BacklogPage:
        async with self._lock:
            page = self._pages.get(after_seq)
            if page is not None:
                self._pages.move_to_end(after_seq)
                return page
            page = await self._read(after_seq)
            if page.full:
                self._pages[after_seq] = page
                while len(self._pages) > _KEPT_PAGES:
                    self._pages.popitem(last=False)
            return page

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Count a client catching up; forget the kept pages when the last one is done."""
        self.readers += 1
        try:
            yield
        finally:
            self.readers -= 1
            if not self.readers:
                self._pages.clear()


class DisplayServer:
    """Serves sidebar events on a Unix socket; see the module docstring for the protocol.

    ``max_queue`` bounds the lines waiting for each client; ``write_timeout``
    is how long a client's socket may accept nothing before it is dropped;
    ``hello_timeout`` is how long a new client has to send its hello;
    ``poll_interval`` is how often the ledger is checked for events committed
    by other processes (``None``: never). Ledger calls run on ``executor``
    (the default thread pool if ``None``), never on the event loop.
    ``max_clients`` bounds the clients connected at once (``None``: no bound);
    one more gets a ``too_many_clients`` error line and is closed.
    """

    def __init__(
        self,
        path: Path,
        ledger: Ledger,
        *,
        max_queue: int = 1000,
        write_timeout: float = 10.0,
        hello_timeout: float = 1.0,
        poll_interval: float | None = 1.0,
        executor: Executor | None = None,
        max_clients: int | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_clients is not None and max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        self.path = Path(path)
        self._ledger = ledger
        self._max_queue = max_queue
        self._write_timeout = write_timeout
        self._hello_timeout = hello_timeout
        self._poll_interval = poll_interval
        self._executor = executor
        self._max_clients = max_clients
        self._refusing = False
        self._backlog = _Backlog(functools.partial(self._ledger_call, _read_backlog_page, ledger))
        self._listener: socket.socket | None = None
        #: Connections accepted and not yet finished (what ``max_clients`` counts).
        self._connections = 0
        #: Refused connections waiting for their client to close (it reads the error line first).
        self._refused: dict[socket.socket, asyncio.TimerHandle] = {}
        self._socket_id: tuple[int, int] | None = None
        self._closed = False
        self._clients: set[_Client] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._published_seq = 0
        self._stash: dict[int, Event] = {}
        """Published events waiting for older ones to be read from the ledger."""
        self._stash_version = 0
        self._catch_up_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None

    @property
    def client_count(self) -> int:
        """Clients connected now."""
        return len(self._clients)

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving.

        Raises :class:`DisplaySocketInUseError` if another process answers on
        the socket, :class:`~materializer.layout.UntrustedPath` if something
        other than a socket of ours is at its path (a symlink, a file, another
        user's socket), :class:`DisplaySocketError` if it cannot be created.
        """
        if self._listener is not None or self._closed:
            raise RuntimeError("a DisplayServer starts once")
        # Read before binding: the first client may connect right after.
        self._published_seq = await self._ledger_call(self._ledger.last_seq)
        sock, self._socket_id = await asyncio.to_thread(_bind_private_socket, self.path)
        try:
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        except BaseException:
            self._remove_own_socket_file()
            sock.close()
            raise
        self._listener = sock
        if self._poll_interval is not None:
            self._poll_task = asyncio.create_task(self._poll_ledger(self._poll_interval))
        if self._stash:
            self._catch_up()

    def publish(self, event: Event) -> None:
        """Send an event just committed to the ledger to every client; never blocks.

        Call it after the commit, in seq order. An event already delivered is
        ignored; one that skips seqs (committed meanwhile by another process)
        waits until the missing ones are read from the ledger, so clients
        always get events in seq order. Events published before :meth:`start`
        finishes are delivered once it has; after :meth:`close`, publishing
        does nothing.
        """
        if self._closed or event.seq <= self._published_seq:
            return
        if self._listener is not None and event.seq == self._published_seq + 1:
            self._deliver(event)
            return
        self._stash[event.seq] = event
        self._stash_version += 1
        if self._listener is not None:
            self._catch_up()

    async def close(self) -> None:
        """Stop serving, disconnect every client and remove the socket file (if still ours)."""
        if self._closed:
            return
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is None:
            return
        # While the listening socket is open its file's inode cannot be reused,
        # so the identity check cannot mistake another server's socket for ours.
        self._remove_own_socket_file()
        asyncio.get_running_loop().remove_reader(listener.fileno())
        listener.close()
        for refused in list(self._refused):
            self._end_refused(refused)
        for task in (self._poll_task, self._catch_up_task):
            if task is not None:
                task.cancel()
        for client in list(self._clients):
            self._drop(client, "the server is closing")
        await asyncio.gather(
            *(task for task in (self._poll_task, self._catch_up_task) if task is not None),
            *self._handlers,
            return_exceptions=True,
        )

    # -- delivery ----------------------------------------------------------------

    def _deliver(self, event: Event) -> None:
        """Queue the next event in seq order for every client."""
        self._published_seq = event.seq
        self._stash.pop(event.seq, None)
        line = encode_event(event)
        for client in list(self._clients):
            self._offer(client, event.seq, line)

    def _offer(self, client: _Client, seq: int | None, line: bytes) -> None:
        if client.dropped:
            return
        transport = client.writer.transport
        if client.idle and not client.queue and not transport.get_write_buffer_size() and not transport.is_closing():
            # Caught up, and its socket has taken everything: write now rather than wake its sender
            # (a task switch per line per client). What the socket does not take waits in the
            # transport, and the next line goes through the sender, which waits for it to drain.
            if seq is None or seq > client.sent_seq:
                client.writer.write(line)
                client.sent_seq = client.sent_seq if seq is None else seq
            return
        if len(client.queue) >= self._max_queue:
            self._drop(client, f"it fell {self._max_queue} lines behind")
            return
        client.queue.append((seq, line))
        client.wakeup.set()

    def _drop(self, client: _Client, reason: str) -> None:
        """Disconnect a client at once, discarding whatever it has not read."""
        if client.dropped:
            return
        client.dropped = True
        self._clients.discard(client)
        if not self._closed:
            log.info("sidebar client dropped: %s (it can reconnect and resume with since)", reason)
        client.writer.transport.abort()

    def _catch_up(self) -> None:
        """Deliver, in the background, the ledger's events newer than the last delivered one."""
        if self._catch_up_task is None and not self._closed:
            self._catch_up_task = asyncio.create_task(self._read_ledger_ahead())

    async def _read_ledger_ahead(self) -> None:
        try:
            while True:
                stash_version = self._stash_version
                try:
                    page = await self._ledger_call(self._ledger.events_after, self._published_seq, _PAGE_SIZE)
                except LedgerError as exc:
                    log.warning("cannot read sidebar events from the ledger: %s", exc)
                    page = None
                if page is not None:
                    for event in page.events:
                        if event.seq > self._published_seq:
                            self._deliver(event)
                    if len(page.events) == _PAGE_SIZE:
                        continue
                waiting = sorted(seq for seq in self._stash if seq > self._published_seq)
                if not waiting:
                    break
                if page is not None and (page.events or self._stash_version != stash_version):
                    continue  # published while we read: committed, so the next read has them
                # Not in the ledger (pruned already) or the ledger failed: deliver what we were handed.
                for seq in waiting:
                    self._deliver(self._stash[seq])
                break
            self._stash.clear()
        finally:
            self._catch_up_task = None

    async def _poll_ledger(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._catch_up()

    # -- clients -----------------------------------------------------------------

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.transport.abort()
            return
        client = _Client(writer, registered_at=self._published_seq, sent_seq=self._published_seq)
        self._clients.add(client)
        sender: asyncio.Task[None] | None = None
        try:
            try:
                first = await self._first_line(reader)
            except ValueError:  # longer than the reader's limit
                await self._close_with_error(client, f"line longer than {_MAX_CLIENT_LINE} bytes; closing")
                return
            if first == b"":
                return
            since: int | None = None
            said_hello = False
            if first is not None:
                try:
                    since = _hello_since(_parse_line(first))
                    said_hello = True
                except _ProtocolError as exc:
                    self._offer(client, None, _error_line(str(exc)))
            sender = asyncio.create_task(self._send(client, said_hello, since))
            await self._answer_lines(client, reader)
        except ConnectionError:
            pass
        finally:
            self._clients.discard(client)
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
            client.dropped = True
            writer.transport.abort()

    def _accept(self) -> None:
        """Take the connections waiting on the listening socket (called when it is readable).

        Accepted here, on the raw socket, so that refusing a client over ``max_clients`` costs a
        few system calls and no streams or task: a crowd of connections cannot slow the daemon.
        """
        assert self._listener is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors or memory: say so, and try again in a moment
                log.warning("cannot accept a sidebar client: %s; trying again in 1 s", exc.strerror or exc)
                loop = asyncio.get_running_loop()
                loop.remove_reader(self._listener.fileno())
                loop.call_later(1.0, self._resume_accepting)
                return
            conn.setblocking(False)
            if self._max_clients is not None and self._connections >= self._max_clients:
                self._refuse(conn)
                continue
            self._refusing = False
            self._connections += 1
            task = asyncio.create_task(self._open(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handler_done)

    def _resume_accepting(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)

    async def _open(self, conn: socket.socket) -> None:
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=_MAX_CLIENT_LINE)
            except OSError:
                conn.close()
                return
            await self._serve_client(reader, writer)
        finally:
            self._connections -= 1

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a sidebar client's connection failed", exc_info=exc)

    def _refuse(self, conn: socket.socket) -> None:
        """Tell a client over ``max_clients`` so, in the protocol's error line, and end the connection.

        The line goes straight into the client's receive queue; then our side is shut, and the
        socket is closed once the client has closed its own (at most ``hello_timeout`` later; at
        most :data:`_MAX_REFUSED_WAITING` wait at once, the others are closed at once). Closing
        before the client has written its hello would make that write fail, and some clients
        then drop what they had received.
        """
        if not self._refusing:
            log.warning("refusing sidebar clients: %d are connected, the limit (daemon.max_sidebar_clients)",
                        self._connections)
            self._refusing = True
        message = (f"too many sidebar clients: {self._max_clients} are connected, the limit "
                   "(daemon.max_sidebar_clients); try again later")
        try:
            conn.send(_encode({"type": ERROR, "error": message, "code": TOO_MANY_CLIENTS}))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self._refused) >= _MAX_REFUSED_WAITING:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        self._refused[conn] = loop.call_later(self._hello_timeout, self._end_refused, conn)
        loop.add_reader(conn.fileno(), self._read_refused, conn)

    def _read_refused(self, conn: socket.socket) -> None:
        """Discard what a refused client sends; end the connection when it closes its side."""
        try:
            if conn.recv(_MAX_CLIENT_LINE):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._end_refused(conn)

    def _end_refused(self, conn: socket.socket) -> None:
        timer = self._refused.pop(conn, None)
        if timer is None:
            return
        timer.cancel()
        asyncio.get_running_loop().remove_reader(conn.fileno())
        conn.close()

    async def _first_line(self, reader: asyncio.StreamReader) -> bytes | None:
        """The client's first non-blank line, ``b""`` if it left, ``None`` if it said nothing in time."""
        try:
            async with asyncio.timeout(self._hello_timeout):
                while True:
                    line = await reader.readline()
                    if line.strip() or not line:
                        return line
        except TimeoutError:
            return None

    async def _answer_lines(self, client: _Client, reader: asyncio.StreamReader) -> None:
        """Read the client's later lines until it leaves, answering each with an error."""
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                await self._close_with_error(client, f"line longer than {_MAX_CLIENT_LINE} bytes; closing")
                return
            if not line:
                return
            if not line.strip():
                continue
            try:
                message = _parse_line(line)
                if message.get("type") == HELLO:
                    raise _ProtocolError("hello is accepted only as the first line")
                raise _ProtocolError(f"unknown message type {message.get('type')!r}")
            except _ProtocolError as exc:
                self._offer(client, None, _error_line(str(exc)))

    async def _close_with_error(self, client: _Client, message: str) -> None:
        client.writer.write(_error_line(message))
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(self._write_timeout):
                await client.writer.drain()

    async def _send(self, client: _Client, said_hello: bool, since: int | None) -> None:
        """Write the welcome and backlog (after a hello), then live lines, until dropped."""
        try:
            if said_hello:
                await self._send_backlog(client, since)
            while True:
                batch = []
                while client.queue:
                    seq, line = client.queue.popleft()
                    if seq is None:  # an error line
                        batch.append(line)
                    elif seq > client.sent_seq:
                        batch.append(line)
                        client.sent_seq = seq
                if batch:
                    await self._write_lines(client, batch)
                else:
                    client.wakeup.clear()
                    client.idle = True
                    try:
                        await client.wakeup.wait()
                    finally:
                        client.idle = False
        except _Stalled:
            self._drop(client, f"its socket accepted nothing for {self._write_timeout} s")
        except ConnectionError:
            self._drop(client, "it went away")
        except LedgerError as exc:
            self._drop(client, f"its backlog could not be read: {exc}")

    async def _send_backlog(self, client: _Client, since: int | None) -> None:
        """Welcome the client, then send the kept events from its ``since`` up to where its queue starts."""
        if since is None:
            await self._write(client, _encode({"type": WELCOME, "since": client.sent_seq}))
            return
        with self._backlog.reading():
            page = await self._backlog.page(since)
            if since > page.last_seq:  # a position from another ledger: start over
                since = 0
                page = await self._backlog.page(since)
            client.sent_seq = since
            await self._write(client, _encode({"type": WELCOME, "since": since}))
            while True:
                lines = [page.pruned] if page.pruned is not None else []
                for seq, line in page.lines:
                    if seq > client.registered_at:
                        break  # its queue has the rest: stop here, or a busy daemon keeps the backlog growing
                    lines.append(line)
                    client.sent_seq = seq
                await self._write_lines(client, lines)
                if not page.lines or page.lines[-1][0] >= client.registered_at:
                    return
                # A short page is where the log ended when it was read: the next read has what came since.
                page = await self._backlog.page(page.lines[-1][0])

    async def _write_lines(self, client: _Client, lines: list[bytes]) -> None:
        """Write lines in batches of about :data:`_WRITE_BATCH` bytes, each taken by the socket before the next."""
        batch: list[bytes] = []
        size = 0
        for line in lines:
            batch.append(line)
            size += len(line)
            if size >= _WRITE_BATCH:
                await self._write(client, b"".join(batch))
                batch, size = [], 0
        if batch:
            await self._write(client, b"".join(batch))

    async def _write(self, client: _Client, data: bytes) -> None:
        client.writer.write(data)
        transport = client.writer.transport
        if not transport.get_write_buffer_size() and not transport.is_closing():
            return  # the socket took it all: nothing to wait for (and no timer to arm, once per line per client)
        try:
            async with asyncio.timeout(self._write_timeout):
                await client.writer.drain()
        except TimeoutError:
            raise _Stalled from None

    # -- plumbing ----------------------------------------------------------------

    async def _ledger_call(self, function: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    def _remove_own_socket_file(self) -> None:
        """Remove the socket file, unless it is gone or another server's by now."""
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._socket_id:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the sidebar socket %s: %s", self.path, exc.strerror)


def _parse_line(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, too deep, or a 5000-digit integer
        raise _ProtocolError(f"not a JSON line: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise _ProtocolError(f"expected a JSON object, got {type(message).__name__}")
    return message


def _hello_since(message: dict[str, Any]) -> int | None:
    """The ``since`` of a hello message (``None``: live only)."""
    if message.get("type") != HELLO:
        raise _ProtocolError(f"expected a hello first, got message type {message.get('type')!r}; sending live events")
    since = message.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or not 0 <= since <= _MAX_SEQ):
        raise _ProtocolError(f"since must be an integer from 0 to 2**63-1 or null, got {since!r}; sending live events")
    return since


def _error_line(message: str) -> bytes:
    return _encode({"type": ERROR, "error": message})


def _pruned_line(page: EventPage) -> bytes:
    assert page.first_seq is not None
    first, last = page.after_seq + 1, page.first_seq - 1
    return _encode(
        {
            "type": PRUNED,
            "payload": {
                "fromSeq": first,
                "toSeq": last,
                "message": f"events {first} to {last} were pruned from the ledger before they could be sent",
            },
        }
    )


# -- binding -----------------------------------------------------------------------


def _bind_private_socket(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at ``path``, mode 0600 from the moment the path exists, and its file's id.

    The socket is bound in a fresh 0700 folder beside ``path``, made 0600, and
    hard-linked into place (which, unlike a rename, never replaces whatever
    appeared at ``path`` meanwhile). Changing the umask instead would affect
    files other threads create at the same time.
    """
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise DisplaySocketError(
            f"the sidebar socket path {path} is {len(os.fsencode(path))} bytes long;"
            f" Unix sockets allow {_MAX_SOCKET_PATH}: use a shorter root"
        )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _remove_stale_socket(path)
        # "." + 8 random characters + "/s" is no longer than "display.sock".
        private_dir = tempfile.mkdtemp(prefix=".", dir=path.parent)
    except OSError as exc:
        raise DisplaySocketError(f"cannot create the sidebar socket {path}: {exc.strerror or exc}") from exc
    private_path = os.path.join(private_dir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(private_path)
        os.chmod(private_path, 0o600)
        sock.listen(128)  # before it is reachable: a connect must never look stale
        info = os.stat(private_path)
        os.link(private_path, path)
    except FileExistsError:
        sock.close()
        raise DisplaySocketInUseError(f"{path} appeared while the sidebar socket was being created") from None
    except OSError as exc:
        sock.close()
        raise DisplaySocketError(f"cannot create the sidebar socket {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(private_path)
        os.rmdir(private_dir)
    return sock, (info.st_dev, info.st_ino)


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket nobody answers on (left by a crash); refuse anything else."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return
    finding = check_file(path, "socket")  # a symlink, a file, another user's socket: never replaced
    if finding is not None:
        raise UntrustedPath(finding)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        log.info("removing the stale sidebar socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        pass  # alive, with a full accept queue
    except OSError as exc:
        raise DisplaySocketError(f"cannot check whether {path} is in use: {exc.strerror or exc}") from exc
    finally:
        probe.close()
    raise DisplaySocketInUseError(f"another process is serving the sidebar socket {path}")
