"""Bounded resources end to end: memory, download slots, outputs per job and the sidebar socket.

Against the local backend, with the daemon as a real process where its memory or its socket is
what is measured (peak RSS is ``VmHWM`` of the daemon's own ``/proc`` entry), and in this event
loop where the ledger is looked into. What is asserted is what happens, never how fast: every
honest job materialized, the memory a budget allows, the order in which jobs got their slots, the
reason recorded, each sidebar client's events. The long cases (a real memory-limited cgroup, a
crowd of a thousand clients) are in tests/test_chaos.py.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from materializer.display import TOO_MANY_CLIENTS
from materializer.layout import default_layout
from materializer.ledger import Ledger
from materializer.options import DaemonOptions
from materializer.store import PARTIAL_PREFIX
from stella_devbackend.control import DevBackend

from helpers import (
    DaemonProcess,
    async_wait_until,
    blank_png,
    ledger_events,
    ledger_jobs,
    output_files,
    partial_files,
    running_daemon,
    wait_until,
)

BUDGET = DaemonOptions.memory_budget_bytes  # the default, as the daemon runs with it
CAP = DaemonOptions.max_outputs_per_job


def serve(backend: DevBackend, name: str, data: bytes) -> str:
    """A URL on the backend's own origin serving exactly ``data``."""
    (backend.data_dir / "files" / name).write_bytes(data)
    return f"{backend.url}/files/{name}"


def image_job(backend: DevBackend, urls: list[str], prompt: str = "resources") -> str:
    [job_id] = backend.create_jobs(prompt=prompt, output={"images": [
        {"url": url, "content_type": "image/png"} for url in urls]})
    return job_id


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (the peak) of a process, in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return {key: int(value.split()[0]) for key, value in fields.items()}


def materialized(root: Path, job_ids: list[str]) -> bool:
    jobs = ledger_jobs(root)
    return all(jobs.get(job_id) == "materialized" for job_id in job_ids)


def done_at_least(root: Path, job_ids: list[str], count: int) -> bool:
    """Whether at least ``count`` of the jobs are materialized."""
    jobs = ledger_jobs(root)
    return sum(jobs.get(job_id) == "materialized" for job_id in job_ids) >= count


def dimensions(root: Path, job_id: str) -> list[tuple[int | None, int | None]]:
    with Ledger(default_layout(root).ledger) as ledger:
        return [(output.width, output.height) for output in ledger.outputs(job_id)]


def run_until_settled(root: Path, backend: DevBackend, env: dict[str, str], huge: bytes, count: int
                      ) -> tuple[int, int, list[str]]:
    """Start the daemon, warm it up on one normal job, then give it ``count`` jobs of ``huge`` and two normal
    ones; return its RSS once warm and its peak afterwards (bytes), and the huge jobs."""
    normal = small_png()
    with DaemonProcess(root, backend, env=env) as daemon:
        warm = image_job(backend, [serve(backend, "warm.png", normal)])
        wait_until(lambda: materialized(root, [warm]), what="the first job")
        warm_rss = memory_kib(daemon.pid)["VmRSS"]
        huge_jobs = [image_job(backend, [serve(backend, f"huge{n}.png", huge)]) for n in range(count)]
        normal_jobs = [image_job(backend, [serve(backend, f"normal{n}.png", normal)]) for n in range(2)]
        wait_until(lambda: materialized(root, huge_jobs + normal_jobs), timeout=120, what="every job")
        peak = memory_kib(daemon.pid)["VmHWM"]
        daemon.check_alive()
    return warm_rss * 1024, peak * 1024, huge_jobs


# -- memory ------------------------------------------------------------------------------------------


