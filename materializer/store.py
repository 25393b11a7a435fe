"""Atomic files in the outputs folder, written so that nothing ever lands outside it.

Every file is written to a temporary file inside the folder (named
``.partial-<stem>-<random>``, created with ``O_CREAT|O_EXCL|O_NOFOLLOW``),
fsynced, renamed into place and made durable with an fsync of the folder.
Readers therefore see either nothing or a complete file, and after a crash
only ``.partial-*`` files can be left behind, which
:meth:`OutputStore.cleanup_stale_partials` removes.

Every operation goes through a descriptor of the folder opened once with
``O_NOFOLLOW`` (``dir_fd=`` calls, plain names, never paths), so:

- the outputs folder itself must be a real directory owned by us: a symlink
  planted at its path is refused rather than followed (the daemon checks the
  folders above it the same way first, see :func:`materializer.layout.secure_layout`;
  folders above the root may be symlinks: that is the user's choice);
- a symlink planted at a temporary name makes creation pick another name;
- a symlink planted at a final name is replaced by the rename, never written
  through;
- names with ``/``, NUL or a leading ``.`` are refused, so no write can leave
  the folder or overwrite a temporary file.

The folder is created with mode 0700 and files with 0600: generated images
are the user's own.

A folder that is removed, replaced or moved away while the store holds it is
noticed (:meth:`OutputStore.check_folder`: the held descriptor's device,
inode and link count against a fresh ``lstat`` of the path), before every
commit and whenever the owner asks, and opened again (recreated if need be),
so files never keep going into a folder nobody can see at that path; a
commit caught in between is refused as retryable. Disk errors come out as :class:`StorageError`, with
``retryable`` set for conditions that can clear on their own (a full disk, a
quota, an I/O error), and leave no temporary file behind.

Methods block on disk I/O (fsync can take a while): from async code, call them
in a worker thread. They share nothing but the folder's descriptor, so they
are safe to call from several threads.

One output, from a :class:`materializer.jobs.OutputRef` to a committed file::

    path = store.existing(ref.stem)   # idempotency: already there?
    if path is None:
        with store.temp_file(ref.stem) as partial:   # discarded on any exception
            partial.write(ref.data)                  # or stream a download into it
            info = validate_image(partial, limits)
            path = store.commit(partial, f"{ref.stem}.{info.ext}")
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from materializer.images import IMAGE_EXTENSIONS
from materializer.layout import file_identity

__all__ = ["PARTIAL_PREFIX", "FolderReplaced", "OutputStore", "PartialFile", "StorageError"]

#: Start of every temporary file name; final names may not start with ".".
PARTIAL_PREFIX = ".partial-"

_MAX_NAME_BYTES = 255
_TOKEN_BYTES = 8
_CREATE_ATTEMPTS = 16
_FOLDER_MODE = 0o700
_FILE_MODE = 0o600

#: Errors that can clear without anyone changing our configuration. ENOENT is what a folder
#: removed under us gives; the folder is then recreated and the job tried again.
_RETRYABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EBUSY,
     errno.ENOENT}
)


class StorageError(Exception):
    """Writing to the outputs folder failed; ``retryable`` says whether trying later can help."""

    def __init__(self, reason: str, *, retryable: bool, errno: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.errno = errno


class FolderReplaced(StorageError):
    """The outputs folder was removed, replaced or moved while a file was being written; it is open again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, retryable=True)


def _storage_error(action: str, exc: OSError) -> StorageError:
    code = exc.errno
    symbol = errno.errorcode.get(code, str(code)) if code is not None else "unknown error"
    detail = exc.strerror or str(exc)
    return StorageError(f"{action}: {detail} ({symbol})", retryable=code in _RETRYABLE_ERRNOS, errno=code)


def _random_token() -> str:
    return secrets.token_hex(_TOKEN_BYTES)


def _check_name(name: str, *, room: int = 0) -> None:
    """Refuse anything but a plain, visible file name (with ``room`` bytes to spare)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"file name must be a non-empty string, got {name!r}")
    if "/" in name or "\x00" in name:
        raise ValueError(f"file name {name[:60]!r} contains '/' or NUL")
    if name.startswith("."):
        raise ValueError(f"file name {name[:60]!r} starts with '.'")
    if len(os.fsencode(name)) + room > _MAX_NAME_BYTES:
        raise ValueError(f"file name {name[:60]!r} is too long")


def _open_folder(path: Path) -> int:
    """A descriptor of the outputs folder at ``path`` (created 0700 if missing); a symlink or another's is refused."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, _FOLDER_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise _storage_error(f"creating the outputs folder {path}", exc) from exc
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise StorageError(
                f"the outputs folder {path} is a symlink; refusing to follow it", retryable=False
            ) from None
        raise _storage_error(f"opening the outputs folder {path}", exc) from exc
    owner = os.fstat(dir_fd).st_uid
    if owner != os.geteuid():
        os.close(dir_fd)
        raise StorageError(
            f"the outputs folder {path} belongs to uid {owner}, not to us (uid {os.geteuid()})",
            retryable=False,
        )
    return dir_fd


