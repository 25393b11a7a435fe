"""The daemon process's own tuning (materializer.service), observed in a real process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: Eight threads allocate at once (blocks under the mmap threshold, so from malloc's arenas), then the
#: process prints how many arenas glibc made (``malloc_info`` lists one ``<heap>`` per arena).
ARENAS = r'''
import ctypes, re, sys, tempfile, threading
from materializer.service import _bound_malloc_retention
_bound_malloc_retention()
start = threading.Barrier(8)
def work():
    start.wait()
    for _ in range(20):
        blocks = [bytearray(200_000) for _ in range(10)]
        del blocks
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile("r") as report:
    stream = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(len(re.findall(r'<heap nr="', report.read())))
'''


def arenas(**env: str) -> int:
    environment = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"} | env
    result = subprocess.run([sys.executable, "-c", ARENAS], capture_output=True, text=True, env=environment,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="malloc arenas are glibc's")
def test_the_daemon_keeps_two_malloc_arenas_unless_the_environment_says_otherwise() -> None:
    """Each decoding thread would get an arena of its own, each keeping what it freed (peak RSS of large images)."""
    assert arenas() == 2
    assert arenas(MALLOC_ARENA_MAX="4") == 4
