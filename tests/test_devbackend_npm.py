"""The official Convex npm client, unchanged, against the local backend.

It connects to ``/api/<its version>/sync`` with no ``Convex-Client`` header
(get-convex/convex-js ``src/browser/sync/client.ts``), so the backend takes
it for npm at that version (``crates/common/src/version.rs``
``from_path_param``): at 1.28.0 or later it is the one client that gets
``TransitionChunk`` messages (``crates/local_backend/src/subs/mod.rs``).
The package and its lock live in ``tests/npm``; one ``npm ci`` per session
installs them into ``tests/npm/node_modules`` (skipped when that install
already matches the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stella_devbackend.control import DevBackend

NPM_DIR = Path(__file__).parent / "npm"
SCRIPT = NPM_DIR / "subscribe.mjs"


@pytest.fixture(scope="session")
def node() -> str:
    """``node``, with ``tests/npm`` installed from its lock."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("the npm-client tests need Node.js (20 or later) and npm on PATH; install them and rerun")
    lock = NPM_DIR / "package-lock.json"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    marker = NPM_DIR / "node_modules" / ".installed-from-lock"
    # One install at a time, also across pytest processes sharing this checkout.
    guard = Path(tempfile.gettempdir()) / f"stella-npm-{hashlib.sha256(str(NPM_DIR).encode()).hexdigest()[:16]}.lock"
    with open(guard, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not marker.exists() or marker.read_text() != digest:
            installed = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=NPM_DIR,
                                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
            if installed.returncode != 0:
                pytest.fail(f"npm ci in {NPM_DIR} failed:\n{installed.stderr[-2000:]}")
            marker.write_text(digest)
    return node


class NpmSubscription:
    """``tests/npm/subscribe.mjs`` in its own process: one JSON line per result."""

    def __init__(self, node: str, url: str, path: str, args: dict[str, Any], token: str) -> None:
        env = {**os.environ, "STELLA_TOKEN": token}
        self.process = subprocess.Popen([node, str(SCRIPT), url, path, json.dumps(args)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        self._buffer = b""

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """The first result line satisfying ``predicate``."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"the npm client printed no matching result within {timeout}s")
                readable, _, _ = select.select([self.process.stdout], [], [], remaining)
                if readable:
                    chunk = os.read(self.process.stdout.fileno(), 1 << 20)
                    if not chunk:
                        assert self.process.stderr is not None
                        raise AssertionError(f"the npm client exited: {self.process.stderr.read()[-2000:]!r}")
                    self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\n", 1)
            result = json.loads(line)
            assert "error" not in result, result["error"]
            if predicate(result):
                return result

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def subscription(node: str, backend: DevBackend, args: dict[str, Any]) -> Iterator[NpmSubscription]:
    watcher = NpmSubscription(node, backend.url, "media_jobs:listSucceededSince", args, backend.token)
    try:
        yield watcher
    finally:
        watcher.close()


def ids(result: dict[str, Any]) -> list[str]:
    return [doc["jobId"] for doc in result["value"]]


def test_npm_client_sees_each_job_as_it_succeeds(node: str, backend: DevBackend) -> None:
    """get-convex/convex-js ConvexClient.onUpdate over the sync protocol, as the desktop app subscribes."""
    with subscription(node, backend, {"since": 0, "limit": 50}) as watcher:
        assert watcher.until(lambda r: True)["value"] == []
        submitted: list[str] = []
        for prompt in ("one", "two"):
            submitted.append(backend.generate({"capability": "icon", "prompt": prompt}).json()["jobId"])
            seen = watcher.until(lambda r: submitted[-1] in ids(r))
            assert ids(seen) == submitted[::-1] and seen["chunks"] == 0  # small transitions come whole


def test_npm_client_reassembles_chunked_transitions(node: str, tmp_path: Path) -> None:
    """crates/local_backend/src/subs/mod.rs maybe_split_transition, threshold lowered for the test."""
    with DevBackend.start(tmp_path / "chunky", extra_args=["--chunk-threshold", "2000", "--chunk-size", "700"]) \
            as backend:
        first = backend.create_jobs(count=30, share_files=True, prompt="un café \U0001f642 bien chaud")
        with subscription(node, backend, {"since": 0, "limit": 50}) as watcher:
            seen = watcher.until(lambda r: len(r["value"]) == 30)
            assert set(ids(seen)) == set(first) and seen["chunks"] > 1
            assert seen["value"][0]["request"]["prompt"] == "un café \U0001f642 bien chaud"
            [later] = backend.create_jobs(count=1, share_files=True)
            again = watcher.until(lambda r: later in ids(r))
            assert len(again["value"]) == 31 and again["chunks"] > seen["chunks"]