class PartialFile(io.FileIO):
    """A temporary file inside the outputs folder, open for reading and writing.

    Write through :meth:`write`, which writes everything it is given and, on a
    disk error, removes the file and raises :class:`StorageError`. Used as a
    context manager it is discarded on exit unless it was committed.
    ``path`` is its absolute path, for messages and for readers.
    """

    def __init__(self, store: OutputStore, fd: int, name: str, dir_fd: int) -> None:
        super().__init__(fd, "r+", closefd=True)
        self.store = store
        self.dir_fd = dir_fd
        """The folder it was created in (the store's folder may be opened again meanwhile)."""
        self.partial_name = name
        self.path = store.path / name
        self.identity = file_identity(os.fstat(fd))
        self._finished = False

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        """Write all of ``data`` at the current position; return its length."""
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            try:
                written += os.write(self.fileno(), view[written:])
            except OSError as exc:
                self.discard()
                raise _storage_error(f"writing {self.partial_name}", exc) from exc
        return written

    def discard(self) -> None:
        """Close and remove the file (unless something else took its name). Idempotent."""
        if self._finished:
            return
        self._finished = True
        try:
            self.store._unlink_if_same(self.partial_name, self.identity, self.dir_fd)
        except (OSError, ValueError):
            pass  # the folder is failing or closed: cleanup_stale_partials removes the file later
        finally:
            self.close()

    def _mark_committed(self) -> None:
        self._finished = True
        self.close()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()


