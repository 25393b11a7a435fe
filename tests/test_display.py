"""The sidebar socket server and ``materializer watch``, over real Unix sockets and a real ledger."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from materializer.display import (
    TOO_MANY_CLIENTS,
    DisplayServer,
    DisplaySocketError,
    DisplaySocketInUseError,
    encode_event,
)
from materializer.layout import UntrustedPath, default_layout
from materializer.ledger import Event, Ledger
from materializer.watch import format_event, run_watch

from helpers import async_wait_until

DEADLINE = 20.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: pytest's tmp_path can exceed AF_UNIX's 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="disp", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ledger(short_dir: Path) -> Iterator[Ledger]:
    with Ledger(short_dir / "m.db") as opened:
        yield opened


@pytest.fixture
def sock_path(short_dir: Path) -> Path:
    return default_layout(short_dir).display_socket



@pytest.fixture
async def start_server(sock_path: Path, ledger: Ledger) -> AsyncIterator[Callable[..., Any]]:
    """Starts DisplayServers on the test's socket (closing them all at the end)."""
    started: list[DisplayServer] = []

    async def start(**options: Any) -> DisplayServer:
        options.setdefault("poll_interval", None)
        server = DisplayServer(options.pop("path", sock_path), options.pop("ledger", ledger), **options)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


