"""``materializer demo``: the whole product on one machine, in well under a minute.

Starts the local backend (a real process, with only the real backend's three
queries), runs the daemon against it, submits jobs of every capability
through the public media API, waits until every one is materialized, and
prints what landed on disk.

Tokens rotate as they do for real, only faster: the backend's tokens live
:data:`DEMO_TOKEN_TTL` seconds (the real ones five minutes), and the demo
plays the desktop app that launched the daemon, fetching a fresh token from
the backend's ``/api/auth/convex/token`` with its session cookie and handing
it over a pipe, the daemon's ``--token-fd`` channel. The realtime frames are
spread over several token lifetimes, so the run shows the daemon keeping one
socket alive on tokens that each expire mid-run.

With ``--gallery`` it also serves the live gallery page (:mod:`materializer.gallery_server`)
from the start, so the jobs can be watched landing, and keeps the daemon and the page up
after the table until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from materializer import exits
from materializer.daemon import Materializer
from materializer.gallery import MANIFEST_NAME
from materializer.options import DaemonOptions
from materializer.tokens import FdTokenProvider

__all__ = ["run_demo", "submit_demo_jobs"]

DEMO_TIMEOUT = 120.0
#: Seconds each demo token lives (the real ones: 300). The app hands a new one every half lifetime.
DEMO_TOKEN_TTL = 4.0
#: Realtime frames, one per second: the run spans several token lifetimes.
REALTIME_FRAMES = 10


def run_demo(root: Path | None, gallery: bool = False) -> int:
    """Run the demo; 0 when every job was materialized, 1 otherwise (saying what failed)."""
    try:
        from stella_devbackend.control import DevBackend
    except ImportError as exc:
        print(f"materializer demo needs the backend extra: pip install 'stella-materializer[backend]' ({exc})",
              file=sys.stderr)
        return exits.USAGE
    root = (root or Path(tempfile.mkdtemp(prefix="stella-materializer-demo-"))).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="stella-demo-backend-") as scratch:
        print("starting the local Stella backend ...")
        with DevBackend.start(Path(scratch), token_ttl=DEMO_TOKEN_TTL) as backend:
            print(f"  backend at {backend.url} (only the real queries; tokens live {DEMO_TOKEN_TTL:g} s)")
            return asyncio.run(_demo(backend, root, gallery))


class _LaunchingApp:
    """What the desktop app does for a daemon it launched: fresh tokens down a pipe, before each expires."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.read_end, self._write_end = os.pipe()
        self.handed = 0

    async def hand_tokens(self) -> None:
        while True:
            token = await asyncio.to_thread(self.backend.fetch_token)  # /api/auth/convex/token, session cookie
            os.write(self._write_end, f"{token}\n".encode())
            self.handed += 1
            await asyncio.sleep(DEMO_TOKEN_TTL / 2)

    def close(self) -> None:
        for fd in (self.read_end, self._write_end):
            with contextlib.suppress(OSError):
                os.close(fd)


