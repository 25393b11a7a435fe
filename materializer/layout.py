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

The local machine is checked, not trusted. Every folder of the layout (the
root when the state folder is ``<root>/state``, the state folder, ``media``
and ``outputs``) must be a real directory, not a symlink, owned by us (or by
root) and writable by nobody else: then no other user can swap anything in
it, and the paths the daemon opens afterwards stay what was checked. The
ledger, lock and socket must likewise not be symlinks and must be ours.
:func:`judge_folder` and :func:`judge_file` decide from an ``lstat``;
:func:`secure_layout` (``run``, ``replay``) creates what is missing (0700),
tightens a folder of ours that others may write to, and raises
:class:`UntrustedPath` for the rest; :func:`inspect_layout` (``status``,
``doctor``, ``watch``) only reports. Folders *above* the root are the
user's choice (``~/.stella`` may sit on another disk) and are not judged.
"""

# No `from __future__ import annotations` here: with it, the two record NamedTuples get string annotations, and
# typing compiles each one (a ForwardRef) when the class is made, milliseconds of every start
# (`materializer status` imports this module).

import fcntl
import os
import stat
from pathlib import Path
from typing import Literal, NamedTuple

__all__ = ["STATE_DIR_ENV", "THUMBNAILS_DIR", "AlreadyRunning", "Finding", "InstanceLock", "Layout", "UntrustedPath",
           "check_file", "check_folder", "default_layout", "file_identity", "inspect_layout", "judge_file",
           "judge_folder",
           "layout_folders", "open_nofollow", "resolve_state_dir", "secure_layout"]


def _warn(message: str, *args: object) -> None:
    """Log a warning; :mod:`logging` (9 ms) is imported at the first one, as ``status`` never logs."""
    import logging

    logging.getLogger(__name__).warning(message, *args)


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


# A NamedTuple, not a dataclass, for `materializer status`'s start (see materializer.ledger's records).
class Layout(NamedTuple):
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


# -- trust ------------------------------------------------------------------------------------------------

#: The mode bits that let someone other than the owner add, remove or rename entries.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
#: Folders the daemon creates: nobody else may even list them (prompts and file names are private).
_FOLDER_MODE = 0o700
FileKind = Literal["file", "socket"]


class Finding(NamedTuple):
    """Something about a path that another user could exploit, and how to fix it.

    ``tighten_to``: the folder is ours and only too open; :func:`secure_layout`
    sets this mode (and logs it) instead of refusing.
    """

    path: Path
    problem: str
    fix: str
    tighten_to: int | None = None

    @property
    def message(self) -> str:
        """One line naming the path, what is wrong and the fix."""
        return f"{self.path} {self.problem}; {self.fix}"


class UntrustedPath(Exception):
    """A path of the layout another user could control: the daemon refuses it (a configuration error)."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.message)
        self.finding = finding


def _trusted_owner(uid: int, euid: int) -> bool:
    """Ours, or root's (root can do anything anyway, as OpenSSH's StrictModes reasons)."""
    return uid in (euid, 0)


def _not_ours(path: Path, uid: int, euid: int) -> Finding:
    return Finding(path, f"belongs to uid {uid}, not to us (uid {euid})",
                   f"chown {euid} {path}, or point --root/--state-dir at a folder of your own")


def judge_folder(path: Path, st: os.stat_result | None, euid: int, link_target: str | None = None) -> Finding | None:
    """What is wrong with ``path`` as a folder of the layout, from its ``lstat`` (None: missing, or fine)."""
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        return Finding(path, f"is a symlink (to {link_target or '?'}); refusing to follow it",
                       "remove the link, or point --root/--state-dir at the real folder")
    if not stat.S_ISDIR(st.st_mode):
        return Finding(path, "is not a folder", "move it away; the daemon creates its own folder there")
    if not _trusted_owner(st.st_uid, euid):
        return _not_ours(path, st.st_uid, euid)
    mode = stat.S_IMODE(st.st_mode)
    if mode & _OTHERS_WRITE:
        who = " and ".join(name for bit, name in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if mode & bit)
        problem = f"is writable by {who} (mode {mode:04o})"
        if mode & stat.S_ISVTX:  # sticky: shared on purpose (like /tmp), never ours to close
            return Finding(path, f"{problem}, a shared folder", "point --root/--state-dir at a folder of your own")
        if st.st_uid != euid:
            return Finding(path, problem, f"point --root/--state-dir at a folder of your own, or have its owner "
                                          f"run chmod go-w {path}")
        return Finding(path, problem, f"chmod go-w {path}", tighten_to=mode & ~_OTHERS_WRITE)
    return None


