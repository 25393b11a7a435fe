"""``materializer gallery`` over HTTP: who may look, what it serves, and the live stream's ``since`` resume.

Real sockets on loopback, a real ledger made by the daemon and ``replay`` against the local backend.
(The page itself, in a real browser: ``test_gallery_browser.py``.)
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_daemon_pipeline import FAST, wait_materialized

from materializer.gallery_server import GalleryServer, parse_range, parse_request
from materializer.gallery_view import daemon_view, event_message, sse_frame
from materializer.layout import default_layout
from materializer.ledger import Event, Ledger, LedgerError
from materializer.options import DaemonOptions
from materializer.replay import replay
from materializer.tokens import StaticTokenProvider
from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend
from stella_devbackend.harness import clean_env

from helpers import async_wait_until, running_daemon

# -- the pure parts ----------------------------------------------------------------------------------------------


def test_request_heads_are_parsed_strictly() -> None:
    request = parse_request(b"GET /s/api/events?since=4 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nLast-Event-ID: 7\r\n\r\n")
    assert (request.method, request.path, request.query["since"], request.headers["last-event-id"]) == (
        "GET", "/s/api/events", ["4"], "7")
    assert request.keep_alive
    for bad in (b"GET http://evil/ HTTP/1.1\r\n\r\n", b"GET / HTTP/2\r\n\r\n", b"GET /\r\n\r\n",
                b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "GET /\u00e9 HTTP/1.1\r\n\r\n".encode()):
        with pytest.raises(ValueError):
            parse_request(bad)


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 100, None), ("bytes=0-", 100, (0, 99)), ("bytes=10-19", 100, (10, 19)), ("bytes=90-500", 100, (90, 99)),
    ("bytes=-30", 100, (70, 99)), ("bytes=-500", 100, (0, 99)), ("bytes=0-1,5-6", 100, None), ("items=0-1", 100, None),
    ("bytes=x-y", 100, None),
])
def test_single_byte_ranges_are_honoured(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=50-10", "bytes=-0"])
def test_a_range_outside_the_file_is_unsatisfiable(header: str) -> None:
    with pytest.raises(ValueError):
        parse_range(header, 100)


def test_events_become_the_pages_messages() -> None:
    job = {"jobId": "j1", "files": []}
    materialized = Event(5, "media.materialized", {"kind": "media", "jobId": "j1"}, 10.0)
    assert event_message(materialized, lambda job_id: job if job_id == "j1" else None) == ("job", job)
    assert event_message(materialized, lambda _: None) == ("noop", {})
    failed = Event(6, "media.failed", {"jobId": "j2", "message": "Image request was blocked"}, 11.5)
    assert event_message(failed, lambda _: None) == (
        "failed", {"jobId": "j2", "message": "Image request was blocked", "notedAt": 11500.0})
    state = Event(7, "materializer.state", {"state": "auth_required", "action": "Sign in."}, 12.0)
    assert event_message(state, lambda _: None) == ("state", {"state": "auth_required", "action": "Sign in.",
                                                              "at": 12000.0})
    frame = sse_frame("job", {"prompt": "two\nlines </script>\n\nid: 99"}, event_id=5)
    assert frame.count(b"\n\n") == 1 and frame.endswith(b"\n\n")  # a prompt cannot end or forge a frame
    assert frame.startswith(b"id: 5\nevent: job\ndata: {")


def test_the_daemon_runs_when_its_pid_lives_and_it_did_not_say_it_stopped() -> None:
    alive = {41}.__contains__
    assert daemon_view({"pid": 41}, {"state": "connected"}, alive) == {"running": True, "pid": 41}
    assert daemon_view({"pid": 41}, {"state": "stopped"}, alive) == {"running": False, "pid": None}
    assert daemon_view({"pid": 42}, {"state": "connected"}, alive) == {"running": False, "pid": None}
    assert daemon_view(None, None, alive) == {"running": False, "pid": None}
    assert daemon_view({"pid": True}, None, lambda _: True)["running"] is False


def test_a_read_only_ledger_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "materializer.db"
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(path, read_only=True)
    assert not path.exists()
    with Ledger(path) as writer:
        writer.append_event("materializer.state", {"state": "connected"})
    with Ledger(path, read_only=True) as reader:
        assert reader.last_seq() == 1
        with pytest.raises(LedgerError, match="readonly"):
            reader.append_event("materializer.state", {"state": "connected"})


# -- the server ---------------------------------------------------------------------------------------------------


@pytest.fixture
async def made(backend: DevBackend, tmp_path: Path) -> AsyncIterator[tuple[Path, list[str]]]:
    """A root whose daemon materialized three jobs (two images each) and noted a failed one, then stopped."""
    root = tmp_path / "root"
    jobs = backend.create_jobs(count=3, images=2)
    backend.create_jobs(count=1, status="failed", message="The provider refused the prompt.")
    async with running_daemon(root, backend, **FAST) as daemon:
        await wait_materialized(daemon, jobs)
        await async_wait_until(lambda: daemon.ledger.status().failed_jobs_noted == 1, what="the failed job")
    yield root, jobs


@pytest.fixture
async def server(made: tuple[Path, list[str]]) -> AsyncIterator[GalleryServer]:
    gallery = GalleryServer(default_layout(made[0]), poll_interval=0.05)
    await gallery.start()
    yield gallery
    await gallery.close()


async def test_the_gallery_of_a_stopped_daemon_lists_what_is_on_disk(server: GalleryServer,
                                                                      made: tuple[Path, list[str]]) -> None:
    root, jobs = made
    ledger_bytes = default_layout(root).ledger.read_bytes()
    async with httpx.AsyncClient() as http:
        snapshot = (await http.get(server.url + "api/snapshot")).json()
        assert snapshot["daemon"] == {"running": False, "pid": None}
        assert snapshot["connection"]["state"] == "stopped"
        assert {job["jobId"] for job in snapshot["jobs"]} == set(jobs)
        completed = [job["completedAt"] for job in snapshot["jobs"]]
        assert completed == sorted(completed, reverse=True)  # newest first
        [failed] = snapshot["failed"]
        assert (failed["message"], failed["detail"]) == ("Image generation failed", "The provider refused the prompt.")
        assert snapshot["seq"] >= 4
        job = snapshot["jobs"][0]
        assert [f["index"] for f in job["files"]] == [0, 1]
        for file in job["files"]:
            assert file["thumbnail"] == file["name"].replace(".png", ".webp")
            full = await http.get(server.url + "files/" + file["name"])
            assert full.status_code == 200 and full.headers["content-type"] == "image/png"
            assert full.content == (default_layout(root).outputs / file["name"]).read_bytes()
            thumb = await http.get(server.url + "thumbs/" + file["thumbnail"])
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
            assert thumb.headers["x-content-type-options"] == "nosniff"
        page = await http.get(server.url)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for asset in ("gallery.js", "gallery.css", "favicon.svg"):
            assert (await http.get(server.url + asset)).status_code == 200
    assert default_layout(root).ledger.read_bytes() == ledger_bytes  # read, never written


async def test_nothing_is_served_without_the_secret(server: GalleryServer, made: tuple[Path, list[str]]) -> None:
    origin = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient() as http:
        snapshot = (await http.get(server.url + "api/snapshot")).json()
        name = snapshot["jobs"][0]["files"][0]["name"]
        wrong = server.secret[:-1] + ("A" if not server.secret.endswith("A") else "B")
        for path in ("/", "/api/snapshot", f"/files/{name}", "/favicon.ico", f"/{wrong}/", f"/{wrong}/files/{name}",
                     f"/{server.secret[:8]}/", f"/{server.secret}x/"):
            answer = await http.get(origin + path)
            assert answer.status_code == 403, path
            assert name.encode() not in answer.content
        assert (await http.post(origin + "/api/snapshot")).status_code == 403
        # The secret from another site's page, reaching us through DNS rebinding: its Host gives it away.
        rebound = await http.get(server.url + "api/snapshot", headers={"Host": f"evil.example:{server.port}"})
        assert rebound.status_code == 403
        assert (await http.get(server.url.replace("127.0.0.1", "localhost"))).status_code == 200
        # Behind the secret: only reads, only files directly in outputs and .thumbs, never through a symlink.
        assert (await http.post(server.url + "api/snapshot")).status_code == 405
        secret_file = made[0] / "private.txt"
        secret_file.write_text("not for the page")
        outputs = default_layout(made[0]).outputs
        (outputs / "planted.png").symlink_to(secret_file)
        (outputs / ".thumbs" / "planted.webp").symlink_to(secret_file)
        for path in ("files/planted.png", "thumbs/planted.webp", "files/..%2Fmaterializer.db", "files/.thumbs",
                     "files/%2e%2e", "thumbs/..%2f" + name,
                     "files/gallery.jsonx", "nope", f"files/{name}/x"):
            assert (await http.get(server.url + path)).status_code == 404, path


async def test_files_are_served_in_ranges_for_media_elements(server: GalleryServer,
                                                             made: tuple[Path, list[str]]) -> None:
    root, _ = made
    async with httpx.AsyncClient() as http:
        name = (await http.get(server.url + "api/snapshot")).json()["jobs"][0]["files"][0]["name"]
        data = (default_layout(root).outputs / name).read_bytes()
        part = await http.get(server.url + "files/" + name, headers={"Range": "bytes=10-19"})
        assert (part.status_code, part.content, part.headers["content-range"]) == (
            206, data[10:20], f"bytes 10-19/{len(data)}")
        tail = await http.get(server.url + "files/" + name, headers={"Range": "bytes=-5"})
        assert tail.content == data[-5:]
        beyond = await http.get(server.url + "files/" + name, headers={"Range": f"bytes={len(data)}-"})
        assert (beyond.status_code, beyond.headers["content-range"]) == (416, f"bytes */{len(data)}")
        head = await http.head(server.url + "files/" + name)
        assert (head.status_code, head.headers["content-length"], head.content) == (200, str(len(data)), b"")


class Stream:
    """A client of the gallery's event stream: the frames it received, parsed."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.frames: list[dict[str, Any]] = []
        self._lines = response.aiter_lines()

    async def until(self, condition: Any, timeout: float = 20.0) -> None:
        frame: dict[str, Any] = {}
        async with asyncio.timeout(timeout):
            while not condition(self.frames):
                line = await anext(self._lines)
                if line == "":
                    if "event" in frame:
                        self.frames.append(frame)
                    frame = {}
                elif not line.startswith(":") and ":" in line:
                    key, value = line.split(":", 1)
                    frame[key] = json.loads(value) if key == "data" else value.strip()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame["event"] == name]


