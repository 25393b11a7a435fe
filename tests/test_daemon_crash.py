"""The daemon loses nothing: bursts while down, SIGKILL mid-job, restarts mid-download, a full disk."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from materializer.layout import default_layout
from materializer.ledger import Ledger
from stella_devbackend.control import DevBackend

from helpers import DaemonProcess, gallery, ledger_events, ledger_jobs, output_files, partial_files, wait_until
from ledger_checks import check_integrity


def assert_consistent(root: Path, job_ids: list[str]) -> None:
    """Every job materialized once, valid files, one event each, manifest parses, ledger intact."""
    statuses = ledger_jobs(root)
    assert {j: statuses.get(j) for j in job_ids} == {j: "materialized" for j in job_ids}
    events = ledger_events(root, "media.materialized")
    announced = [e.payload["jobId"] for e in events]
    assert sorted(announced) == sorted(set(announced)), "a job was announced twice"
    assert set(job_ids) <= set(announced)
    files = output_files(root)
    for name in files:
        with Image.open(default_layout(root).outputs / name) as image:
            image.load()
    assert partial_files(root) == []
    manifest = gallery(root)
    listed = [entry["jobId"] for entry in manifest["jobs"]]
    assert len(listed) == len(set(listed))
    with Ledger(default_layout(root).ledger) as ledger:
        assert check_integrity(ledger, default_layout(root).outputs) == []


def test_burst_while_down_is_materialized_after_restart(paging_backend: DevBackend, tmp_path: Path) -> None:
    """260 jobs while down are more than one window: caught up with the page query where the backend has
    one (without it the oldest are a reported gap: tests/test_daemon_feed.py)."""
    backend = paging_backend
    root = tmp_path / "root"
    with DaemonProcess(root, backend) as daemon:
        first = backend.create_jobs(count=1, share_files=True, width=64, height=64)
        wait_until(lambda: ledger_jobs(root).get(first[0]) == "materialized", what="first job")
        assert daemon.stop() == 0
    burst = backend.create_jobs(count=260, share_files=True, width=32, height=32)
    with DaemonProcess(root, backend):
        wait_until(lambda: sum(s == "materialized" for s in ledger_jobs(root).values()) == 261, timeout=120,
                   what="every job of the burst")
    assert_consistent(root, first + burst)
    assert len(output_files(root)) == 261


def test_sigkill_mid_download_then_restart(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    backend.set_faults([{"kind": "stall", "fraction": 0.5}])
    job = backend.create_jobs(count=1, width=512, height=512, noise=True)[0]
    with DaemonProcess(root, backend) as daemon:
        wait_until(lambda: partial_files(root), what="a download in progress")
        assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    assert output_files(root) == []
    backend.clear_faults()
    with DaemonProcess(root, backend):
        wait_until(lambda: ledger_jobs(root).get(job) == "materialized", what="the job after the crash")
    assert_consistent(root, [job])
    assert output_files(root) == [f"{job}_0.png"]


def test_sigterm_mid_download_stops_promptly_and_cleanly(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    backend.set_faults([{"kind": "stall", "fraction": 0.3}])
    job = backend.create_jobs(count=1, width=256, height=256, noise=True)[0]
    with DaemonProcess(root, backend) as daemon:
        # The job's own temporary file: the one gallery.json is rewritten through at start comes and goes.
        wait_until(lambda: [name for name in partial_files(root) if name.startswith(f".partial-{job}_")],
                   what="a download in progress")
        assert daemon.signal(signal.SIGTERM) == 0
    assert partial_files(root) == [] and output_files(root) == []
    assert ledger_jobs(root)[job] == "pending"
    backend.clear_faults()
    with DaemonProcess(root, backend):
        wait_until(lambda: ledger_jobs(root).get(job) == "materialized", what="the job after the restart")
    assert_consistent(root, [job])


def test_sigkill_during_a_burst_loses_and_duplicates_nothing(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    jobs = backend.create_jobs(count=60, images=2, width=96, height=96)
    for _round in range(3):
        with DaemonProcess(root, backend) as daemon:
            wait_until(lambda: any(s == "materialized" for s in ledger_jobs(root).values()) if
                       default_layout(root).ledger.exists() else False, what="some progress")
            daemon.signal(signal.SIGKILL)
        jobs += backend.create_jobs(count=20, images=2, width=96, height=96)
    with DaemonProcess(root, backend):
        wait_until(lambda: all(ledger_jobs(root).get(j) == "materialized" for j in jobs), timeout=120,
                   what="every job after the crashes")
    assert_consistent(root, jobs)
    assert len(output_files(root)) == 2 * len(jobs)


def test_second_daemon_on_the_same_root_exits_1_naming_the_pid(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    with DaemonProcess(root, backend) as first:
        wait_until(lambda: (root / "state/media/materializer.lock").exists() and
                   (root / "state/media/materializer.lock").read_text().strip(), what="the lock")
        second = DaemonProcess(root, backend)
        second.log = tmp_path / "second.log"
        second.start()
        assert second.process is not None and second.process.wait(timeout=30) == 1
        assert f"pid {first.process.pid}" in second.log.read_text()  # type: ignore[union-attr]


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True,
                   capture_output=True)


def test_full_disk_is_retried_later_with_nothing_corrupt(backend: DevBackend, tmp_path: Path) -> None:
    if shutil.which("mount") is None:
        pytest.fail("this test needs mount(8) and root to make a tiny real filesystem")
    root = tmp_path / "root"
    small = default_layout(root).outputs
    _mount_tmpfs(small, "200k")
    try:
        big = backend.create_jobs(count=1, width=400, height=400, noise=True)[0]  # ~480 KB: does not fit
        with DaemonProcess(root, backend):
            wait_until(lambda: "ENOSPC" in (_last_error(root, big) or ""), what="a recorded ENOSPC")
            assert ledger_jobs(root)[big] == "pending"
            assert output_files(root) == [] and partial_files(root) == []
            subprocess.run(["mount", "-o", "remount,size=8m", str(small)], check=True)
            wait_until(lambda: ledger_jobs(root).get(big) == "materialized", timeout=60,
                       what="the job once there is room")
        assert_consistent(root, [big])
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _last_error(root: Path, job_id: str) -> str | None:
    with Ledger(default_layout(root).ledger) as ledger:
        job = ledger.job(job_id)
    return None if job is None else job.last_error
