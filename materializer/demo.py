"""``materializer demo``: the whole product on one machine, in well under a minute.

Starts the local backend (a real process), runs the daemon against it, submits
jobs of every capability through the public media API, waits until every one
is materialized, and prints what landed on disk.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from materializer.daemon import DaemonOptions, Materializer, outputs_dir
from materializer.gallery import MANIFEST_NAME
from materializer.tokens import StaticTokenProvider

__all__ = ["run_demo"]

DEMO_TIMEOUT = 120.0


def run_demo(root: Path | None) -> int:
    """Run the demo; 0 when every job was materialized, 1 otherwise (saying what failed)."""
    try:
        from materializer.devbackend.control import DevBackend
    except ImportError as exc:
        print(f"materializer demo needs the backend extra: pip install 'stella-materializer[backend]' ({exc})",
              file=sys.stderr)
        return 2
    root = (root or Path(tempfile.mkdtemp(prefix="stella-materializer-demo-"))).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="stella-demo-backend-") as scratch:
        print("starting the local Stella backend ...")
        with DevBackend.start(Path(scratch)) as backend:
            print(f"  backend at {backend.url}")
            return asyncio.run(_demo(backend, root))


async def _demo(backend: Any, root: Path) -> int:
    from materializer.display import DisplayServer

    daemon = Materializer(DaemonOptions(root=root, convex_url=backend.url), StaticTokenProvider(backend.token),
                          display_factory=DisplayServer)
    ready = asyncio.Event()
    running = asyncio.create_task(daemon.run(on_ready=ready.set))
    await ready.wait()
    print(f"materializer running, root {root}")
    started = time.monotonic()
    try:
        job_ids = await asyncio.to_thread(_submit_all, backend)
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
    finally:
        daemon.stop()
        await running
        await daemon.aclose()
    rows, problems = outcome
    _print_table(rows)
    print(f"\ngallery manifest: {outputs_dir(root) / MANIFEST_NAME}")
    print(f"{len(rows)} files from {len(job_ids)} jobs in {time.monotonic() - started:.1f}s")
    if problems:
        print("\nnot materialized:", file=sys.stderr)
        for job_id, reason in problems:
            print(f"  {job_id}: {reason}", file=sys.stderr)
        return 1
    return 0


def _submit_all(backend: Any) -> list[str]:
    def submit(body: dict[str, Any]) -> dict[str, Any]:
        response = backend.generate(body)
        if response.status_code != 202:
            raise RuntimeError(f"generate refused {body['capability']}: HTTP {response.status_code} {response.text}")
        return response.json()

    ids = [
        submit({"capability": "text_to_image", "profile": "best", "prompt": "a lighthouse at dusk, oil painting",
                "input": {"num_images": 4}})["jobId"],
        submit({"capability": "text_to_image", "profile": "fast", "prompt": "a paper boat on a pond",
                "aspectRatio": "16:9", "input": {"output_format": "jpeg"}})["jobId"],
        submit({"capability": "icon", "prompt": "a friendly rocket", "input": {"output_format": "webp"}})["jobId"],
    ]
    source = backend.wait_for_job(ids[0])
    edit_of = source["output"]["images"][0]["url"]
    ids.append(submit({"capability": "image_edit", "prompt": "make it winter", "sourceUrl": edit_of})["jobId"])
    ids += [submit({"capability": "realtime", "prompt": f"sketch frame {i}"})["jobId"] for i in range(10)]
    return ids


def _statuses(daemon: Materializer, job_ids: list[str]) -> dict[str, str | None]:
    return {job_id: (job.status if (job := daemon.ledger.job(job_id)) else None) for job_id in job_ids}


def _report(daemon: Materializer, job_ids: list[str]) -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
    rows: list[tuple[str, ...]] = []
    problems: list[tuple[str, str]] = []
    base = outputs_dir(daemon.options.root)
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
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
