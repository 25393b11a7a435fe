"""Resources under hostile sizes: memory, download slots and the sidebar socket, before and after their bounds.

    python bench/resources.py [huge] [outputs] [sidebar] [--memory-limit-mb N] [--edge N] [--outputs N]
                              [--clients N] [--jobs N] [--rounds N] [--env KEY=VALUE ...] [--json]

Each scenario runs a real ``materializer run`` process against the local backend on loopback and
prints its figures (``--json``: one JSON object). No goal, no floor: these are the before/after
figures of issue 13 ("Never stall"), parts 2 and 8, measured the same way on any checkout.

``huge``     8 jobs of one 10000x10000 PNG each (about 1.75 MB, inside every image limit; ``--edge``
             changes the size), then 3 normal jobs: the daemon's peak RSS (``VmHWM``), and the time
             until all 11 are settled.
             With ``--memory-limit-mb N`` the daemon runs in a child cgroup limited to N MB (no
             swap); it is restarted after each OOM kill, up to 5 times, and the kills are counted.
``outputs``  one job with ``--outputs`` (3000) outputs (the same small PNG), then a normal job: how
             long the normal job waited, and what became of the big one.
``sidebar``  a 300-job burst (``--jobs``) with no sidebar client, then another while ``--clients``
             (1000) clients connect with ``since=0``, ``--rounds`` (3) times, interleaved with bursts
             alone: how much longer, and how much more daemon CPU, a burst with a crowd takes than
             the bursts alone beside it (medians), the daemon's peak RSS, and what the clients got
             (welcomed or refused; every event once, in seq order); then the daemon's CPU seconds for
             a crowd alone (connecting and catching up, no burst), the steadiest figure.

``--env`` passes daemon settings (``MATERIALIZER_DAEMON__MAX_OUTPUTS_PER_JOB=3000``, say) to the
daemon; a checkout that does not know a key refuses to start (exit code 2), which is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import re
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from materializer.layout import default_layout
from stella_devbackend import imaging
from stella_devbackend.control import DevBackend
from stella_devbackend.harness import CgroupUnavailable, DaemonProcess, MemoryCgroup

from benchkit import QUIET_DAEMON, cpu_seconds, proc_memory_kib, scratch_backend

HUGE_EDGE = 10_000
HUGE_JOBS = 8
NORMAL_JOBS = 3
MAX_RESTARTS = 5
_SEQ = re.compile(rb'^\{"seq":(\d+),')


def _ledger(root: Path) -> sqlite3.Connection | None:
    path = default_layout(root).ledger
    if not path.exists():
        return None
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)


def statuses(root: Path, job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """job id -> (status, quarantine reason) for the jobs the ledger has."""
    conn = _ledger(root)
    if conn is None:
        return {}
    try:
        marks = ",".join("?" * len(job_ids))
        rows = conn.execute(f"SELECT job_id, status, last_error FROM jobs WHERE job_id IN ({marks})",
                            job_ids).fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()
    return {job_id: (status, reason) for job_id, status, reason in rows}


def settled(root: Path, job_ids: list[str]) -> bool:
    found = statuses(root, job_ids)
    return len(found) == len(job_ids) and all(status != "pending" for status, _ in found.values())


async def wait(predicate: Callable[[], bool], timeout: float, daemon: DaemonProcess | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if daemon is not None and daemon.process is not None and daemon.process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def serve(backend: DevBackend, name: str, data: bytes) -> str:
    (backend.data_dir / "files" / name).write_bytes(data)
    return f"{backend.url}/files/{name}"


def image_job(backend: DevBackend, urls: list[str], prompt: str) -> str:
    [job_id] = backend.create_jobs(prompt=prompt, output={"images": [
        {"url": url, "content_type": "image/png"} for url in urls]})
    return job_id


def daemon_for(root: Path, backend: DevBackend, env: dict[str, str], cgroup: MemoryCgroup | None = None
               ) -> DaemonProcess:
    return DaemonProcess(root, backend, env={**QUIET_DAEMON, **env}, cgroup=cgroup)


def peak_mb(daemon: DaemonProcess) -> float | None:
    with contextlib.suppress(OSError):
        return proc_memory_kib(daemon.pid)["VmHWM"] * 1024 / 1e6
    return None


# -- huge ----------------------------------------------------------------------------------------


async def huge(folder: Path, backend: DevBackend, env: dict[str, str], limit_mb: int | None, edge: int
               ) -> dict[str, Any]:
    data = await asyncio.to_thread(imaging.render, "huge", edge, edge, "png")
    small = imaging.render("normal", 256, 256, "png")
    cgroup = None
    if limit_mb is not None:
        try:
            cgroup = MemoryCgroup.create(limit_mb * 1_000_000, "materializer-bench")
        except CgroupUnavailable as exc:
            return {"skipped": str(exc)}
    root = folder / "huge-root"
    figures: dict[str, Any] = {"png_bytes": len(data), "edge": edge, "memory_limit_mb": limit_mb}
    try:
        daemon = daemon_for(root, backend, env, cgroup).start()
        await asyncio.sleep(1.0)  # connected and idle
        idle = proc_memory_kib(daemon.pid)["VmRSS"] * 1024 / 1e6
        started = time.monotonic()
        jobs = [image_job(backend, [serve(backend, f"huge{n}.png", data)], f"huge {n}") for n in range(HUGE_JOBS)]
        jobs += [image_job(backend, [serve(backend, f"small{n}.png", small)], f"normal {n}")
                 for n in range(NORMAL_JOBS)]
        restarts, peaks = 0, []
        while True:
            done = await wait(lambda: settled(root, jobs), 600, daemon)
            peaks.append(peak_mb(daemon) if daemon.process and daemon.process.poll() is None else None)
            if done or restarts >= MAX_RESTARTS:
                break
            if daemon.process is not None and daemon.process.poll() is None:
                break  # timed out while alive
            restarts += 1
            daemon = daemon_for(root, backend, env, cgroup).start()
        figures.update({
            "idle_rss_mb": round(idle, 1),
            "peak_rss_mb": max((p for p in peaks if p is not None), default=None),
            "seconds": round(time.monotonic() - started, 1),
            "restarts": restarts,
            "last_exit_code": daemon.process.returncode if daemon.process else None,
            "materialized": sum(s == "materialized" for s, _ in statuses(root, jobs).values()),
            "jobs": len(jobs),
        })
        figures["peak_rss_mb"] = figures["peak_rss_mb"] and round(figures["peak_rss_mb"], 1)
        daemon.stop()
        if cgroup is not None:
            figures["oom_kills"] = cgroup.oom_kills()
            peak = cgroup.peak_bytes()
            figures["cgroup_peak_mb"] = None if peak is None else round(peak / 1e6, 1)
    finally:
        if cgroup is not None:
            cgroup.remove()
    return figures


# -- outputs -------------------------------------------------------------------------------------


async def outputs(folder: Path, backend: DevBackend, env: dict[str, str], count: int) -> dict[str, Any]:
    small = imaging.render("output", 256, 256, "png")
    root = folder / "outputs-root"
    with daemon_for(root, backend, env) as daemon:
        await asyncio.sleep(1.0)
        big = image_job(backend, [serve(backend, "many.png", small)] * count, "many outputs")
        # The normal job comes once the daemon has the big one, as in the issue.
        await wait(lambda: bool(statuses(root, [big])), 30, daemon)
        normal = image_job(backend, [serve(backend, "normal.png", small)], "normal")
        created = time.monotonic()
        await wait(lambda: statuses(root, [normal]).get(normal, ("pending",))[0] != "pending", 600, daemon)
        waited = time.monotonic() - created
        await wait(lambda: settled(root, [big]), 600, daemon)
        found = statuses(root, [big, normal])
    return {"outputs": count, "normal_job_waited_s": round(waited, 2), "normal_job": found.get(normal, ("?",))[0],
            "big_job": found.get(big, ("?",))[0], "big_job_reason": found.get(big, (None, None))[1]}


# -- sidebar -------------------------------------------------------------------------------------


class Client:
    """One sidebar client with ``since=0``: the seqs it received, and the error line if it was refused."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.welcomed = False
        self.error: str | None = None
        self.broken: str | None = None
        self.closed = False

    async def run(self, path: Path) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
        except OSError as exc:
            self.error = f"connect: {exc}"
            return
        try:
            writer.write(b'{"type": "hello", "since": 0}\n')
            async for line in reader:
                match = _SEQ.match(line)
                if match is not None:
                    self.seqs.append(int(match[1]))
                elif b'"welcome"' in line:
                    self.welcomed = True
                elif b'"error"' in line:
                    self.error = json.loads(line).get("error")
        except OSError as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
        finally:
            self.closed = True
            writer.transport.abort()