class OutputStore:
    """The outputs folder: temporary files, atomic commits, reuse of committed files.

    Raises :class:`StorageError` (not retryable) if ``outputs_dir`` is a
    symlink, not a directory, or owned by another user.
    """

    def __init__(self, outputs_dir: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.abspath(outputs_dir))
        self._dir_fd: int | None = _open_folder(self.path)
        self._retired_fds: list[int] = []
        self._reopening = threading.Lock()
        self.generation = 0
        """How many times the folder was found removed, replaced or moved, and opened again."""

    def check_folder(self) -> bool:
        """Whether the folder at the path is no longer the one held; then open (or recreate) it and say True.

        The held descriptor is compared with a fresh ``lstat`` of the path: a folder removed
        (``st_nlink`` 0, or nothing at the path), moved away or replaced by another has a different
        device and inode or none. The old descriptor stays open until :meth:`close` (another
        thread may be using it). Raises :class:`StorageError` when the path cannot be opened as our
        folder (see the class docstring).
        """
        with self._reopening:
            held = os.fstat(self._fd())
            try:
                current: os.stat_result | None = os.lstat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and held.st_nlink > 0 and file_identity(current) == file_identity(held):
                return False
            fd = _open_folder(self.path)
            self._retired_fds.append(self._fd())
            self._dir_fd = fd
            self.generation += 1
            return True

    def close(self) -> None:
        """Release the folder descriptor. Open temporary files cannot be committed or discarded after this."""
        if self._dir_fd is not None:
            for fd in (self._dir_fd, *self._retired_fds):
                os.close(fd)
            self._dir_fd = None
            self._retired_fds.clear()

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _fd(self) -> int:
        if self._dir_fd is None:
            raise ValueError("the output store is closed")
        return self._dir_fd

    def temp_file(self, stem: str) -> PartialFile:
        """A new, empty temporary file ``.partial-<stem>-<random>`` (mode 0600)."""
        _check_name(stem, room=len(PARTIAL_PREFIX) + 1 + 2 * _TOKEN_BYTES)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        reopened = False
        for _ in range(_CREATE_ATTEMPTS):
            name = f"{PARTIAL_PREFIX}{stem}-{_random_token()}"
            # One read of the folder's descriptor: another thread may open the folder again at any moment,
            # and the file must be known by the folder it is in (else a commit renames in the wrong one).
            dir_fd = self._fd()
            try:
                fd = os.open(name, flags, _FILE_MODE, dir_fd=dir_fd)
            except FileExistsError:
                continue  # taken, perhaps by a planted symlink: never open it, pick another name
            except OSError as exc:
                if exc.errno == errno.ENOENT and not reopened and self.check_folder():
                    reopened = True  # the folder was removed under us: it is back, try there
                    continue
                raise _storage_error(f"creating a temporary file for {stem}", exc) from exc
            return PartialFile(self, fd, name, dir_fd)
        raise StorageError(f"no free temporary file name for {stem} after {_CREATE_ATTEMPTS} tries", retryable=True)

    def commit(self, partial: PartialFile, final_name: str, *, durable: bool = True) -> Path:
        """Put ``partial`` in place under ``final_name``, replacing whatever entry had that name.

        fsync the file, rename it into place, fsync the folder. On any
        failure the temporary file is gone and nothing new is left under
        ``final_name``; on success ``partial`` is closed.

        ``durable=False`` skips both fsyncs, for derived data that is checked when read and made
        again when broken (thumbnails): readers still see the whole file or none while the machine
        runs, but after a power loss the file may be missing, empty or short.
        """
        _check_name(final_name)
        if partial.store is not self:
            raise ValueError("this temporary file belongs to another output store")
        if partial.closed:
            raise ValueError(f"{partial.partial_name} is closed (already committed or discarded)")
        if self.check_folder() or partial.dir_fd != self._fd():
            partial.discard()
            raise FolderReplaced(
                f"the outputs folder {self.path} was removed, replaced or moved while {final_name} was being"
                " written; it is open again, and the file will be written there"
            )
        dir_fd = self._fd()
        action = f"flushing {partial.partial_name} to disk"
        try:
            if durable:
                os.fsync(partial.fileno())
            action = f"renaming {partial.partial_name} to {final_name}"
            if not self._is_same(partial.partial_name, partial.identity):
                partial.discard()  # leaves whatever took the name alone
                raise StorageError(
                    f"{partial.partial_name} disappeared or was replaced before the commit", retryable=True
                )
            os.rename(partial.partial_name, final_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            partial.discard()
            raise _storage_error(action, exc) from exc
        partial._mark_committed()
        action = f"flushing the outputs folder after writing {final_name}"
        try:
            if self._remove_if_not_regular(final_name):
                # Swapped for a symlink between the check and the rename. (Another regular file
                # here is a concurrent commit of the same name, as whole as ours.)
                raise StorageError(f"{partial.partial_name} was replaced while being committed", retryable=True)
            if durable:
                os.fsync(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._unlink_if_same(final_name, partial.identity)
            raise _storage_error(action, exc) from exc
        return self.path / final_name

    def atomic_write_bytes(self, name: str, data: bytes) -> Path:
        """Replace ``name`` with ``data`` atomically and durably (for small files like ``gallery.json``)."""
        with self.temp_file(name) as partial:
            partial.write(data)
            return self.commit(partial, name)

    def existing(self, stem: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> Path | None:
        """A committed file ``<stem>.<ext>`` for one of ``extensions``, or None.

        Only a non-empty regular file counts (a symlink does not). Commits
        only ever put complete files in place; re-validate the content if it
        may have been written by something else.
        """
        _check_name(stem)
        for ext in extensions:
            name = f"{stem}.{ext}"
            _check_name(name)
            try:
                st = os.stat(name, dir_fd=self._fd(), follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _storage_error(f"looking for {name}", exc) from exc
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                return self.path / name
        return None

    def file_problem(self, name: str, size: int, sha256: str | None) -> str | None:
        """Why the committed file ``name`` is not the one recorded (``size`` bytes, and ``sha256`` if given), or None.

        Looked up in the folder as it is at the path now: a file left in a folder that was removed or
        moved away is not there.
        """
        _check_name(name)
        self.check_folder()
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self._fd())
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} cannot be opened: {exc.strerror or exc}"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return f"{name} is not a regular file"
            if st.st_size != size:
                return f"{name} has {st.st_size} bytes, {size} were committed"
            if sha256 is not None:
                digest = hashlib.sha256()
                while block := os.read(fd, 1 << 20):
                    digest.update(block)
                if digest.hexdigest() != sha256:
                    return f"{name} does not match the SHA-256 recorded when it was committed"
        except OSError as exc:
            return f"{name} cannot be read: {exc.strerror or exc}"
        finally:
            os.close(fd)
        return None

    def cleanup_stale_partials(self, older_than_seconds: float) -> int:
        """Remove our temporary files untouched for ``older_than_seconds``; return how many.

        Only regular files named ``.partial-*`` are removed; symlinks and
        anything else are left alone. A download in progress keeps its file's
        modification time fresh, so pick an age longer than the slowest one.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        dir_fd = self._fd()
        try:
            # A descriptor of our own: listing moves its offset, which dir_fd's users must not share.
            listing_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                with os.scandir(listing_fd) as entries:
                    stale = [
                        entry.name
                        for entry in entries
                        if entry.name.startswith(PARTIAL_PREFIX)
                        and entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_mtime < cutoff
                    ]
            finally:
                os.close(listing_fd)
            for name in stale:
                try:
                    os.unlink(name, dir_fd=dir_fd)
                    removed += 1
                except FileNotFoundError:
                    pass  # someone else cleaned it up
        except OSError as exc:
            raise _storage_error("removing stale temporary files", exc) from exc
        return removed

    def _is_same(self, name: str, identity: tuple[int, int], dir_fd: int | None = None) -> bool:
        """Whether ``name`` (in the folder, or in ``dir_fd``) is (still) the regular file ``identity``."""
        try:
            st = os.stat(name, dir_fd=self._fd() if dir_fd is None else dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and file_identity(st) == identity

    def _unlink_if_same(self, name: str, identity: tuple[int, int], dir_fd: int | None = None) -> None:
        if self._is_same(name, identity, dir_fd):
            os.unlink(name, dir_fd=self._fd() if dir_fd is None else dir_fd)

    def _remove_if_not_regular(self, name: str) -> bool:
        """Unlink ``name`` if it is a symlink or another non-regular, non-directory entry."""
        try:
            st = os.stat(name, dir_fd=self._fd(), follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            return False
        os.unlink(name, dir_fd=self._fd())
        return True
