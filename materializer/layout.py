"""Where everything lives on disk: the one home of the materializer's paths.

The Stella state folder is the desktop app's: ``STELLA_DATA_DIR`` if set, else
``~/.stella`` (ruuxi/stella-v2 ``packages/runtime/kernel/home/stella-paths.ts``,
``resolveRuntimeStatePath``: the variable trimmed, then resolved), and the
desktop writes media to ``<state folder>/media/outputs/``
(``packages/desktop/electron/ipc/browser-handlers.js``). The materializer's
own default is ``<root>/state`` (the public media API doc's
``state/media/outputs/``); ``daemon.state_dir`` (``--state-dir``) or
``STELLA_DATA_DIR`` points it at the desktop's folder instead, so both
share one outputs folder.

Everything the daemon keeps sits beside the outputs, in ``<state>/media/``:
the ledger, the instance lock and the sidebar socket.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STATE_DIR_ENV", "THUMBNAILS_DIR", "AlreadyRunning", "InstanceLock", "Layout", "default_layout",
           "resolve_state_dir"]

#: The desktop app's variable for its state folder.
STATE_DIR_ENV = "STELLA_DATA_DIR"
#: The state folder inside a root when nothing else names one.
ROOT_STATE_SUBDIR = "state"
#: The thumbnails' folder inside the outputs folder (hidden: it holds derived data, not outputs).
THUMBNAILS_DIR = ".thumbs"


def resolve_state_dir(root: Path, state_dir: Path | None) -> Path:
    """The Stella state folder: the setting, else ``STELLA_DATA_DIR`` as the desktop reads it, else ``<root>/state``."""
    if state_dir is not None:
        return state_dir
    from_env = os.environ.get(STATE_DIR_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser().resolve()
    return root / ROOT_STATE_SUBDIR


@dataclass(frozen=True, slots=True)
class Layout:
    """The paths under one Stella state folder."""

    state: Path

    @property
    def media(self) -> Path:
        """The materializer's own folder (created 0700): ledger, lock, socket, outputs."""
        return self.state / "media"

    @property
    def outputs(self) -> Path:
        return self.media / "outputs"

    @property
    def thumbnails(self) -> Path:
        """``<outputs>/.thumbs``: a small WebP per image output (:mod:`materializer.thumbnails`)."""
        return self.outputs / THUMBNAILS_DIR

    @property
    def ledger(self) -> Path:
        return self.media / "materializer.db"

    @property
    def lock(self) -> Path:
        return self.media / "materializer.lock"

    @property
    def display_socket(self) -> Path:
        return self.media / "display.sock"


def default_layout(root: Path) -> Layout:
    """The layout of a root with no state folder configured: ``<root>/state``."""
    return Layout(root / ROOT_STATE_SUBDIR)


class AlreadyRunning(RuntimeError):
    """Another daemon holds this root."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(f"another materializer is already running for this root (pid {pid or 'unknown'})")
        self.pid = pid


class InstanceLock:
    """One daemon per state folder: an advisory lock on ``materializer.lock`` holding the owner's pid."""

    def __init__(self, layout: Layout) -> None:
        self.path = layout.lock
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(int(text) if text.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(layout: Layout) -> int | None:
        """The pid of the running daemon for this state folder, or None when none runs."""
        path = layout.lock
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
        return None