async def test_the_stream_resumes_where_the_page_left_off_while_replay_runs(
    backend: DevBackend, server: GalleryServer, made: tuple[Path, list[str]]
) -> None:
    """Events ``replay`` writes reach a listening page; a page that reconnects with ``Last-Event-ID``
    gets exactly what it missed: no gap, no duplicate."""
    root, jobs = made
    options = DaemonOptions(root=root, convex_url=backend.url, **FAST)
    async with httpx.AsyncClient(timeout=30.0) as http:
        seq = (await http.get(server.url + "api/snapshot")).json()["seq"]
        async with http.stream("GET", server.url + f"api/events?since={seq}") as response:
            assert response.headers["content-type"] == "text/event-stream"
            stream = Stream(response)
            await stream.until(lambda frames: any(f["event"] == "daemon" for f in frames))
            assert stream.named("daemon")[0]["data"] == {"running": False, "pid": None}
            first = backend.create_jobs(count=2)
            running = asyncio.create_task(replay(options, StaticTokenProvider(backend.token), since=0, until=None,
                                                 job_ids=[], dry_run=False, out=io.StringIO()))
            await stream.until(lambda frames: len([f for f in frames if f["event"] == "job"]) == 2)
            assert (await running)[0] == 0
            jobs_seen = stream.named("job")
            assert sorted(f["data"]["jobId"] for f in jobs_seen) == sorted(first)
            assert all(f["data"]["files"][0]["thumbnail"] for f in jobs_seen)
            last_id = int(jobs_seen[-1]["id"])
            assert sorted(int(f["id"]) for f in jobs_seen) == [last_id - 1, last_id]
        # The page sleeps; more jobs land; it wakes and reconnects as EventSource does.
        second = backend.create_jobs(count=3)
        code, _ = await replay(options, StaticTokenProvider(backend.token), since=0, until=None, job_ids=[],
                               dry_run=False, out=io.StringIO())
        assert code == 0
        async with http.stream("GET", server.url + f"api/events?since={seq}",
                               headers={"Last-Event-ID": str(last_id)}) as response:
            stream = Stream(response)
            await stream.until(lambda frames: len([f for f in frames if f["event"] == "job"]) >= 3)
            resumed = stream.named("job")
            assert sorted(f["data"]["jobId"] for f in resumed) == sorted(second)
            assert [int(f["id"]) for f in resumed] == list(range(last_id + 1, last_id + 4))
        # A position this ledger never handed out (another root's): the page is told to start over.
        async with http.stream("GET", server.url + "api/events?since=999999") as response:
            stream = Stream(response)
            await stream.until(lambda frames: any(f["event"] == "reload" for f in frames))
        assert (await http.get(server.url + "api/events?since=-1")).status_code == 400
    assert set(jobs).isdisjoint(f["data"]["jobId"] for f in resumed)


