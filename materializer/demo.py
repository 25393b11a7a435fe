"""``materializer demo``: run the local backend, submit jobs, and show what lands on disk."""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["run_demo"]


def run_demo(root: Path | None) -> int:
    """Start the local backend, submit one job, and wait for it (the daemon demo comes with the pipeline)."""
    from materializer.devbackend.control import DevBackend

    with tempfile.TemporaryDirectory(prefix="stella-demo-") as scratch:
        with DevBackend.start(Path(scratch) / "backend") as backend:
            print(f"local backend ready at {backend.url}")
            job_id = backend.generate({"capability": "text_to_image", "prompt": "a lighthouse at dusk"}).json()["jobId"]
            doc = backend.wait_for_job(job_id)
            print(f"job {job_id}: {doc['status']}")
            for image in doc.get("output", {}).get("images", []):
                print(f"  {image['url']}  {image['content_type']}  {image['width']}x{image['height']}")
            return 0 if doc["status"] == "succeeded" else 1
