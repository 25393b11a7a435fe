"""A sidebar impostor: another user's process serving forged events on a Unix socket (``materializer watch`` cases).

It runs as uid 65534 (``nobody``) for real: started as root, it drops to that uid before ``listen()``,
which is when the kernel records the credentials ``SO_PEERCRED`` reports. Making it needs root.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from stella_devbackend.harness import clean_env

__all__ = ["FORGED", "OTHER_UID", "can_impersonate", "foreign_server"]

OTHER_UID = 65534  # nobody
#: The issue's forged event: a job whose image is /etc/shadow.
FORGED = ('{"seq":1,"type":"media.materialized","payload":{"kind":"media","jobId":"forged",'
          '"asset":{"kind":"image","filePaths":["/etc/shadow"]},"createdAt":1}}')

_SERVER = textwrap.dedent("""
    import os, socket, sys
    os.setgid({uid}); os.setuid({uid})        # before listen(): SO_PEERCRED reports who listened
    server = socket.socket(socket.AF_UNIX)
    server.bind({path!r}); server.listen(1)
    print("ready", flush=True)
    server.settimeout(60)
    try:
        client, _ = server.accept()
    except OSError:
        sys.exit(0)
    client.recv(1000)
    client.sendall(b'{{"type":"welcome","since":0}}\\n' + {forged!r}.encode() + b"\\n")
    client.recv(1000)                          # until the client goes away
""")


def can_impersonate() -> bool:
    """Whether this process can make files and processes of another user (it is root)."""
    return os.geteuid() == 0


@contextlib.contextmanager
def foreign_server(bind_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process running as uid 65534 listening at ``bind_path`` (its folder must let that user in)."""
    code = _SERVER.format(uid=OTHER_UID, path=str(bind_path), forged=FORGED)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=clean_env()) as server:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        try:
            yield server
        finally:
            server.kill()