async def test_a_root_without_a_ledger_yet_shows_an_empty_gallery_and_creates_nothing(tmp_path: Path) -> None:
    layout = default_layout(tmp_path / "root")
    gallery = GalleryServer(layout)
    await gallery.start()
    try:
        async with httpx.AsyncClient() as http:
            snapshot = (await http.get(gallery.url + "api/snapshot")).json()
    finally:
        await gallery.close()
    assert (snapshot["ledger"], snapshot["jobs"], snapshot["daemon"]["running"]) == (False, [], False)
    assert not (tmp_path / "root").exists()


def test_only_loopback_addresses(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "192.168.1.2", "example.com", "::"):
        with pytest.raises(ValueError, match="loopback"):
            GalleryServer(default_layout(tmp_path), host=host)
    refused = forkserver.run([sys.executable, "-m", "materializer", "gallery", "--root", str(tmp_path),
                              "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60, env=clean_env())
    assert refused.returncode == 2 and "loopback" in refused.stderr


def test_the_command_prints_its_url_once_and_stops_on_sigterm(made: tuple[Path, list[str]]) -> None:
    root, jobs = made
    command = [sys.executable, "-m", "materializer", "gallery", "--root", str(root), "--port", "0"]
    with forkserver.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                          stdin=subprocess.DEVNULL) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+/[A-Za-z0-9_-]{32}/)$", line.strip())
            assert match, line
            snapshot = httpx.get(match.group(1) + "api/snapshot").json()
            assert {job["jobId"] for job in snapshot["jobs"]} == set(jobs)
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert out == ""  # the URL was printed once