async def _crowd_only(root: Path, clients: int, daemon: DaemonProcess) -> float:
    """The daemon's CPU seconds while a crowd connects with since=0 and catches up, nothing else going on."""
    conn = _ledger(root)
    assert conn is not None
    last = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    conn.close()
    crowd = [Client() for _ in range(clients)]
    cpu = cpu_seconds(daemon.pid)
    tasks = [asyncio.create_task(client.run(default_layout(root).display_socket)) for client in crowd]
    await wait(lambda: all(client.closed or client.seqs[-1:] == [last] for client in crowd), 300)
    used = cpu_seconds(daemon.pid) - cpu
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return used


def _all_reached(clients: list[Client], seq: int) -> bool:
    return all(client.seqs[-1:] == [seq] for client in clients)


async def _burst(root: Path, backend: DevBackend, jobs: int, prompt: str, daemon: DaemonProcess
                 ) -> tuple[float, float]:
    """Seconds until a burst of jobs is settled, and the daemon's CPU seconds meanwhile."""
    started, cpu = time.monotonic(), cpu_seconds(daemon.pid)
    ids = await asyncio.to_thread(backend.create_jobs, count=jobs, prompt=prompt, share_files=True)
    await wait(lambda: settled(root, ids), 900, daemon)
    return time.monotonic() - started, cpu_seconds(daemon.pid) - cpu