def judge_file(path: Path, st: os.stat_result | None, euid: int, kind: FileKind = "file",
               link_target: str | None = None) -> Finding | None:
    """What is wrong with the ledger, lock (``file``) or sidebar socket (``socket``) at ``path`` (None: fine)."""
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        return Finding(path, f"is a symlink (to {link_target or '?'}); refusing to follow it",
                       "remove the link; the daemon creates its own file there")
    is_kind = stat.S_ISSOCK(st.st_mode) if kind == "socket" else stat.S_ISREG(st.st_mode)
    if not is_kind:
        return Finding(path, f"is not a {'socket' if kind == 'socket' else 'regular file'}",
                       "move it away; the daemon creates its own there")
    if not _trusted_owner(st.st_uid, euid):
        if kind == "socket":
            return Finding(path, f"belongs to uid {st.st_uid}, not to us (uid {euid})",
                           "remove it and restart the daemon, which serves its own socket there")
        return _not_ours(path, st.st_uid, euid)
    return None


def layout_folders(layout: Layout, root: Path) -> list[Path]:
    """The layout's folders, outermost first: the root (if the state folder is in it), state, media, outputs."""
    folders = [layout.state, layout.media, layout.outputs]
    return [root, *folders] if layout.state == root / ROOT_STATE_SUBDIR else folders


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _link_target(path: Path, st: os.stat_result | None) -> str | None:
    if st is None or not stat.S_ISLNK(st.st_mode):
        return None
    try:
        return os.readlink(path)
    except OSError:
        return None


def check_folder(path: Path) -> Finding | None:
    """:func:`judge_folder` of ``path`` as this process sees it now."""
    st = _lstat(path)
    return judge_folder(path, st, os.geteuid(), _link_target(path, st))


def check_file(path: Path, kind: FileKind = "file") -> Finding | None:
    """:func:`judge_file` of ``path`` as this process sees it now."""
    st = _lstat(path)
    return judge_file(path, st, os.geteuid(), kind, _link_target(path, st))


def _files(layout: Layout) -> list[tuple[Path, FileKind]]:
    ledger = layout.ledger
    return [(ledger, "file"), (ledger.with_name(ledger.name + "-wal"), "file"),
            (ledger.with_name(ledger.name + "-shm"), "file"), (layout.lock, "file"), (layout.display_socket, "socket")]


def inspect_layout(layout: Layout, root: Path, *, files: bool = True) -> list[Finding]:
    """Every finding about the layout's folders (and its files), changing nothing: for status, doctor, watch."""
    findings: list[Finding] = []
    for folder in layout_folders(layout, root):
        finding = check_folder(folder)
        if finding is not None:
            findings.append(finding)
            if finding.tighten_to is None:
                return findings  # what lies below a refused folder is not ours to judge
    if files:
        findings += [finding for path, kind in _files(layout) if (finding := check_file(path, kind)) is not None]
    return findings


def secure_layout(layout: Layout, root: Path) -> list[Finding]:
    """Make the layout's folders exist and trustworthy before anything is opened in them.

    Creates missing folders (0700; the root's own parents as ``mkdir -p``
    would), tightens a folder of ours that group or others may write to
    (logged, and returned), and raises :class:`UntrustedPath` for a symlink,
    a non-folder or a folder of another user's. Files are judged where they
    are opened (the ledger, :class:`InstanceLock`, the sidebar server).
    """
    folders = layout_folders(layout, root)
    folders[0].parent.mkdir(parents=True, exist_ok=True)
    tightened: list[Finding] = []
    for folder in folders:
        try:
            os.mkdir(folder, _FOLDER_MODE)
        except FileExistsError:
            pass  # judged below, as whatever it is
        finding = check_folder(folder)
        if finding is None:
            continue
        if finding.tighten_to is None:
            raise UntrustedPath(finding)
        os.chmod(folder, finding.tighten_to, follow_symlinks=False)
        _warn("tightened %s to mode %04o: it %s", folder, finding.tighten_to, finding.problem)
        tightened.append(finding)
    return tightened


def _refuse_file(path: Path, fd: int, kind: FileKind = "file") -> None:
    """Raise :class:`UntrustedPath` (closing ``fd``) unless the open file is a trusted file of ``kind``."""
    finding = judge_file(path, os.fstat(fd), os.geteuid(), kind)
    if finding is not None:
        os.close(fd)
        raise UntrustedPath(finding)


def file_identity(st: os.stat_result) -> tuple[int, int]:
    """What tells one file from another: its device and inode (a replaced or moved file has others)."""
    return st.st_dev, st.st_ino


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` refusing a symlink or another user's file with :class:`UntrustedPath` (the path and the fix)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError:
        finding = check_file(path)
        if finding is not None:
            raise UntrustedPath(finding) from None
        raise
    _refuse_file(path, fd)
    return fd


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
        fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
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
