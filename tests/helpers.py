"""Test helpers: run the daemon for real (a process) or in this event loop, and wait on conditions.

The process is :class:`stella_devbackend.harness.DaemonProcess`, the one the benchmarks use too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from materializer.daemon import Materializer
from materializer.layout import default_layout
from materializer.ledger import Ledger
from materializer.options import DaemonOptions
from materializer.tokens import StaticTokenProvider
from stella_devbackend.control import DevBackend
from stella_devbackend.harness import DaemonProcess

__all__ = ["DaemonProcess", "async_wait_until", "blank_png", "gallery", "ledger_events", "ledger_jobs", "output_files",
           "partial_files", "running_daemon", "wait_until"]

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def async_wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def output_files(root: Path) -> list[str]:
    """Visible files in the outputs folder (not the manifest)."""
    folder = default_layout(root).outputs
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != "gallery.json" and not p.name.startswith("."))


def partial_files(root: Path) -> list[str]:
    folder = default_layout(root).outputs
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".partial")) if folder.exists() else []


def gallery(root: Path) -> dict[str, Any]:
    return json.loads((default_layout(root).outputs / "gallery.json").read_text())


def ledger_jobs(root: Path) -> dict[str, str]:
    """job id -> status, read from the ledger file."""
    with Ledger(default_layout(root).ledger) as ledger:
        conn = ledger._conn
        return dict(conn.execute("SELECT job_id, status FROM jobs").fetchall())


def ledger_events(root: Path, type_: str | None = None) -> list[Any]:
    with Ledger(default_layout(root).ledger) as ledger:
        events = ledger.events_after(0, 100_000).events
    return [e for e in events if type_ is None or e.type == type_]


@contextlib.asynccontextmanager
async def running_daemon(root: Path, backend: DevBackend, **options: Any) -> AsyncIterator[Materializer]:
    """The daemon in this event loop (for tests that look inside it)."""
    daemon = Materializer(DaemonOptions(root=root, convex_url=backend.url, **options),
                          StaticTokenProvider(backend.token))
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(on_ready=ready.set))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()
    try:
        yield daemon
    finally:
        daemon.stop()
        await task
        await daemon.aclose()


def blank_png(width: int, height: int) -> bytes:
    """An all-black RGB PNG of any size in a fraction of a second and a few megabytes of memory.

    A zlib stream built from one compressed band of rows, flushed so that it stands alone, repeated:
    a real PNG (Pillow and zlib decode it) without compressing ``width x height x 3`` bytes here.
    """
    row = b"\x00" + bytes(3 * width)
    band_rows = max(1, min(height, (4 << 20) // len(row)))
    band = row * band_rows
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = deflate.compress(band) + deflate.flush(zlib.Z_FULL_FLUSH)
    bands, rest = divmod(height, band_rows)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    last = tail.compress(row * rest) + tail.flush(zlib.Z_FINISH) if rest else b"\x03\x00"  # an empty final block
    checksum = 1
    for _ in range(bands):
        checksum = zlib.adler32(band, checksum)
    checksum = zlib.adler32(row * rest, checksum)
    stream = b"\x78\xda" + segment * bands + last + struct.pack(">I", checksum)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
