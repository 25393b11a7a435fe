"""Files that vanish come back: an outputs folder removed, replaced or moved, files changed or deleted.

The store on real folders; the daemon and ``replay`` as real processes against the local backend.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from materializer.layout import THUMBNAILS_DIR, default_layout
from materializer.ledger import Ledger
from materializer.store import PARTIAL_PREFIX, OutputStore, StorageError, _storage_error
from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend
from stella_devbackend.harness import clean_env

from helpers import DaemonProcess, gallery, ledger_events, ledger_jobs, output_files, wait_until
from ledger_checks import check_integrity


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OutputStore]:
    with OutputStore(tmp_path / "media" / "outputs") as opened:
        yield opened


def commit(store: OutputStore, name: str, data: bytes) -> Path:
    with store.temp_file(name.split(".")[0]) as partial:
        partial.write(data)
        return store.commit(partial, name)


# -- the store ----------------------------------------------------------------------------------------------


def test_an_unchanged_folder_is_not_reopened(store: OutputStore) -> None:
    assert store.check_folder() is False
    assert store.generation == 0


@pytest.mark.parametrize("how", ["removed", "moved", "replaced"])
def test_a_folder_removed_moved_or_replaced_is_noticed_and_opened_again(store: OutputStore, tmp_path: Path,
                                                                       how: str) -> None:
    commit(store, "job_a_0.txt", b"a")
    if how == "removed":
        shutil.rmtree(store.path)
    elif how == "moved":
        store.path.rename(tmp_path / "moved")
    else:
        store.path.rename(tmp_path / "moved")
        store.path.mkdir(mode=0o700)
        (store.path / "theirs.txt").write_bytes(b"kept")
    assert store.check_folder() is True and store.generation == 1
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700
    assert store.check_folder() is False
    commit(store, "job_b_0.txt", b"b")
    assert sorted(os.listdir(store.path)) == (["job_b_0.txt", "theirs.txt"] if how == "replaced" else ["job_b_0.txt"])
    if how != "removed":
        assert os.listdir(tmp_path / "moved") == ["job_a_0.txt"]  # nothing more went into the moved folder


def test_a_temporary_file_in_a_removed_folder_brings_the_folder_back(store: OutputStore) -> None:
    shutil.rmtree(store.path)
    path = commit(store, "job_a_0.txt", b"a")  # no error: the creation noticed, the folder is back
    assert path == store.path / "job_a_0.txt" and path.read_bytes() == b"a"
    assert store.generation == 1


def test_a_commit_into_a_folder_moved_meanwhile_is_refused_as_retryable(store: OutputStore, tmp_path: Path) -> None:
    with store.temp_file("job_a_0") as partial:
        partial.write(b"a")
        store.path.rename(tmp_path / "moved")
        with pytest.raises(StorageError, match="was removed, replaced or moved while job_a_0.txt") as caught:
            store.commit(partial, "job_a_0.txt")
    assert caught.value.retryable
    assert os.listdir(tmp_path / "moved") == []  # the temporary file is gone from where it was
    assert os.listdir(store.path) == []
    commit(store, "job_a_0.txt", b"a")
    assert os.listdir(store.path) == ["job_a_0.txt"]


def test_commits_racing_a_folder_moved_again_and_again_leave_no_temporary_file_anywhere(
        store: OutputStore, tmp_path: Path) -> None:
    """A writer thread commits while another moves the folder away and has the store open it again (as the
    daemon's watcher does): every temporary file is known by the folder it was made in, so each commit lands in
    that folder or is refused and removed, never left behind in a moved folder (it once was)."""
    stop = threading.Event()
    moved: list[Path] = []

    def mover() -> None:
        while not stop.is_set():
            target = tmp_path / f"moved-{len(moved)}"
            with contextlib.suppress(FileNotFoundError):
                store.path.rename(target)
                moved.append(target)
            with contextlib.suppress(StorageError):
                store.check_folder()

    thread = threading.Thread(target=mover)
    thread.start()
    committed = refused = 0
    try:
        for n in range(400):
            try:
                commit(store, f"job_{n}_0.txt", b"x" * 64)
                committed += 1
            except StorageError:
                refused += 1
    finally:
        stop.set()
        thread.join()
    assert committed + refused == 400 and len(moved) > 1
    left = [str(path) for folder in [*moved, store.path] if folder.exists()
            for path in folder.iterdir() if path.name.startswith(PARTIAL_PREFIX)]
    assert left == []


def test_enoent_is_retryable() -> None:
    assert _storage_error("creating x", FileNotFoundError(errno.ENOENT, "No such file or directory")).retryable


def test_file_problem_says_what_differs(store: OutputStore, tmp_path: Path) -> None:
    data = b"some bytes"
    commit(store, "job_a_0.txt", data)
    digest = hashlib.sha256(data).hexdigest()
    assert store.file_problem("job_a_0.txt", len(data), digest) is None
    assert store.file_problem("job_a_0.txt", 3, None) == "job_a_0.txt has 10 bytes, 3 were committed"
    (store.path / "job_a_0.txt").write_bytes(b"some bytez")
    assert store.file_problem("job_a_0.txt", len(data), None) is None  # same size: only the hash tells
    assert store.file_problem("job_a_0.txt", len(data), digest) == \
        "job_a_0.txt does not match the SHA-256 recorded when it was committed"
    (tmp_path / "elsewhere.txt").write_bytes(data)
    os.unlink(store.path / "job_a_0.txt")
    os.symlink(tmp_path / "elsewhere.txt", store.path / "job_a_0.txt")
    assert store.file_problem("job_a_0.txt", len(data), digest) is not None  # a symlink is not followed
    shutil.rmtree(store.path)
    assert store.file_problem("job_a_0.txt", len(data), digest) == "job_a_0.txt is missing"


# -- the daemon -----------------------------------------------------------------------------------------------


def all_materialized_under_outputs(root: Path, jobs: list[str]) -> bool:
    statuses = ledger_jobs(root)
    folder = default_layout(root).outputs
    return all(statuses.get(j) == "materialized" for j in jobs) and all(
        (folder / f"{j}_0.png").is_file() for j in jobs)


def gallery_size(root: Path) -> int:
    try:
        return len(gallery(root)["jobs"])
    except FileNotFoundError:
        return 0


def assert_whole(root: Path, jobs: list[str]) -> None:
    """Every job materialized once, its files under outputs as recorded, the gallery listing only files there."""
    folder = default_layout(root).outputs
    with Ledger(default_layout(root).ledger) as ledger:
        assert check_integrity(ledger, folder) == []
    announced = [e.payload["jobId"] for e in ledger_events(root, "media.materialized")]
    assert sorted(announced) == sorted(jobs)
    listed = [f["path"] for entry in gallery(root)["jobs"] for f in entry["files"]]
    assert sorted({entry["jobId"] for entry in gallery(root)["jobs"]}) == sorted(jobs)
    assert all((folder / path).is_file() for path in listed)


@pytest.mark.parametrize("how", ["rm -rf", "mv"])
def test_an_outputs_folder_removed_or_moved_while_running_gets_every_file_back(
        backend: DevBackend, tmp_path: Path, how: str) -> None:
    root = tmp_path / "root"
    folder = default_layout(root).outputs
    with DaemonProcess(root, backend):
        first = backend.create_jobs(count=5, width=32, height=32)
        wait_until(lambda: all_materialized_under_outputs(root, first) and gallery_size(root) == 5,
                   what="the first jobs, in the gallery")
        if how == "rm -rf":
            shutil.rmtree(folder)
        else:
            folder.rename(tmp_path / "moved-outputs")
        later = backend.create_jobs(count=5, width=32, height=32)
        wait_until(lambda: all_materialized_under_outputs(root, first + later) and gallery_size(root) == 10,
                   what="every job back under outputs/")
    assert_whole(root, first + later)
    assert "quarantined" not in ledger_jobs(root).values()
    if how == "mv":  # what was moved stays the user's, with nothing added after the move
        assert sorted(os.listdir(tmp_path / "moved-outputs")) == sorted(
            [f"{j}_0.png" for j in first] + ["gallery.json", THUMBNAILS_DIR])
        # No later job's thumbnail was committed into the moved folder (its commit checks the folder).
        moved_thumbnails = set(os.listdir(tmp_path / "moved-outputs" / THUMBNAILS_DIR))
        assert not moved_thumbnails & {f"{j}_0.webp" for j in later}, moved_thumbnails
        # Nor a temporary file: one made as the move landed is removed from the folder it was made in.
        assert not [name for name in moved_thumbnails if name.startswith(PARTIAL_PREFIX)], moved_thumbnails


def test_vanished_files_of_jobs_behind_signed_urls_are_downloaded_again_with_todays_urls(tmp_path: Path) -> None:
    """The ledger keeps a materialized job's URLs without their query (a presigned URL's signature is a secret),
    so files that vanish are fetched with the document `getByJobId` gives now (the backend's `signed-urls`
    extension refuses an unsigned /files/ URL with 403: no real source has it, it is the stricter case of a
    provider's CDN); the fresh document is used, nothing is quarantined."""
    with DevBackend.start(tmp_path / "backend", extensions=["signed-urls"]) as backend:
        root = tmp_path / "root"
        folder = default_layout(root).outputs
        with DaemonProcess(root, backend):
            jobs = backend.create_jobs(count=3, width=32, height=32)
            wait_until(lambda: all_materialized_under_outputs(root, jobs), what="the jobs")
            with Ledger(default_layout(root).ledger) as ledger:
                stored = [ledger.job(job_id) for job_id in jobs]
            assert all(job is not None and "?" not in json.dumps(job.doc) for job in stored)  # signatures not kept
            shutil.rmtree(folder)
            wait_until(lambda: all_materialized_under_outputs(root, jobs), what="every file back")
        statuses = ledger_jobs(root)
        assert [statuses[j] for j in jobs] == ["materialized"] * 3
        assert_whole(root, jobs)
        unsigned = httpx.get(json.loads(json.dumps(stored[0].doc))["output"]["images"][0]["url"])  # type: ignore[union-attr]
        assert unsigned.status_code == 403  # what the stored document alone would have met


def test_files_changed_or_deleted_while_stopped_come_back_at_start(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = default_layout(root).outputs
    with DaemonProcess(root, backend):
        jobs = backend.create_jobs(count=4, width=32, height=32)
        wait_until(lambda: all_materialized_under_outputs(root, jobs), what="the jobs")
    changed, deleted = folder / f"{jobs[0]}_0.png", folder / f"{jobs[1]}_0.png"
    good = changed.read_bytes()
    changed.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    deleted.unlink()
    with DaemonProcess(root, backend):
        wait_until(lambda: changed.read_bytes() == good and deleted.is_file(), what="the files restored")
        wait_until(lambda: all_materialized_under_outputs(root, jobs), what="the jobs materialized again")
    assert_whole(root, jobs)


def test_replay_reports_already_present_only_files_that_match_their_hash(backend: DevBackend,
                                                                        tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = default_layout(root).outputs
    with DaemonProcess(root, backend) as daemon:
        jobs = backend.create_jobs(count=4, width=32, height=32)
        wait_until(lambda: all_materialized_under_outputs(root, jobs), what="the jobs")
    changed, deleted = folder / f"{jobs[0]}_0.png", folder / f"{jobs[1]}_0.png"
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")
    deleted.unlink()
    result = forkserver.run(
        [sys.executable, "-m", "materializer", "replay", "--root", str(root), "--convex-url", backend.url,
         "--token-file", str(daemon.token_file), "--json"], capture_output=True, text=True, timeout=120,
        env=clean_env(XDG_CONFIG_HOME=str(tmp_path / "xdg")), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert sorted(summary["alreadyPresent"]) == sorted(jobs[2:])
    assert sorted(summary["materialized"]) == sorted(jobs[:2])
    assert_whole(root, jobs)
    assert output_files(root) == sorted(f"{j}_0.png" for j in jobs)