def test_huge_pngs_within_every_limit_materialize_in_bounded_memory(backend: DevBackend, tmp_path: Path) -> None:
    """8 PNGs of 10000 x 10000 (400 MB decoded each, the limit): on a machine-sized budget four decoded at
    once took 1.5 GB; over the budget each is checked row by row, and the daemon stays within it."""
    root = tmp_path / "root"
    warm, peak, huge_jobs = run_until_settled(root, backend, {}, blank_png(10_000, 10_000), 8)
    assert peak - warm < BUDGET, f"peak RSS {peak / 1e6:.0f} MB over {warm / 1e6:.0f} MB when warm"
    assert all(dimensions(root, job) == [(10_000, 10_000)] for job in huge_jobs)
    assert not partial_files(root)


def test_full_decodes_wait_for_their_share_of_the_memory_budget(backend: DevBackend, tmp_path: Path) -> None:
    """Images that fit the budget one at a time (35 MB decoded each, a 64 MiB budget) are decoded one at a time:
    four download slots would otherwise decode four at once."""
    root = tmp_path / "root"
    budget = 64 * 1024 * 1024
    warm, peak, huge_jobs = run_until_settled(root, backend, {"MATERIALIZER_DAEMON__MEMORY_BUDGET_BYTES": str(budget)},
                                              blank_png(3600, 2400), 6)
    assert peak - warm <= budget, f"peak RSS {peak / 1e6:.0f} MB over {warm / 1e6:.0f} MB when warm"
    assert all(dimensions(root, job) == [(3600, 2400)] for job in huge_jobs)


# -- outputs per job and download slots -----------------------------------------------------------------


