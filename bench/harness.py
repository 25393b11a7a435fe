"""Floor processes, each a bare Python process doing only what the floor names (self-contained: no bench imports).

    python bench/harness.py memory URL [URL ...]
        Import the daemon process's runtime libraries (httpx, websockets, Pillow,
        sqlite3, watchfiles; not pydantic: its helper process validates the
        configuration), print ``{"idle_kib": VmRSS}``, then download
        every URL and decode them all at once in as many threads, holding every body
        and every decoded image, and print ``{"peak_kib": VmHWM}``.

    python bench/harness.py idle URL
        The official ``convex`` client subscribed to the daemon's two queries, with
        the token from ``STELLA_TOKEN``; prints ``{"subscribed": true}`` after the
        first answer, then stays connected, blocked on its iterator, until killed.

    python bench/harness.py push URL SINCE
        The official ``convex`` client subscribed to ``media_jobs:listSucceededSince``
        from SINCE (ms), with the token from ``STELLA_TOKEN``: prints
        ``{"wall": time.time(), "ids": [...]}`` for every answer as soon as it yields
        it, until killed. The push part of the durable latency floor.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _say(message: dict[str, object]) -> None:
    print(json.dumps(message), flush=True)


def memory(urls: list[str]) -> None:
    import io
    import sqlite3  # noqa: F401

    import httpx
    import watchfiles  # noqa: F401
    import websockets  # noqa: F401
    from PIL import Image

    _say({"idle_kib": _status_kib("VmRSS")})
    with httpx.Client(timeout=60.0) as client:
        bodies = [client.get(url).content for url in urls]
    images: list[object] = []

    def decode(data: bytes) -> None:
        image = Image.open(io.BytesIO(data))
        image.load()
        images.append(image)

    threads = [threading.Thread(target=decode, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _say({"peak_kib": _status_kib("VmHWM"), "images": len(images)})


def idle(url: str) -> None:
    from convex import ConvexClient

    client = ConvexClient(url)
    client.set_auth(os.environ["STELLA_TOKEN"])
    since = time.time() * 1000
    failed = client.subscribe("media_jobs:listFailedSince", {"since": since, "limit": 200})
    succeeded = client.subscribe("media_jobs:listSucceededSince", {"since": since, "limit": 200})
    next(iter(failed))
    for _ in succeeded:
        _say({"subscribed": True})


def push(url: str, since: float) -> None:
    from convex import ConvexClient

    client = ConvexClient(url)
    client.set_auth(os.environ["STELLA_TOKEN"])
    for value in client.subscribe("media_jobs:listSucceededSince", {"since": since, "limit": 50}):
        jobs = value if isinstance(value, list) else []
        _say({"wall": time.time(), "ids": [job["jobId"] for job in jobs if isinstance(job, dict)]})


if __name__ == "__main__":
    kind, *arguments = sys.argv[1:]
    if kind == "memory":
        memory(arguments)
    elif kind == "idle":
        idle(arguments[0])
    elif kind == "push":
        push(arguments[0], float(arguments[1]))
    else:
        raise SystemExit(f"unknown harness {kind!r}")
