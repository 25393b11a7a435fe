"""Run the official ``convex`` Python client as a separate process: the protocol oracle.

``python tests/convex_oracle.py URL PATH [ARGS_JSON]`` subscribes to
``PATH`` with the official client and prints one JSON line per result:
``{"t": <unix time received>, "value": ...}`` or ``{"t": ..., "error": "..."}``.
The token comes from the ``STELLA_TOKEN`` environment variable (never argv).

It runs in its own process because the official client's blocking iterator
holds the GIL while it waits, which starves any other thread of the process
that hosts it.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    from convex import ConvexClient, ConvexError  # a test dependency, imported only here

    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    url, path = argv[0], argv[1]
    args = json.loads(argv[2]) if len(argv) == 3 else {}
    client = ConvexClient(url)
    token = os.environ.get("STELLA_TOKEN")
    if token:
        client.set_auth(token)
    subscription = client.subscribe(path, args)
    while True:
        try:
            line = {"t": time.time(), "value": next(subscription)}
        except ConvexError as exc:
            line = {"t": time.time(), "error": str(exc)}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


class OfficialSubscription:
    """Drive the oracle process from Python: each call to :meth:`until` reads its result lines."""

    def __init__(self, url: str, path: str, args: dict[str, object], token: str | None) -> None:
        import subprocess

        env = dict(os.environ)
        env.pop("STELLA_TOKEN", None)
        if token:
            env["STELLA_TOKEN"] = token
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), url, path, json.dumps(args)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
        )
        self._buffer = b""

    def next_line(self, timeout: float) -> dict[str, object]:
        """The next result line; raises TimeoutError when none comes within ``timeout`` seconds."""
        import select

        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the official client printed nothing within {timeout}s")
            readable, _, _ = select.select([self.process.stdout], [], [], remaining)
            if readable:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"the official client exited ({self.process.wait()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def until(self, predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        """The first value satisfying ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(max(0.0, deadline - time.monotonic()))
            if "value" in line and predicate(line["value"]):
                return line["value"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> OfficialSubscription:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
