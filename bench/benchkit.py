"""What every benchmark shares: results, percentiles, the daemon as a process, a sidebar client, /proc.

Benchmarks run against the local backend (``materializer dev-backend``) on
loopback, each in a fresh temporary folder. The daemon runs as a real
``python -m materializer run`` process, as in production, and is observed
from outside: through its sidebar socket (events, timed where a sidebar would
see them) and ``/proc/<pid>`` (memory and CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from materializer.convex.http import ConvexHttpClient
from materializer.layout import default_layout
from materializer.queries import succeeded_pages
from stella_devbackend.control import DevBackend
from stella_devbackend.harness import DaemonProcess, clean_env

__all__ = [
    "BenchResult",
    "DaemonProcess",
    "Metric",
    "OfficialPush",
    "Sidebar",
    "backend_for",
    "clean_env",
    "cpu_seconds",
    "daemon_process",
    "decode",
    "distribution",
    "durable_write",
    "fetch_decode_durable",
    "fetch_decode_write",
    "percentile",
    "proc_memory_kib",
    "succeeded_docs",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- results -------------------------------------------------------------------------------------


@dataclass
class Metric:
    """One figure of ours beside its floor; ``ratio`` is ours / floor (None when there is no floor)."""

    label: str
    unit: str
    ours: float
    floor: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.floor is None or self.floor <= 0:
            return None
        return self.ours / self.floor

    def as_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "ours": _round(self.ours), "floor": _round(self.floor),
                "ratio": _round(self.ratio, 3)}


@dataclass
class BenchResult:
    """What one benchmark found: headline metrics, the goal and whether it was met, details, notes."""

    name: str
    goal: str
    goal_met: bool
    metrics: list[Metric]
    floor: str
    """What the floor is, in words."""
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "goal": self.goal,
            "goal_met": self.goal_met,
            "floor": self.floor,
            "metrics": {metric.label: metric.as_json() for metric in self.metrics},
            "details": _rounded(self.details),
            "notes": self.notes,
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def percentile(values: Iterable[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` 0.99 is p99); the largest value for small samples."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def distribution(values: list[float]) -> dict[str, float]:
    """p50, p95, p99, mean and max of a sample."""
    return {"p50": percentile(values, 0.50), "p95": percentile(values, 0.95), "p99": percentile(values, 0.99),
            "mean": statistics.fmean(values), "max": max(values), "n": len(values)}


# -- the backend ---------------------------------------------------------------------------------


#: Benchmarks hold one token for their whole run, which can outlast the real five minutes.
BENCH_TOKEN_TTL = 6 * 3600.0


def backend_for(folder: Path) -> DevBackend:
    """A local backend in ``folder`` whose jobs finish as soon as they are drawn (no job delay).

    With the page query, so that replaying thousands of jobs measures materializing them, not the
    real backend's 200-job window (which the tests cover).
    """
    return DevBackend.start(folder / "backend", extra_args=["--job-delay", "0"], extensions=["page-query"],
                            token_ttl=BENCH_TOKEN_TTL)


@contextlib.contextmanager
def scratch_backend(name: str) -> Iterator[tuple[Path, DevBackend]]:
    """A temporary folder for one benchmark and a backend living in it, both gone afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as folder, backend_for(Path(folder)) as backend:
        yield Path(folder), backend


async def succeeded_docs(backend: DevBackend, since_ms: float) -> dict[str, dict[str, Any]]:
    """Every succeeded job completed after ``since_ms``, by job id (the gap-free page query)."""
    docs: dict[str, dict[str, Any]] = {}

    async def token() -> str:
        return backend.token

    async with ConvexHttpClient(backend.url) as http:
        async for page in succeeded_pages(http, token, since_ms):
            docs.update((doc["jobId"], doc) for doc in page)
    return docs


# -- the daemon as a process (stella_devbackend.harness, shared with the tests) --------------------


#: The benchmarks' daemon logs warnings only (its log is not what they measure).
QUIET_DAEMON = {"MATERIALIZER_LOG__LEVEL": "warning"}


def daemon_process(root: Path, backend: DevBackend) -> DaemonProcess:
    """The daemon of a benchmark: the shared harness's (clean environment, its own config home), logging quietly."""
    return DaemonProcess(root, backend, env=QUIET_DAEMON)


# -- /proc -----------------------------------------------------------------------------------------


def proc_memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a process, in KiB."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])
    return figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


