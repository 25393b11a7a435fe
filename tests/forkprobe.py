"""A process that tells what it sees of itself, as one JSON line (for tests/test_forkserver.py).

``python -m forkprobe EXIT_CODE [--write-fd N] [--late-file PATH] [--read-stdin] [--wait]``
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
import time
from pathlib import Path

#: The process that imported this module: the fork server's pid in a forked process (it imports it first).
IMPORTED_BY = os.getpid()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("exit_code", type=int)
    parser.add_argument("--write-fd", type=int)
    parser.add_argument("--late-file", type=Path, help="written by a non-daemon thread and by atexit, after main")
    parser.add_argument("--read-stdin", action="store_true")
    parser.add_argument("--wait", action="store_true", help="block until killed")
    args = parser.parse_args()
    preloaded = sys.modules.get("forkprobe")
    report = {
        "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv, "path0": sys.path[0],
        "env": dict(os.environ), "fds": sorted(int(name) for name in os.listdir("/proc/self/fd")),
        "forked": preloaded is not None and preloaded.IMPORTED_BY != os.getpid(),
        "stdin": sys.stdin.read() if args.read_stdin else None,
    }
    if args.write_fd is not None:
        os.write(args.write_fd, b"through the passed descriptor")
    print(json.dumps(report), flush=True)
    print("to stderr", file=sys.stderr)
    if args.late_file is not None:
        late: Path = args.late_file

        def finish() -> None:
            time.sleep(0.2)
            late.write_text("thread")

        threading.Thread(target=finish).start()
        atexit.register(lambda: late.write_text(late.read_text() + " atexit"))
    if args.wait:
        threading.Event().wait()
    return int(args.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
