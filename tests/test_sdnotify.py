"""The systemd notify protocol against real AF_UNIX datagram sockets, as systemd listens."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from materializer.sdnotify import Notifier, run_watchdog

DEADLINE = 20.0  # seconds; a deadline against hangs, never a performance threshold


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a short path (socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as folder:
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(path)
            server.settimeout(DEADLINE)
            yield server, path


def test_each_message_arrives_as_one_datagram(listener: tuple[socket.socket, str]) -> None:
    server, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.ready("following jobs since 12:00")
    assert notifier.status("auth_required: sign in to Stella")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.stopping("finishing 2 downloads")
    notifier.close()
    assert [server.recv(4096) for _ in range(6)] == [
        b"READY=1",
        b"READY=1\nSTATUS=following jobs since 12:00",
        b"STATUS=auth_required: sign in to Stella",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"STOPPING=1\nSTATUS=finishing 2 downloads",
    ]


def test_a_status_cannot_smuggle_other_assignments(listener: tuple[socket.socket, str]) -> None:
    server, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.status("bad name\nREADY=1\r\nERRNO=5")
    assert server.recv(4096) == b"STATUS=bad name READY=1 ERRNO=5"


def test_the_process_environment_is_read_by_default(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier().ready()
    assert server.recv(4096) == b"READY=1"


def test_an_abstract_socket_name() -> None:
    name = f"materializer-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(DEADLINE)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert server.recv(4096) == b"READY=1"


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert notifier.watchdog_interval() is None
    assert Notifier().watchdog_interval() is None


def test_an_unusable_notify_socket_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="materializer.sdnotify"):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert "ignoring NOTIFY_SOCKET 'vsock:2:1234'" in caplog.text


def test_a_failing_send_never_raises_and_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.DEBUG, logger="materializer.sdnotify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.status("still here")
    warnings = [record for record in caplog.records if record.name == "materializer.sdnotify"]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/notify", **environ}).watchdog_interval() == interval


async def test_the_watchdog_loop_keeps_pinging_from_the_event_loop(listener: tuple[socket.socket, str]) -> None:
    server, path = listener
    server.setblocking(False)
    loop = asyncio.get_running_loop()
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    pinger = asyncio.create_task(run_watchdog(notifier))
    try:
        pings = [await asyncio.wait_for(loop.sock_recv(server, 4096), DEADLINE) for _ in range(5)]
        assert pings == [b"WATCHDOG=1"] * 5
        assert not pinger.done()
    finally:
        pinger.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pinger


async def test_the_watchdog_loop_ends_at_once_when_nobody_watches(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    await asyncio.wait_for(run_watchdog(Notifier({"NOTIFY_SOCKET": path})), DEADLINE)
    await asyncio.wait_for(run_watchdog(Notifier({})), DEADLINE)