async def test_a_job_with_more_outputs_than_the_cap_is_quarantined_with_its_count(
        backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    url = serve(backend, "many.png", small_png())
    async with running_daemon(root, backend) as daemon:
        big = image_job(backend, [url] * (CAP + 1))
        normal = image_job(backend, [url])
        await async_wait_until(lambda: (job := daemon.ledger.job(big)) and job.status != "pending")
        await async_wait_until(lambda: (job := daemon.ledger.job(normal)) and job.status == "materialized")
        job = daemon.ledger.job(big)
        assert job is not None and job.status == "quarantined"
        assert job.last_error == f"job has {CAP + 1} outputs; the limit is {CAP} (max_outputs_per_job)"
    assert not [name for name in output_files(root) if name.startswith(big)]
    [state] = [e.payload for e in ledger_events(root, "materializer.state") if e.payload.get("jobId") == big]
    assert state == {"state": "quarantined", "jobId": big, "reason": job.last_error}


async def test_the_output_cap_is_a_setting_applied_live(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    url = serve(backend, "many.png", small_png())
    async with running_daemon(root, backend) as daemon:
        refused = image_job(backend, [url] * (CAP + 6))
        await async_wait_until(lambda: (job := daemon.ledger.job(refused)) and job.status == "quarantined")
        daemon.apply_live(DaemonOptions(root=root, convex_url=backend.url, max_outputs_per_job=CAP + 6))
        big = image_job(backend, [url] * (CAP + 6))
        await async_wait_until(lambda: (job := daemon.ledger.job(big)) and job.status == "materialized")
    assert len([name for name in output_files(root) if name.startswith(big)]) == CAP + 6


async def test_a_normal_job_gets_a_slot_while_a_job_with_many_outputs_holds_the_others(
        backend: DevBackend, tmp_path: Path) -> None:
    """Every output of the big job stalls mid-body (a CDN that stops sending): it holds all the slots it may,
    one fewer than there are, and the normal job created after it goes through the one left."""
    root = tmp_path / "root"
    stalled = serve(backend, "stalls.png", small_png())
    backend.set_faults([{"kind": "stall", "match": "/files/stalls.png", "fraction": 0.5}])
    async with running_daemon(root, backend, read_timeout=600.0, total_timeout=900.0) as daemon:
        big = image_job(backend, [stalled] * CAP)

        def downloading() -> int:  # the big job's temporary files (the gallery's come and go too)
            return sum(name.startswith(f"{PARTIAL_PREFIX}{big}_") for name in partial_files(root))

        await async_wait_until(lambda: downloading() == daemon.options.download_concurrency - 1,
                               what="the big job's downloads under way")
        normal = image_job(backend, [serve(backend, "normal.png", small_png())])
        await async_wait_until(lambda: (job := daemon.ledger.job(normal)) and job.status == "materialized",
                               what="the normal job")
        job = daemon.ledger.job(big)
        assert job is not None and job.status == "pending" and job.attempts == 0
        assert downloading() == daemon.options.download_concurrency - 1


# -- the sidebar socket ------------------------------------------------------------------------------------


class Client:
    """A sidebar client: says hello with ``since`` and keeps every line it reads."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.ended = False

    async def run(self, socket_path: Path, since: int | None) -> None:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=1 << 24)
        try:
            writer.write(json.dumps({"type": "hello", "since": since}).encode() + b"\n")
            async for line in reader:
                self.lines.append(json.loads(line))
        except ConnectionError:
            pass
        finally:
            self.ended = True
            writer.transport.abort()

    @property
    def seqs(self) -> list[int]:
        return [line["seq"] for line in self.lines if "seq" in line]


def announced(client: Client, job_ids: set[str]) -> bool:
    """Whether the client has read a ``media.materialized`` event for each of the jobs."""
    return {line["payload"]["jobId"] for line in client.lines if line.get("type") == "media.materialized"} >= job_ids


async def connected(daemon: DaemonProcess, since: int | None = 0) -> tuple[Client, asyncio.Task[None]]:
    """A client of the daemon's socket, once the socket is there."""
    path = default_layout(daemon.root).display_socket
    await async_wait_until(path.exists, what="the sidebar socket")
    client = Client()
    task = asyncio.create_task(client.run(path, since))
    await async_wait_until(lambda: client.lines or client.ended, what="a first line")
    return client, task


async def test_sidebar_clients_over_the_cap_are_refused_with_an_error_line(
        backend: DevBackend, tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "root", backend, env={"MATERIALIZER_DAEMON__MAX_SIDEBAR_CLIENTS": "2"}) as daemon:
        clients = [await connected(daemon) for _ in range(2)]
        assert all(client.lines[0]["type"] == "welcome" for client, _ in clients)
        refused, _ = await connected(daemon)
        await async_wait_until(lambda: refused.ended, what="the refused client's end")
        assert refused.lines == [{
            "type": "error", "code": TOO_MANY_CLIENTS,
            "error": "too many sidebar clients: 2 are connected, the limit (daemon.max_sidebar_clients); "
                     "try again later"}]
        jobs = backend.create_jobs(count=5)
        for client, _ in clients:
            await async_wait_until(functools.partial(announced, client, set(jobs)), what="every job on each client")
        for _, task in clients:
            task.cancel()
        daemon.check_alive()
    assert "refusing sidebar clients: 2 are connected" in daemon.log.read_text()


async def test_clients_catching_up_during_a_burst_get_every_event_once_in_seq_order(
        backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    cap = DaemonOptions.max_sidebar_clients
    with DaemonProcess(root, backend) as daemon:
        jobs = backend.create_jobs(count=120)
        clients = []
        for number in range(cap):  # they connect while the burst is materialized, each with since=0
            await async_wait_until(functools.partial(done_at_least, root, jobs, number * 60 // cap), timeout=60,
                                   what="progress")
            clients.append(await connected(daemon))
        over = [await connected(daemon) for _ in range(3)]
        await async_wait_until(lambda: materialized(root, jobs), timeout=60, what="the burst")
        last = ledger_events(root)[-1].seq
        await async_wait_until(lambda: all(client.seqs[-1:] == [last] for client, _ in clients), timeout=60,
                               what="every client caught up")
        for _, task in clients:
            task.cancel()
        daemon.check_alive()
    for client, _ in clients:
        assert client.lines[0] == {"type": "welcome", "since": 0}
        assert client.seqs == list(range(1, last + 1))
    assert all(client.lines and client.lines[0].get("code") == TOO_MANY_CLIENTS for client, _ in over)