async def sidebar(folder: Path, backend: DevBackend, env: dict[str, str], clients: int, jobs: int, rounds: int
                  ) -> dict[str, Any]:
    """Bursts alone and with a fresh crowd connecting as each starts, interleaved (alone, crowd, alone, ...,
    alone): each crowd burst is compared with the mean of the alone bursts on either side of it, since
    every burst finds a longer ledger and gallery than the one before (medians of the ratios reported)."""
    root = folder / "sidebar-root"
    alone: list[tuple[float, float]] = []
    crowded: list[tuple[float, float]] = []
    crowds: list[dict[str, Any]] = []
    with daemon_for(root, backend, env) as daemon:
        await asyncio.sleep(1.0)
        await _burst(root, backend, jobs, "before", daemon)  # the ledger holds a history to catch up on
        peak_alone = peak_mb(daemon)
        alone.append(await _burst(root, backend, jobs, "alone", daemon))
        for number in range(rounds):
            peak_alone = peak_mb(daemon)
            crowd = [Client() for _ in range(clients)]
            tasks = [asyncio.create_task(client.run(default_layout(root).display_socket)) for client in crowd]
            crowded.append(await _burst(root, backend, jobs, f"crowd {number}", daemon))
            conn = _ledger(root)
            assert conn is not None
            last = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
            conn.close()
            welcomed = [client for client in crowd if client.welcomed]
            await wait(functools.partial(_all_reached, welcomed, last), 300)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            crowds.append({
                "welcomed": len(welcomed), "refused": sum(client.error is not None for client in crowd),
                "never_connected_or_dropped": sum(not client.welcomed and client.error is None for client in crowd),
                "every_event_once_in_order": sum(client.seqs == list(range(1, last + 1)) for client in welcomed),
                "events": last, "errors": sorted({client.error for client in crowd if client.error})[:2]
                + sorted({client.broken for client in crowd if client.broken})[:2]})
            alone.append(await _burst(root, backend, jobs, f"alone {number}", daemon))
        crowd_only = [await _crowd_only(root, clients, daemon) for _ in range(rounds)]
        peak_crowd = peak_mb(daemon)
    neighbours = [((alone[n][0] + alone[n + 1][0]) / 2, (alone[n][1] + alone[n + 1][1]) / 2) for n in range(rounds)]
    return {
        "clients": clients, "jobs_per_burst": jobs, "rounds": rounds,
        "slowdown": round(statistics.median(c / a for (c, _), (a, _) in zip(crowded, neighbours, strict=True)), 3),
        "cpu_ratio": round(statistics.median(c / a for (_, c), (_, a) in zip(crowded, neighbours, strict=True)), 3),
        "daemon_cpu_per_crowd_without_a_burst_s": round(statistics.median(crowd_only), 3),
        "bursts_alone_s": [round(wall, 2) for wall, _ in alone],
        "bursts_with_clients_s": [round(wall, 2) for wall, _ in crowded],
        "daemon_cpu_alone_s": [round(cpu, 2) for _, cpu in alone],
        "daemon_cpu_with_clients_s": [round(cpu, 2) for _, cpu in crowded],
        "peak_rss_before_crowds_mb": peak_alone and round(peak_alone, 1),
        "peak_rss_after_crowds_mb": peak_crowd and round(peak_crowd, 1),
        "crowds": crowds,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", default=[], help="huge, outputs, sidebar (default: all)")
    parser.add_argument("--memory-limit-mb", type=int)
    parser.add_argument("--edge", type=int, default=HUGE_EDGE)
    parser.add_argument("--outputs", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    report: dict[str, Any] = {}
    for name in args.scenarios or ["huge", "outputs", "sidebar"]:
        print(f"resources: {name} ...", file=sys.stderr, flush=True)
        with scratch_backend(f"resources-{name}") as (folder, backend):
            if name == "huge":
                report[name] = await huge(folder, backend, env, args.memory_limit_mb, args.edge)
            elif name == "outputs":
                report[name] = await outputs(folder, backend, env, args.outputs)
            else:
                report[name] = await sidebar(folder, backend, env, args.clients, args.jobs, args.rounds)
        if not args.json:
            print(f"{name}: {json.dumps(report[name])}", flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
