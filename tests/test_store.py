"""OutputStore on real folders: atomic commits, planted symlinks, full disks, crash leftovers."""

from __future__ import annotations

import base64
import errno
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from materializer import store as store_module
from materializer.images import validate_image
from materializer.jobs import Job, extract_outputs
from materializer.store import PARTIAL_PREFIX, OutputStore, PartialFile, StorageError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OutputStore]:
    with OutputStore(tmp_path / "root" / "state" / "media" / "outputs") as opened:
        yield opened


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the outputs folder that nothing may touch."""
    path = tmp_path / "victim.txt"
    path.write_bytes(b"precious")
    return path


def listing(store: OutputStore) -> list[str]:
    return sorted(os.listdir(store.path))


def fail_on(fds: Callable[[int], bool], code: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``os.write``/``os.fsync``: raise ``code`` for the matching descriptors, pass the rest through."""

    def wrapper(fd: int, *args: Any) -> Any:
        if fds(fd):
            raise OSError(code, os.strerror(code))
        return real(fd, *args)

    return wrapper


def is_folder(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


# --- the folder -----------------------------------------------------------------------------


def test_the_folder_and_its_parents_are_created_private(tmp_path: Path) -> None:
    with OutputStore(tmp_path / "a" / "b" / "outputs") as created:
        assert created.path == tmp_path / "a" / "b" / "outputs"
        assert stat.S_IMODE(created.path.stat().st_mode) == 0o700
        assert listing(created) == []


def test_an_existing_folder_is_used_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "outputs"
    folder.mkdir(mode=0o755)
    (folder / "job_0_0.png").write_bytes(b"old")
    with OutputStore(folder) as reopened:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        assert reopened.existing("job_0_0") == folder / "job_0_0.png"


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_symlinked_outputs_folder_is_refused(tmp_path: Path, target_exists: bool) -> None:
    elsewhere = tmp_path / "elsewhere"
    if target_exists:
        elsewhere.mkdir()
    (tmp_path / "outputs").symlink_to(elsewhere)
    with pytest.raises(StorageError) as refused:
        OutputStore(tmp_path / "outputs")
    assert refused.value.reason == f"the outputs folder {tmp_path / 'outputs'} is a symlink; refusing to follow it"
    assert refused.value.retryable is False
    assert (list(elsewhere.iterdir()) if target_exists else elsewhere.exists()) in ([], False)


def test_an_outputs_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outputs").write_bytes(b"not a folder")
    with pytest.raises(StorageError) as refused:
        OutputStore(tmp_path / "outputs")
    assert (refused.value.errno, refused.value.retryable) == (errno.ENOTDIR, False)
    assert "(ENOTDIR)" in refused.value.reason


def test_an_outputs_folder_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "outputs"
    folder.mkdir()
    os.chown(folder, 54321, -1)  # the suite runs as root, as in CI
    with pytest.raises(StorageError) as refused:
        OutputStore(folder)
    assert refused.value.reason == f"the outputs folder {folder} belongs to uid 54321, not to us (uid {os.geteuid()})"


def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    closed = OutputStore(tmp_path / "outputs")
    closed.close()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        closed.temp_file("job_1_0")


# --- temporary files ------------------------------------------------------------------------


def test_a_temporary_file_is_private_empty_and_recognisable(store: OutputStore) -> None:
    with store.temp_file("job_1_0") as partial:
        assert partial.partial_name.startswith(f"{PARTIAL_PREFIX}job_1_0-")
        assert partial.path == store.path / partial.partial_name
        assert stat.S_IMODE(os.stat(partial.path).st_mode) == 0o600
        assert partial.write(b"abc") == 3
        assert partial.write(memoryview(b"defg")) == 4
        partial.seek(0)
        assert partial.read() == b"abcdefg"
    assert listing(store) == []  # discarded on exit: never committed


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_symlink_planted_at_the_temporary_name_is_never_opened(
    store: OutputStore, victim: Path, monkeypatch: pytest.MonkeyPatch, target_exists: bool
) -> None:
    target = victim if target_exists else victim.with_name("created-through-symlink")
    tokens = iter(["a" * 16, "b" * 16])
    monkeypatch.setattr(store_module, "_random_token", lambda: next(tokens))
    planted = store.path / f"{PARTIAL_PREFIX}job_1_0-{'a' * 16}"
    planted.symlink_to(target)
    with store.temp_file("job_1_0") as partial:
        assert partial.partial_name == f"{PARTIAL_PREFIX}job_1_0-{'b' * 16}"
        partial.write(b"attacker wanted this elsewhere")
        store.commit(partial, "job_1_0.png")
    assert victim.read_bytes() == b"precious"
    assert not victim.with_name("created-through-symlink").exists()
    assert planted.is_symlink()  # not ours: left alone


@pytest.mark.parametrize("stem", ["../x", "a/b", ".hidden", "", "x\x00y", "x" * 240])
def test_temporary_files_need_a_plain_stem(store: OutputStore, stem: str) -> None:
    with pytest.raises(ValueError):
        store.temp_file(stem)
    assert listing(store) == []


# --- commit ---------------------------------------------------------------------------------


def test_commit_puts_the_complete_file_in_place(store: OutputStore) -> None:
    partial = store.temp_file("job_1_0")
    partial.write(b"image bytes")
    path = store.commit(partial, "job_1_0.png")
    assert path == store.path / "job_1_0.png"
    assert path.read_bytes() == b"image bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert listing(store) == ["job_1_0.png"]
    assert partial.closed
    with pytest.raises(ValueError, match="already committed or discarded"):
        store.commit(partial, "job_1_0.png")


def test_commit_fsyncs_the_file_then_the_folder_after_the_rename(
    store: OutputStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        calls.append(("folder" if is_folder(fd) else "file", (store.path / "job_1_0.png").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with store.temp_file("job_1_0") as partial:
        partial.write(b"image bytes")
        store.commit(partial, "job_1_0.png")
    assert calls == [("file", False), ("folder", True)]


def test_a_commit_that_need_not_be_durable_renames_without_fsyncs(
    store: OutputStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with store.temp_file("job_1_0") as partial:
        partial.write(b"thumbnail bytes")
        store.commit(partial, "job_1_0.webp", durable=False)
    assert calls == []
    assert listing(store) == ["job_1_0.webp"]
    assert (store.path / "job_1_0.webp").read_bytes() == b"thumbnail bytes"


def test_a_symlink_planted_at_the_final_name_is_replaced_not_written_through(
    store: OutputStore, victim: Path
) -> None:
    (store.path / "job_1_0.png").symlink_to(victim)
    with store.temp_file("job_1_0") as partial:
        partial.write(b"ours")
        store.commit(partial, "job_1_0.png")
    final = store.path / "job_1_0.png"
    assert not final.is_symlink() and final.read_bytes() == b"ours"
    assert victim.read_bytes() == b"precious"


def test_a_temporary_file_swapped_for_a_symlink_is_not_committed(store: OutputStore, victim: Path) -> None:
    with store.temp_file("job_1_0") as partial:
        partial.write(b"ours")
        partial.path.unlink()
        partial.path.symlink_to(victim)
        with pytest.raises(StorageError) as refused:
            store.commit(partial, "job_1_0.png")
    assert refused.value.reason == f"{partial.partial_name} disappeared or was replaced before the commit"
    assert refused.value.retryable
    assert listing(store) == [partial.partial_name]  # the impostor is left alone, nothing committed
    assert victim.read_bytes() == b"precious"


def test_a_swap_racing_the_rename_is_undone(store: OutputStore, victim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = os.rename

    def racing_rename(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int) -> None:
        os.unlink(src, dir_fd=src_dir_fd)  # someone swaps the file between the check and the rename
        os.symlink(victim, src, dir_fd=src_dir_fd)
        real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "rename", racing_rename)
    with store.temp_file("job_1_0") as partial:
        partial.write(b"ours")
        with pytest.raises(StorageError, match="was replaced while being committed"):
            store.commit(partial, "job_1_0.png")
    assert listing(store) == []
    assert victim.read_bytes() == b"precious"


def test_a_folder_in_the_way_of_the_final_name_fails_cleanly(store: OutputStore) -> None:
    (store.path / "job_1_0.png").mkdir()
    with store.temp_file("job_1_0") as partial:
        partial.write(b"ours")
        with pytest.raises(StorageError) as failed:
            store.commit(partial, "job_1_0.png")
    assert (failed.value.errno, failed.value.retryable) == (errno.EISDIR, False)
    assert failed.value.reason.startswith(f"renaming {partial.partial_name} to job_1_0.png: ")
    assert listing(store) == ["job_1_0.png"] and (store.path / "job_1_0.png").is_dir()


@pytest.mark.parametrize("final_name", ["../escape.png", "a/b.png", ".partial-x", "..", "", "x\x00.png"])
def test_final_names_must_be_plain(store: OutputStore, tmp_path: Path, final_name: str) -> None:
    with store.temp_file("job_1_0") as partial:
        partial.write(b"ours")
        with pytest.raises(ValueError):
            store.commit(partial, final_name)
    assert listing(store) == []
    assert not (tmp_path / "root" / "state" / "media" / "escape.png").exists()


def test_a_temporary_file_from_another_store_is_refused(store: OutputStore, tmp_path: Path) -> None:
    with OutputStore(tmp_path / "other") as other, other.temp_file("job_1_0") as partial:
        with pytest.raises(ValueError, match="another output store"):
            store.commit(partial, "job_1_0.png")


def test_concurrent_commits_of_one_name_leave_one_whole_file(store: OutputStore) -> None:
    contents = [bytes([i]) * 100_000 for i in range(8)]
    start = threading.Barrier(len(contents))
    errors: list[BaseException] = []

    def commit(content: bytes) -> None:
        try:
            with store.temp_file("job_1_0") as partial:
                partial.write(content)
                start.wait()
                store.commit(partial, "job_1_0.png")
        except BaseException as exc:  # reported below: a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(content,)) for content in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert listing(store) == ["job_1_0.png"]
    assert (store.path / "job_1_0.png").read_bytes() in contents


# --- disk errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "retryable"), [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, True), (errno.EFBIG, False)]
)
def test_a_failed_write_removes_the_temporary_file(
    store: OutputStore, monkeypatch: pytest.MonkeyPatch, code: int, retryable: bool
) -> None:
    partial = store.temp_file("job_1_0")
    partial.write(b"first chunk fits")
    monkeypatch.setattr(os, "write", fail_on(lambda fd: fd == partial.fileno(), code, os.write))
    with pytest.raises(StorageError) as failed:
        partial.write(b"second chunk does not")
    assert (failed.value.errno, failed.value.retryable) == (code, retryable)
    assert failed.value.reason.startswith(f"writing {partial.partial_name}: ")
    assert failed.value.reason.endswith(f"({errno.errorcode[code]})")
    assert partial.closed and listing(store) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_failed_file_fsync_commits_nothing(store: OutputStore, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setattr(os, "fsync", fail_on(lambda fd: not is_folder(fd), code, os.fsync))
    with store.temp_file("job_1_0") as partial:
        partial.write(b"ours")
        with pytest.raises(StorageError) as failed:
            store.commit(partial, "job_1_0.png")
    assert (failed.value.errno, failed.value.retryable) == (code, True)
    assert failed.value.reason.startswith(f"flushing {partial.partial_name} to disk: ")
    assert listing(store) == []


def test_a_failed_folder_fsync_takes_the_new_file_back(store: OutputStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", fail_on(is_folder, errno.EIO, os.fsync))
    with store.temp_file("job_1_0") as partial:
        partial.write(b"ours")
        with pytest.raises(StorageError) as failed:
            store.commit(partial, "job_1_0.png")
    assert failed.value.retryable
    assert failed.value.reason.startswith("flushing the outputs folder after writing job_1_0.png: ")
    assert listing(store) == []


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs. Needs root and mount(2), which CI has: fails loudly otherwise."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    assert mounted.returncode == 0, f"this test needs root and tmpfs mounts, as in CI: {mounted.stderr.strip()}"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_really_full_disk_is_retryable_and_corrupts_nothing(tiny_filesystem: Path) -> None:
    with OutputStore(tiny_filesystem / "outputs") as small:
        small.atomic_write_bytes("gallery.json", b'{"version": 1}')
        with small.temp_file("job_1_0") as partial:
            partial.write(b"x" * 64 * 1024)
            committed = small.commit(partial, "job_1_0.png")
        ballast = tiny_filesystem / "ballast"
        with open(ballast, "wb", buffering=0) as filler, pytest.raises(OSError) as full:
            while True:
                filler.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC

        with pytest.raises(StorageError) as failed:
            with small.temp_file("job_2_0") as partial:
                partial.write(os.urandom(128 * 1024))
        assert (failed.value.errno, failed.value.retryable) == (errno.ENOSPC, True)
        with pytest.raises(StorageError) as failed_manifest:
            small.atomic_write_bytes("gallery.json", b'{"version": 1, "jobs": ["' + b"j" * 128 * 1024 + b'"]}')
        assert failed_manifest.value.retryable
        assert listing(small) == ["gallery.json", "job_1_0.png"]
        assert (small.path / "gallery.json").read_bytes() == b'{"version": 1}'
        assert committed.read_bytes() == b"x" * 64 * 1024

        ballast.unlink()  # space comes back: the retry succeeds
        retry = os.urandom(128 * 1024)
        with small.temp_file("job_2_0") as partial:
            partial.write(retry)
            assert small.commit(partial, "job_2_0.png").read_bytes() == retry
        assert listing(small) == ["gallery.json", "job_1_0.png", "job_2_0.png"]


# --- reuse and cleanup ----------------------------------------------------------------------


def test_existing_finds_only_committed_regular_files(store: OutputStore, victim: Path) -> None:
    assert store.existing("job_1_0") is None
    (store.path / "job_1_0.png").symlink_to(victim)
    (store.path / "job_1_0.jpg").write_bytes(b"")
    (store.path / "job_1_0.webp").mkdir()
    assert store.existing("job_1_0") is None
    (store.path / "job_1_0.gif").write_bytes(b"GIF89a...")
    assert store.existing("job_1_0") == store.path / "job_1_0.gif"
    assert store.existing("job_1_0", extensions=("mp4", "png")) is None
    assert store.existing("job_1_1") is None
    with pytest.raises(ValueError):
        store.existing("../job_1_0")


def test_a_committed_file_is_found_again_by_a_new_store(store: OutputStore) -> None:
    with store.temp_file("job_1_0") as partial:
        partial.write(b"webp bytes")
        store.commit(partial, "job_1_0.webp")
    with OutputStore(store.path) as reopened:
        assert reopened.existing("job_1_0") == store.path / "job_1_0.webp"


def test_stale_partials_are_removed_and_nothing_else(store: OutputStore, victim: Path) -> None:
    an_hour_ago = time.time() - 3600
    stale = store.temp_file("job_1_0")
    stale.write(b"left by a crash")
    stale.close()
    os.utime(stale.path, (an_hour_ago, an_hour_ago))
    fresh = store.temp_file("job_2_0")
    fresh.write(b"still downloading")
    planted = store.path / f"{PARTIAL_PREFIX}job_3_0-planted"
    planted.symlink_to(victim)
    folder = store.path / f"{PARTIAL_PREFIX}folder"
    folder.mkdir()
    other = store.path / "job_4_0.png"
    other.write_bytes(b"committed")
    for path in (planted, folder, other):
        os.utime(path, (an_hour_ago, an_hour_ago), follow_symlinks=False)

    assert store.cleanup_stale_partials(older_than_seconds=600) == 1
    assert not stale.path.exists()
    assert sorted(os.listdir(store.path)) == sorted([fresh.partial_name, planted.name, folder.name, other.name])
    assert victim.read_bytes() == b"precious" and planted.is_symlink()
    assert store.cleanup_stale_partials(older_than_seconds=600) == 0
    fresh.discard()


# --- small files, and the whole flow --------------------------------------------------------


def test_atomic_write_bytes_replaces_a_file_whole(store: OutputStore) -> None:
    first = store.atomic_write_bytes("gallery.json", b'{"version": 1, "jobs": []}')
    assert first.read_bytes() == b'{"version": 1, "jobs": []}'
    store.atomic_write_bytes("gallery.json", b'{"version": 1, "jobs": [1]}')
    assert first.read_bytes() == b'{"version": 1, "jobs": [1]}'
    assert listing(store) == ["gallery.json"]
    with pytest.raises(ValueError):
        store.atomic_write_bytes("../gallery.json", b"{}")


def test_the_daemon_flow_from_document_to_committed_file(store: OutputStore, tmp_path: Path) -> None:
    source = tmp_path / "source.gif"
    Image.new("P", (5, 3), 7).save(source, "GIF")
    doc = {
        "jobId": "job_flow",
        "status": "succeeded",
        "completedAt": 1_700_000_000_000,
        "output": {"images": [{"url": "data:image/png;base64," + base64.b64encode(source.read_bytes()).decode()}]},
    }
    [ref] = extract_outputs(Job.from_document(doc))
    assert ref.data is not None and store.existing(ref.stem) is None
    with store.temp_file(ref.stem) as partial:
        partial.write(ref.data)
        info = validate_image(partial)
        path = store.commit(partial, f"{ref.stem}.{info.ext}")
    assert path == store.path / "job_flow_0.gif"  # the bytes decided, not the declared image/png
    assert store.existing(ref.stem) == path
    assert validate_image(path) == info
    assert isinstance(partial, PartialFile) and listing(store) == ["job_flow_0.gif"]