# -- a sidebar client -------------------------------------------------------------------------------


class Sidebar:
    """A client of the daemon's sidebar socket that notes when each event line arrives.

    ``materialized[job_id]`` is the wall-clock time (``time.time()``, seconds) at which the
    ``media.materialized`` line for the job was read off the socket.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.materialized: dict[str, float] = {}
        self.states: list[str] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, root: Path, since: int = 0, timeout: float = 30.0,
                      daemon: DaemonProcess | None = None) -> Sidebar:
        """Connect as soon as the daemon has bound its socket (failing if ``daemon`` exits first); say hello."""
        path = default_layout(root).display_socket
        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if daemon is not None:
                    daemon.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no sidebar socket at {path} after {timeout}s") from None
                await asyncio.sleep(0.02)
        writer.write(json.dumps({"type": "hello", "since": since}).encode() + b"\n")
        await writer.drain()
        return cls(reader, writer)

    async def _read(self) -> None:
        async for line in self._reader:
            now = time.time()
            message = json.loads(line)
            kind = message.get("type")
            payload = message.get("payload") or {}
            if kind == "media.materialized":
                self.materialized.setdefault(payload["jobId"], now)
            elif kind == "materializer.state":
                self.states.append(str(payload.get("state")))
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0, what: str = "events") -> None:
        """Wait until ``predicate()`` holds, re-checking on every line received."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    if self._task.done():
                        self._task.result()
                        raise ConnectionError("the sidebar socket closed")
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}") from None

    async def wait_materialized(self, job_ids: list[str], timeout: float = 60.0, what: str = "jobs") -> None:
        """Wait until every one of ``job_ids`` has been announced as materialized."""
        await self.wait_for(lambda: all(j in self.materialized for j in job_ids), timeout, what)

    async def wait_connected(self, timeout: float = 30.0) -> None:
        await self.wait_for(lambda: "connected" in self.states, timeout, "the daemon to connect")

    async def close(self) -> None:
        self._task.cancel()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, asyncio.CancelledError):
            pass


class OfficialPush:
    """The official ``convex`` client in its own process (``harness.py push``): when it yields each job.

    Subscribed beside the daemon in the same run, it is the push part of the durable
    latency floor: commit -> the official client hands the job to its caller.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.first_seen: dict[str, float] = {}  # job id -> wall time (time.time())
        self.answers = 0
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, backend: DevBackend, since_ms: float) -> OfficialPush:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("harness.py")), "push", backend.url, str(since_ms),
            stdout=asyncio.subprocess.PIPE, env=clean_env(STELLA_TOKEN=backend.token))
        watcher = cls(process)
        await watcher.wait_for(lambda: watcher.answers >= 1, 60.0)  # subscribed: its first answer
        return watcher

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            record = json.loads(line)
            self.answers += 1
            for job_id in record["ids"]:
                self.first_seen.setdefault(job_id, record["wall"])
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._task.done():
                    raise ConnectionError("the official client's process ended")
                await self._changed.wait()

    async def wait_seen(self, job_ids: list[str], timeout: float = 60.0) -> None:
        await self.wait_for(lambda: all(j in self.first_seen for j in job_ids), timeout)

    async def close(self) -> None:
        self._task.cancel()
        self.process.kill()
        await self.process.wait()


# -- floors ------------------------------------------------------------------------------------------


def fetch_decode_write(client: httpx.Client, url: str, dest: Path) -> float:
    """The old floor of materializing one image: a plain GET, a full Pillow decode, a file write; seconds."""
    started = time.perf_counter()
    response = client.get(url)
    response.raise_for_status()
    decode(response.content)
    dest.write_bytes(response.content)
    return time.perf_counter() - started


def fetch_decode_durable(client: httpx.Client, url: str, dest: Path) -> float:
    """The durable floor of materializing one image: GET, full decode, crash-safe write; seconds."""
    started = time.perf_counter()
    response = client.get(url)
    response.raise_for_status()
    decode(response.content)
    durable_write(dest, response.content)
    return time.perf_counter() - started


def decode(data: bytes) -> None:
    """A full Pillow decode, as the daemon's validation does."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def durable_write(dest: Path, data: bytes) -> None:
    """What no crash-safe writer can skip: a temporary file in the same folder, fsync, rename, fsync the folder."""
    partial = dest.with_name(f".{dest.name}.partial")
    with open(partial, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.rename(partial, dest)
    folder = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