async def _demo(backend: Any, root: Path, gallery: bool) -> int:
    from materializer.display import DisplayServer
    from materializer.gallery_server import GalleryServer

    app = _LaunchingApp(backend)
    handing = asyncio.create_task(app.hand_tokens())
    provider = FdTokenProvider(app.read_end)
    # The demo's own state folder, whatever STELLA_DATA_DIR says: it must not write into a real one.
    daemon = Materializer(DaemonOptions(root=root, convex_url=backend.url, state_dir=root / "state"),
                          provider, display_factory=DisplayServer)
    ready = asyncio.Event()
    running = asyncio.create_task(daemon.run(on_ready=ready.set))
    await ready.wait()
    print(f"materializer running, root {root}, tokens over a pipe (--token-fd)")
    page = GalleryServer(daemon.options.layout, gallery_size=daemon.options.gallery_size) if gallery else None
    if page is not None:
        print(f"gallery: {await page.start()}  (open it to watch the jobs land)", flush=True)
    started = time.monotonic()
    try:
        job_ids = await submit_demo_jobs(backend)
        print(f"submitted {len(job_ids)} jobs; waiting for them to land ...")
        deadline = time.monotonic() + DEMO_TIMEOUT
        while True:
            statuses = await daemon.db(_statuses, daemon, job_ids)
            if all(status in ("materialized", "quarantined") for status in statuses.values()):
                break
            if time.monotonic() > deadline or running.done():
                break
            await asyncio.sleep(0.05)
        outcome = await daemon.db(_report, daemon, job_ids)
        client = daemon.client
        sockets, reauthentications = (client.connection_attempts, client.reauthentications) if client else (0, 0)
        rows, problems = outcome
        _print_table(rows)
        print(f"\ngallery manifest: {daemon.options.layout.outputs / MANIFEST_NAME}")
        print(f"{len(rows)} files from {len(job_ids)} jobs in {time.monotonic() - started:.1f}s")
        print(f"tokens: {app.handed} handed over the pipe, each living {DEMO_TOKEN_TTL:g} s; the daemon "
              f"re-authenticated {reauthentications} time(s) on {sockets} socket(s)", flush=True)
        if problems:
            print("\nnot materialized:", file=sys.stderr)
            for job_id, reason in problems:
                print(f"  {job_id}: {reason}", file=sys.stderr)
        if page is not None:
            print(f"\nthe gallery stays up at {page.url} (the daemon too) until Ctrl-C", flush=True)
            await _interrupted()
    finally:
        if page is not None:
            await page.close()
        daemon.stop()
        await running
        await daemon.aclose()
        handing.cancel()
        await provider.aclose()
        app.close()
    return exits.FAILED if problems else exits.OK


async def _interrupted() -> None:
    """Wait for Ctrl-C (SIGINT) or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def submit_demo_jobs(backend: Any, realtime_frames: int = REALTIME_FRAMES, pace: float = 1.0) -> list[str]:
    """Submit the demo's jobs through the media API (the browser tests submit them too); their ids.

    ``realtime_frames`` frames follow, ``pace`` seconds apart (a person drawing).
    """

    def submit(body: dict[str, Any]) -> str:
        # Like any client of the media API: a fresh session token for each call (they live seconds here).
        response = backend.generate(body, token=backend.fetch_token())
        if response.status_code != 202:
            raise RuntimeError(f"generate refused {body['capability']}: HTTP {response.status_code} {response.text}")
        return str(response.json()["jobId"])

    ids = [
        await asyncio.to_thread(submit, {"capability": "text_to_image", "profile": "best",
                                         "prompt": "a lighthouse at dusk, oil painting", "input": {"num_images": 4}}),
        await asyncio.to_thread(submit, {"capability": "text_to_image", "profile": "fast",
                                         "prompt": "a paper boat on a pond", "aspectRatio": "16:9",
                                         "input": {"output_format": "jpeg"}}),
        await asyncio.to_thread(submit, {"capability": "icon", "prompt": "a friendly rocket",
                                         "input": {"output_format": "webp"}}),
    ]
    source = await asyncio.to_thread(backend.wait_for_job, ids[0], backend.fetch_token())
    edit_of = source["output"]["images"][0]["url"]
    ids.append(await asyncio.to_thread(submit, {"capability": "image_edit", "prompt": "make it winter",
                                                "sourceUrl": edit_of}))
    for frame in range(realtime_frames):
        ids.append(await asyncio.to_thread(submit, {"capability": "realtime", "prompt": f"sketch frame {frame}"}))
        await asyncio.sleep(pace)  # a person drawing: one frame a second, across several token lifetimes
    return ids


def _statuses(daemon: Materializer, job_ids: list[str]) -> dict[str, str | None]:
    return {job_id: (job.status if (job := daemon.ledger.job(job_id)) else None) for job_id in job_ids}


def _report(daemon: Materializer, job_ids: list[str]) -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
    rows: list[tuple[str, ...]] = []
    problems: list[tuple[str, str]] = []
    base = daemon.options.layout.outputs
    for job_id in job_ids:
        job = daemon.ledger.job(job_id)
        if job is None or job.status != "materialized":
            reason = "never seen by the materializer" if job is None else (job.last_error or job.status)
            problems.append((job_id, reason))
            continue
        for output in daemon.ledger.outputs(job_id):
            rows.append((str(base / output.path), job.capability, output.mime_type.split("/")[-1],
                         f"{output.size_bytes / 1024:.0f} KiB", f"{output.width}x{output.height}"))
    return rows, problems


def _print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("path", "capability", "format", "size", "dimensions")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