def append(ledger: Ledger, count: int = 1, **payload: Any) -> list[Event]:
    return [ledger.append_event("materializer.state", {"state": "connected", **payload}) for _ in range(count)]


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition until it holds (the deadline only turns a hang into a failure)."""
    await async_wait_until(condition, DEADLINE)


class Peer:
    """A raw sidebar client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> Peer:
        return cls(*await asyncio.open_unix_connection(path, limit=1 << 24))

    async def send(self, message: Any) -> None:
        self.writer.write(message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n")
        await self.writer.drain()

    async def hello(self, since: int | None) -> dict[str, Any]:
        await self.send({"type": "hello", "since": since})
        welcome = await self.recv()
        assert welcome["type"] == "welcome"
        return welcome

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(DEADLINE):
            line = await self.reader.readline()
        assert line.endswith(b"\n"), f"connection ended: {line!r}"
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def recv_seqs_until(self, last_seq: int) -> list[int]:
        seqs: list[int] = []
        while not seqs or seqs[-1] < last_seq:
            seqs.append((await self.recv())["seq"])
        return seqs

    async def read_to_end(self) -> bytes:
        async with asyncio.timeout(DEADLINE):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.transport.abort()


# -- the socket file ---------------------------------------------------------------


async def test_socket_is_private_and_nothing_else_is_left(start_server: Any, sock_path: Path) -> None:
    await start_server()
    info = os.lstat(sock_path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
    assert os.listdir(sock_path.parent) == ["display.sock"]  # the private bind folder is gone


async def test_stale_socket_is_replaced(start_server: Any, sock_path: Path, ledger: Ledger) -> None:
    sock_path.parent.mkdir(parents=True)
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(sock_path))
    crashed.close()  # the file stays behind, nobody answers
    os.chmod(sock_path, 0o755)

    server = await start_server()
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
    peer = await Peer.connect(sock_path)
    await peer.hello(None)
    [event] = append(ledger)
    server.publish(event)
    assert (await peer.recv())["seq"] == event.seq
    peer.close()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink to a socket", "dangling symlink"])
async def test_anything_but_a_socket_is_refused(kind: str, sock_path: Path, ledger: Ledger, short_dir: Path) -> None:
    sock_path.parent.mkdir(parents=True)
    if kind == "file":
        sock_path.write_text("precious")
    elif kind == "directory":
        sock_path.mkdir()
    elif kind == "symlink to a socket":
        target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target.bind(str(short_dir / "t.sock"))
        target.close()
        sock_path.symlink_to(short_dir / "t.sock")
    else:
        sock_path.symlink_to(short_dir / "missing")
    before = os.lstat(sock_path)

    problem = "is a symlink .*; refusing to follow it" if "symlink" in kind else "is not a socket; move it away"
    with pytest.raises(UntrustedPath, match=problem):
        await DisplayServer(sock_path, ledger).start()

    after = os.lstat(sock_path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind == "file":
        assert sock_path.read_text() == "precious"
    assert sorted(os.listdir(sock_path.parent)) == ["display.sock"]


async def test_a_live_daemon_is_not_displaced(start_server: Any, sock_path: Path, ledger: Ledger) -> None:
    first = await start_server()
    with pytest.raises(DisplaySocketInUseError, match="another process is serving"):
        await DisplayServer(sock_path, ledger).start()

    peer = await Peer.connect(sock_path)
    await peer.hello(None)
    [event] = append(ledger)
    first.publish(event)
    assert (await peer.recv())["seq"] == event.seq
    peer.close()


async def test_too_long_a_path_is_refused_clearly(ledger: Ledger, short_dir: Path) -> None:
    path = short_dir / ("d" * 100) / "display.sock"
    with pytest.raises(DisplaySocketError, match="Unix sockets allow 107"):
        await DisplayServer(path, ledger).start()
    assert not path.parent.exists()


async def test_close_disconnects_clients_and_removes_only_its_own_socket(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    first = await start_server()
    peer = await Peer.connect(sock_path)
    await peer.hello(None)
    await first.close()
    assert await peer.read_to_end() == b""
    peer.close()
    assert not sock_path.exists()

    second = await start_server()
    os.unlink(sock_path)  # someone removed it; a third server took the path
    third = await start_server()
    await second.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    peer = await Peer.connect(sock_path)
    await peer.hello(None)
    [event] = append(ledger)
    third.publish(event)
    assert (await peer.recv())["seq"] == event.seq
    peer.close()


# -- resuming ----------------------------------------------------------------------


async def test_hello_gets_the_backlog_then_live_events(start_server: Any, sock_path: Path, ledger: Ledger) -> None:
    old = append(ledger, 5)
    server = await start_server()
    peer = await Peer.connect(sock_path)

    assert await peer.hello(2) == {"type": "welcome", "since": 2}
    for event in old[2:]:
        assert await peer.recv() == {"seq": event.seq, "type": event.type, "payload": event.payload}
    [new] = append(ledger, prompt="ünïcode")
    server.publish(new)
    assert await peer.recv() == {"seq": new.seq, "type": "materializer.state", "payload": new.payload}
    peer.close()


async def test_hello_without_since_gets_live_events_from_the_welcome_on(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    append(ledger, 3)
    server = await start_server()
    peer = await Peer.connect(sock_path)
    await peer.send({"type": "hello"})
    assert await peer.recv() == {"type": "welcome", "since": 3}
    [event] = append(ledger)
    server.publish(event)
    assert (await peer.recv())["seq"] == 4
    peer.close()


async def test_backlog_switches_to_live_without_hole_or_duplicate(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    """Clients say hello while events are being committed and published, backlogs spanning pages."""
    append(ledger, 1200)
    server = await start_server(max_queue=100_000)
    published: list[int] = []

    async def publisher() -> None:
        for index in range(600):
            [event] = await asyncio.to_thread(append, ledger, 1, index=index)
            server.publish(event)
            published.append(event.seq)

    async def client(since: int | None, after_published: int) -> tuple[int, list[int]]:
        await wait_until(lambda: len(published) >= after_published)
        peer = await Peer.connect(sock_path)
        welcome = await peer.hello(since)
        await wait_until(lambda: len(published) == 600)
        seqs = await peer.recv_seqs_until(published[-1]) if welcome["since"] < published[-1] else []
        peer.close()
        return welcome["since"], seqs

    # (since, connect once this many are published)
    plans = [(0, 0), (700, 50), (1199, 120), (0, 200), (None, 250), (1300, 300), (5, 420), (None, 599)]
    publishing = asyncio.create_task(publisher())
    results = await asyncio.gather(*(client(since, after) for since, after in plans))
    await publishing
    for (since, _), (welcome_since, seqs) in zip(plans, results, strict=True):
        if since is not None:
            assert welcome_since == since
        assert seqs == list(range(welcome_since + 1, 1801)), f"client since={since}"


async def test_a_client_ahead_of_what_was_published_gets_nothing_twice(
    start_server: Any, sock_path: Path, ledger: Ledger, short_dir: Path
) -> None:
    """The client's since is past the server's last published seq (it read those from the ledger)."""
    server = await start_server()
    with Ledger(short_dir / "m.db") as other_process:
        append(other_process, 3)
    peer = await Peer.connect(sock_path)
    assert await peer.hello(2) == {"type": "welcome", "since": 2}
    [fourth] = append(ledger)
    server.publish(fourth)  # brings 1..3 from the ledger too
    assert [(await peer.recv())["seq"] for _ in range(2)] == [3, 4]
    peer.close()


async def test_pruned_events_are_reported_before_the_rest(start_server: Any, sock_path: Path, short_dir: Path) -> None:
    with Ledger(short_dir / "small.db", event_cap=3) as small:
        append(small, 10)
        await start_server(ledger=small)
        peer = await Peer.connect(sock_path)
        await peer.hello(2)
        notice = await peer.recv()
        assert notice["type"] == "materializer.pruned"
        assert "seq" not in notice
        assert (notice["payload"]["fromSeq"], notice["payload"]["toSeq"]) == (3, 7)
        assert [(await peer.recv())["seq"] for _ in range(3)] == [8, 9, 10]
        peer.close()


async def test_a_position_from_another_ledger_starts_over(start_server: Any, sock_path: Path, ledger: Ledger) -> None:
    append(ledger, 3)
    await start_server()
    peer = await Peer.connect(sock_path)
    assert await peer.hello(500) == {"type": "welcome", "since": 0}
    assert [(await peer.recv())["seq"] for _ in range(3)] == [1, 2, 3]
    peer.close()


async def test_without_hello_a_client_gets_live_events_from_when_it_connected(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    append(ledger, 2)
    server = await start_server(hello_timeout=0.05)
    peer = await Peer.connect(sock_path)
    await wait_until(lambda: server.client_count == 1)
    [event] = append(ledger)
    server.publish(event)
    assert await peer.recv() == {"seq": 3, "type": event.type, "payload": event.payload}
    peer.close()


# -- publishing --------------------------------------------------------------------


async def test_events_skipped_by_publish_are_read_from_the_ledger_in_order(
    start_server: Any, sock_path: Path, ledger: Ledger, short_dir: Path
) -> None:
    server = await start_server()
    peer = await Peer.connect(sock_path)
    await peer.hello(None)
    with Ledger(short_dir / "m.db") as other_process:
        [by_replay] = append(other_process, state="replayed")
    first, second = append(ledger, 2)
    server.publish(second)
    server.publish(first)
    server.publish(second)
    [third] = append(ledger)
    server.publish(third)
    assert [(await peer.recv())["seq"] for _ in range(4)] == [by_replay.seq, first.seq, second.seq, third.seq]
    assert second.seq == by_replay.seq + 2
    peer.close()


async def test_events_committed_by_another_process_reach_clients(
    start_server: Any, sock_path: Path, short_dir: Path
) -> None:
    await start_server(poll_interval=0.01)
    peer = await Peer.connect(sock_path)
    await peer.hello(None)
    with Ledger(short_dir / "m.db") as other_process:
        [event] = append(other_process, state="replayed")
    assert await peer.recv() == {"seq": event.seq, "type": "materializer.state", "payload": event.payload}
    peer.close()


async def test_many_clients_each_get_every_event_in_order(start_server: Any, sock_path: Path, ledger: Ledger) -> None:
    server = await start_server()
    peers = [await Peer.connect(sock_path) for _ in range(30)]
    for peer in peers:
        await peer.hello(None)
    events = append(ledger, 50)
    for event in events:
        server.publish(event)
    for peer in peers:
        assert await peer.recv_seqs_until(events[-1].seq) == [event.seq for event in events]
        peer.close()


async def test_a_crowd_catching_up_on_a_long_backlog_gets_every_event_once_in_order(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    """Backlogs longer than the pages kept for sharing, read by many clients from several places while live
    events are published: each client gets exactly the events after its since, in seq order."""
    append(ledger, 2500, pad="p" * 200)
    server = await start_server(max_queue=100_000)
    sinces = [0] * 30 + [1234] * 10 + [2499] * 5
    peers = [await Peer.connect(sock_path) for _ in sinces]
    for peer, since in zip(peers, sinces, strict=True):
        await peer.send({"type": "hello", "since": since})
    live = append(ledger, 60)
    for event in live:
        server.publish(event)
        await asyncio.sleep(0)  # interleave with the catch-ups
    for peer, since in zip(peers, sinces, strict=True):
        assert await peer.recv() == {"type": "welcome", "since": since}
        assert await peer.recv_seqs_until(live[-1].seq) == list(range(since + 1, live[-1].seq + 1))
        peer.close()


async def test_a_client_that_stops_reading_its_backlog_is_dropped_and_holds_no_one_back(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    append(ledger, 3000, pad="p" * 400)  # about 1.4 MB of backlog: more than a socket buffers
    server = await start_server(write_timeout=0.2, max_queue=100_000)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:  # a raw socket: nothing reads it ahead
        stuck.setblocking(False)
        await loop.sock_connect(stuck, str(sock_path))
        await loop.sock_sendall(stuck, b'{"type": "hello", "since": 0}\n')
        reader = await Peer.connect(sock_path)
        await reader.hello(0)
        assert await reader.recv_seqs_until(3000) == list(range(1, 3001))
        await wait_until(lambda: server.client_count == 1)  # the stuck one is gone, the reader is not
        reader.close()
        received = b""
        async with asyncio.timeout(DEADLINE):
            while chunk := await loop.sock_recv(stuck, 1 << 16):  # what the kernel buffered, then the end
                received += chunk
    assert 0 < received.count(b"\n") < 3001


async def test_a_client_over_the_cap_gets_the_error_line_then_the_end(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    server = await start_server(max_clients=2)
    first, second = await Peer.connect(sock_path), await Peer.connect(sock_path)
    await first.hello(None)
    await second.hello(None)
    third = await Peer.connect(sock_path)
    await third.send({"type": "hello", "since": 0})  # sent before reading: the line still arrives
    assert await third.recv() == {
        "type": "error", "code": TOO_MANY_CLIENTS,
        "error": "too many sidebar clients: 2 are connected, the limit (daemon.max_sidebar_clients); try again later"}
    assert await third.read_to_end() == b""
    third.close()
    silent = await Peer.connect(sock_path)  # says nothing at all: refused the same way
    assert (await silent.recv())["code"] == TOO_MANY_CLIENTS
    silent.close()

    first.close()
    await wait_until(lambda: server.client_count == 1)
    fourth = await Peer.connect(sock_path)
    assert await fourth.hello(None) == {"type": "welcome", "since": 0}
    [event] = append(ledger)
    server.publish(event)
    assert (await second.recv())["seq"] == (await fourth.recv())["seq"] == event.seq
    second.close()
    fourth.close()


async def test_a_flood_of_connections_over_the_cap_leaves_the_clients_served(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    server = await start_server(max_clients=1)
    kept = await Peer.connect(sock_path)
    await kept.hello(None)
    flood = []
    for _ in range(300):  # more than are kept waiting for their close: the rest are closed at once
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # a full accept queue: the kernel refuses
            sock.connect(str(sock_path))
        flood.append(sock)
    events = append(ledger, 5)
    for event in events:
        server.publish(event)
    assert await kept.recv_seqs_until(events[-1].seq) == [event.seq for event in events]
    for sock in flood:
        sock.close()
    assert server.client_count == 1
    kept.close()


async def test_watch_waits_while_the_daemon_has_all_the_clients_it_takes(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    server = await start_server(max_clients=1)
    holder = await Peer.connect(sock_path)
    await holder.hello(None)
    task, out, err = await _run_watch(sock_path, 0, as_json=True)
    await wait_until(lambda: err.getvalue().count("\n") >= 1)
    assert err.getvalue() == ("materializer watch: the daemon is busy: too many sidebar clients: 1 are connected, the "
                              "limit (daemon.max_sidebar_clients); try again later; trying again\n")
    [early] = append(ledger)
    server.publish(early)
    holder.close()
    [late] = append(ledger)
    server.publish(late)  # the watch gets it live or from the ledger, whichever its next try meets
    await wait_until(lambda: out.getvalue().count("\n") == 2)
    await _stop(task)
    assert out.getvalue() == encode_event(early).decode() + encode_event(late).decode()
    assert err.getvalue().count("busy") == 1  # said once, however many tries it took


async def _publish_past_a_stuck_client(server: DisplayServer, sock_path: Path, ledger: Ledger) -> tuple[bytes, int]:
    """Publish big events one by one while one client reads and another never does."""
    stuck = await Peer.connect(sock_path)
    await stuck.hello(None)
    reader = await Peer.connect(sock_path)
    await reader.hello(None)
    count = 0
    while server.client_count == 2:
        [event] = append(ledger, pad="x" * 32_768)
        server.publish(event)  # synchronous: it cannot wait for anyone
        count += 1
        assert (await reader.recv())["seq"] == event.seq
    more = append(ledger, 3)
    for event in more:
        server.publish(event)
    assert await reader.recv_seqs_until(more[-1].seq) == [event.seq for event in more]
    received = await stuck.read_to_end()  # what the kernel buffered, then the end
    stuck.close()
    reader.close()
    return received, count + len(more)


async def test_a_client_that_falls_behind_is_dropped(start_server: Any, sock_path: Path, ledger: Ledger) -> None:
    server = await start_server(max_queue=4, write_timeout=600)
    received, published = await _publish_past_a_stuck_client(server, sock_path, ledger)
    assert received.count(b"\n") < published


async def test_a_client_whose_socket_stalls_is_dropped(start_server: Any, sock_path: Path, ledger: Ledger) -> None:
    server = await start_server(max_queue=1_000_000, write_timeout=0.05)
    received, published = await _publish_past_a_stuck_client(server, sock_path, ledger)
    assert received.count(b"\n") < published


async def test_a_dropped_client_resumes_with_since(start_server: Any, sock_path: Path, ledger: Ledger) -> None:
    server = await start_server(max_queue=4, write_timeout=600)
    received, published = await _publish_past_a_stuck_client(server, sock_path, ledger)
    lines = received.split(b"\n")
    last_seen = json.loads(lines[-2])["seq"]  # the last complete line
    peer = await Peer.connect(sock_path)
    await peer.hello(last_seen)
    assert await peer.recv_seqs_until(published) == list(range(last_seen + 1, published + 1))
    peer.close()


# -- malformed input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_line", "error"),
    [
        (b"not json\n", "not a JSON line"),
        (b"\xff\xfe\n", "not a JSON line"),
        (b'{"type": "hello", "since": ' + b"1" * 5000 + b"}\n", "not a JSON line"),
        (b"[" * 30_000 + b"]" * 30_000 + b"\n", "not a JSON line"),
        (b"[1, 2]\n", "expected a JSON object, got list"),
        (b'{"type": "subscribe"}\n', "expected a hello first"),
        (b'{"type": "hello", "since": -1}\n', "since must be an integer from 0"),
        (b'{"type": "hello", "since": "3"}\n', "since must be an integer from 0"),
        (b'{"type": "hello", "since": true}\n', "since must be an integer from 0"),
        (b'{"type": "hello", "since": 1.5}\n', "since must be an integer from 0"),
        (b'{"type": "hello", "since": 18446744073709551616}\n', "since must be an integer from 0"),
    ],
)
async def test_a_bad_first_line_gets_an_error_then_live_events(
    first_line: bytes, error: str, start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    append(ledger, 2)
    server = await start_server()
    peer = await Peer.connect(sock_path)
    await peer.send(first_line)
    answer = await peer.recv()
    assert answer["type"] == "error"
    assert error in answer["error"]
    [event] = append(ledger)
    server.publish(event)
    assert (await peer.recv())["seq"] == event.seq
    peer.close()


async def test_later_lines_get_errors_and_change_nothing(start_server: Any, sock_path: Path, ledger: Ledger) -> None:
    server = await start_server()
    peer = await Peer.connect(sock_path)
    await peer.hello(0)
    for line, error in [
        (b"}{\n", "not a JSON line"),
        (b'"hello"\n', "expected a JSON object, got str"),
        (b'{"type": "hello", "since": 0}\n', "hello is accepted only as the first line"),
        (b'{"type": "bogus"}\n', "unknown message type 'bogus'"),
    ]:
        await peer.send(line)
        answer = await peer.recv()
        assert answer["type"] == "error"
        assert error in answer["error"]
    await peer.send(b"\n\n")  # blank lines are ignored
    [event] = append(ledger)
    server.publish(event)
    assert await peer.recv() == {"seq": event.seq, "type": event.type, "payload": event.payload}
    peer.close()


async def test_an_overlong_line_gets_an_error_and_the_connection_closed(
    start_server: Any, sock_path: Path, ledger: Ledger
) -> None:
    server = await start_server()
    peer = await Peer.connect(sock_path)
    await peer.send(b"x" * 100_000)
    answer = await peer.recv()
    assert answer["type"] == "error"
    assert "line longer than" in answer["error"]
    assert await peer.read_to_end() == b""
    peer.close()

    other = await Peer.connect(sock_path)  # the server is unaffected
    await other.hello(None)
    [event] = append(ledger)
    server.publish(event)
    assert (await other.recv())["seq"] == event.seq
    other.close()


# -- materializer watch ------------------------------------------------------------


async def _run_watch(
    sock_path: Path, since: int | None, as_json: bool
) -> tuple[asyncio.Task[int], io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    task = asyncio.create_task(run_watch(sock_path, since, as_json, out, err=err, max_retry_delay=0.05))
    return task, out, err


async def _stop(task: asyncio.Task[int]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watch_resumes_across_a_daemon_restart_without_duplicates(
    sock_path: Path, ledger: Ledger
) -> None:
    events = append(ledger, 3)
    first = DisplayServer(sock_path, ledger, poll_interval=None)
    await first.start()
    task, out, err = await _run_watch(sock_path, 0, as_json=True)
    await wait_until(lambda: out.getvalue().count("\n") == 3)
    live = append(ledger, 2)
    for event in live:
        first.publish(event)
    await wait_until(lambda: out.getvalue().count("\n") == 5)

    await first.close()
    while_down = append(ledger, 2)
    second = DisplayServer(sock_path, ledger, poll_interval=None)
    await second.start()
    [after] = append(ledger)
    second.publish(after)
    await wait_until(lambda: out.getvalue().count("\n") == 8)
    await _stop(task)
    await second.close()

    expected = [encode_event(event).decode() for event in [*events, *live, *while_down, after]]
    assert out.getvalue() == "".join(expected)
    assert "reconnecting" in err.getvalue()


async def test_watch_waits_for_the_daemon_and_prints_only_new_events(sock_path: Path, ledger: Ledger) -> None:
    append(ledger, 3)
    sock_path.parent.mkdir(parents=True)
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(sock_path))
    crashed.close()

    task, out, err = await _run_watch(sock_path, None, as_json=False)
    await wait_until(lambda: "waiting for the materializer daemon" in err.getvalue())
    server = DisplayServer(sock_path, ledger, poll_interval=None)
    await server.start()
    await wait_until(lambda: server.client_count == 1)
    [event] = append(ledger, state="auth_required", action="Open Stella and sign in.")
    server.publish(event)
    await wait_until(lambda: out.getvalue().count("\n") == 1)

    await server.close()  # a restart: what is committed meanwhile is printed after it
    [while_down] = append(ledger, state="disconnected")
    server = DisplayServer(sock_path, ledger, poll_interval=None)
    await server.start()
    await wait_until(lambda: out.getvalue().count("\n") == 2)
    await _stop(task)
    await server.close()

    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d #4 materializer\.state auth_required: Open Stella and sign in\.", lines[0])
    assert re.fullmatch(r"\d\d:\d\d:\d\d #5 materializer\.state disconnected", lines[1])
    assert while_down.seq == 5


async def test_watch_gives_up_when_the_daemon_refuses_it(sock_path: Path) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"type": "error", "error": "since must be \\u001b[31m odd"}\n')
        await writer.drain()
        writer.close()

    sock_path.parent.mkdir(parents=True)
    async with await asyncio.start_unix_server(refuse, path=sock_path):
        out, err = io.StringIO(), io.StringIO()
        assert await run_watch(sock_path, 3, True, out, err=err) == 1
    assert out.getvalue() == ""
    assert "the daemon refused the request: since must be \\x1b[31m odd" in err.getvalue()


async def test_watch_gives_up_on_an_unusable_path(short_dir: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert await run_watch(short_dir / ("d" * 200), None, False, out, err=err) == 1
    assert "cannot connect to" in err.getvalue()


def test_readable_lines() -> None:
    at = datetime(2024, 5, 1, 14, 3, 7)
    materialized = {
        "seq": 42,
        "type": "media.materialized",
        "payload": {
            "kind": "media",
            "asset": {"kind": "image", "filePaths": ["/o/job_a_0.png", "/my outputs/job_a_1.webp"]},
            "jobId": "job_a",
            "capability": "text_to_image",
            "prompt": "a cat",
            "createdAt": 1714567890000,
        },
    }
    assert (
        format_event(materialized, at)
        == "14:03:07 #42 media.materialized job_a (text_to_image) /o/job_a_0.png '/my outputs/job_a_1.webp'"
    )
    failed = {
        "seq": 43,
        "type": "media.failed",
        "payload": {"jobId": "job_b", "capability": "icon", "message": "policy"},
    }
    assert format_event(failed, at) == "14:03:07 #43 media.failed job_b (icon): policy"
    gap = {"seq": 44, "type": "materializer.state", "payload": {"state": "gap", "fromMs": 1, "untilMs": 2}}
    assert format_event(gap, at) == '14:03:07 #44 materializer.state gap {"fromMs":1,"untilMs":2}'
    pruned = {
        "type": "materializer.pruned",
        "payload": {"fromSeq": 1, "toSeq": 2, "message": "events 1 to 2 were pruned"},
    }
    assert format_event(pruned, at) == "14:03:07 - materializer.pruned events 1 to 2 were pruned"
    hostile = {"seq": 45, "type": "media.failed", "payload": {"jobId": "job_\x1b]0;pwned\x07", "message": "a\nb\u202e"}}
    assert format_event(hostile, at) == "14:03:07 #45 media.failed job_\\x1b]0;pwned\\x07: a\\nb\\u202e"
