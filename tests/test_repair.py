"""A damaged ledger: ``materializer run`` stops with exit code 4 and one line; ``materializer repair`` rebuilds it.

Real processes against the local backend, real SQLite files damaged on disk, real output files
(their inodes tell that repair kept them rather than fetching them again).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_media_files import iso_file

from materializer import exits
from materializer.layout import default_layout
from materializer.ledger import Ledger
from materializer.repair import gallery_jobs, moved_aside_name, scan_outputs
from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend
from stella_devbackend.harness import clean_env

from helpers import DaemonProcess, gallery, ledger_jobs, output_files, wait_until
from ledger_checks import check_integrity

DAMAGE = ["empty", "truncated", "garbled"]


def damage(path: Path, how: str) -> bytes:
    data = path.read_bytes()
    damaged = {"empty": b"", "truncated": data[: len(data) // 2 + 100],
               "garbled": bytes(b ^ 0x5A if i % 97 == 0 else b for i, b in enumerate(data))}[how]
    path.write_bytes(damaged)
    return damaged


def materializer(root: Path, backend: DevBackend, *args: str) -> subprocess.CompletedProcess[str]:
    """A command as a process, against ``backend``, with a clean environment and the backend's current token."""
    token = root.parent / f"{root.name}.repair-token"
    token.write_text(backend.token)
    return forkserver.run(
        [sys.executable, "-m", "materializer", *args, "--root", str(root), "--convex-url", backend.url,
         "--token-file", str(token)], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env=clean_env(XDG_CONFIG_HOME=str(root.parent / "xdg")))


def inodes(root: Path) -> dict[str, tuple[int, bytes]]:
    folder = default_layout(root).outputs
    return {name: ((folder / name).stat().st_ino, (folder / name).read_bytes()) for name in output_files(root)}


def materialized_root(backend: DevBackend, root: Path, **spec: Any) -> list[str]:
    with DaemonProcess(root, backend):
        jobs = backend.create_jobs(**spec)
        wait_until(lambda: all(ledger_jobs(root).get(j) == "materialized" for j in jobs), what="the first jobs")
    return jobs


# -- run refuses ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGE)
def test_run_stops_with_exit_4_and_one_line_on_a_damaged_ledger(backend: DevBackend, tmp_path: Path,
                                                               how: str) -> None:
    root = tmp_path / "root"
    ledger = default_layout(root).ledger
    with Ledger(ledger) as made:
        made.observe_jobs([{"jobId": f"job_{i}", "status": "succeeded", "completedAt": 1_000.0 + i,
                            "output": {"images": [{"url": f"https://cdn.example/{i}.png"}]}} for i in range(300)])
    damaged = damage(ledger, how)
    manifest = b'{"version": 1, "jobs": []}\n'
    default_layout(root).outputs.mkdir(mode=0o700)
    (default_layout(root).outputs / "gallery.json").write_bytes(manifest)
    daemon = DaemonProcess(root, backend)
    daemon.log = tmp_path / "damaged.log"
    daemon.start()
    assert daemon.process is not None and daemon.process.wait(timeout=60) == exits.LEDGER_DAMAGED
    [line] = daemon.log.read_text().splitlines()
    assert line.startswith(f"materializer run: {ledger} is damaged: ")
    assert line.endswith("`materializer repair` (with the same --root or --state-dir) moves it aside and rebuilds "
                         "the ledger from the files on disk and the backend")
    assert ledger.read_bytes() == damaged  # never replaced
    assert (default_layout(root).outputs / "gallery.json").read_bytes() == manifest
    # replay opens the same ledger: the same code, the same line
    replay = materializer(root, backend, "replay")
    assert replay.returncode == exits.LEDGER_DAMAGED
    assert replay.stderr.splitlines()[-1] == line.replace("materializer run:", "materializer replay:", 1)


# -- repair ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGE)
def test_repair_moves_the_damaged_ledger_aside_and_rebuilds_it_keeping_every_file(
        backend: DevBackend, tmp_path: Path, how: str) -> None:
    root = tmp_path / "root"
    mp4 = iso_file(b"isom", b"mp41")
    (backend.data_dir / "files").mkdir(parents=True, exist_ok=True)
    (backend.data_dir / "files" / "clip").write_bytes(mp4)
    with DaemonProcess(root, backend):
        images = backend.create_jobs(count=4, images=2, width=24, height=24)
        [video] = backend.create_jobs(capability="text_to_video", doc={"output": {
            "video": {"url": f"{backend.url}/files/clip", "content_type": "video/mp4"}, "text": "a caption"}})
        first = [*images, video]
        wait_until(lambda: all(ledger_jobs(root).get(j) == "materialized" for j in first), what="the first jobs")
    kept = inodes(root)
    assert len(kept) == 4 * 2 + 2
    ledger = default_layout(root).ledger
    damaged = damage(ledger, how)
    later = backend.create_jobs(count=3, width=24, height=24)  # while the daemon is stopped: never on disk
    (backend.data_dir / "files" / "clip").unlink()  # the video is on disk only now: it must not be fetched

    result = materializer(root, backend, "repair", "--json")

    assert result.returncode == exits.OK, result.stderr
    summary = json.loads(result.stdout)
    [aside] = summary["movedAside"]
    assert re.fullmatch(rf"{re.escape(str(ledger))}\.damaged-\d{{8}}T\d{{6}}Z", aside)
    assert Path(aside).read_bytes() == damaged  # kept, byte for byte
    assert (summary["ledger"], sorted(summary["restored"]), sorted(summary["pending"])) == (
        "damaged", sorted(first), sorted(later))
    assert summary["failed"] == [] and summary["untracked"] == [] and summary["restoredFromGallery"] == []
    assert inodes(root) == kept  # every file kept where it was, none fetched again
    assert {entry["jobId"] for entry in gallery(root)["jobs"]} == set(first)
    with Ledger(ledger) as rebuilt:
        assert check_integrity(rebuilt, default_layout(root).outputs) == []
    assert {j: ledger_jobs(root)[j] for j in first + later} == {
        **dict.fromkeys(first, "materialized"), **dict.fromkeys(later, "pending")}

    with DaemonProcess(root, backend):
        wait_until(lambda: all(ledger_jobs(root).get(j) == "materialized" for j in later), what="the later jobs")
    assert {name: kept[name] for name in kept} == {name: inodes(root)[name] for name in kept}
    assert len(output_files(root)) == len(kept) + 3


def test_repair_restores_from_the_gallery_jobs_the_backend_no_longer_has(backend: DevBackend,
                                                                        tmp_path: Path) -> None:
    root = tmp_path / "root"
    jobs = materialized_root(backend, root, count=3, images=2, width=24, height=24)
    kept = inodes(root)
    damage(default_layout(root).ledger, "garbled")
    changed = default_layout(root).outputs / f"{jobs[2]}_1.png"
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")  # no longer what the gallery recorded
    backend.reset()  # the backend has none of them any more

    result = materializer(root, backend, "repair", "--json")

    assert result.returncode == exits.FAILED, result.stderr
    summary = json.loads(result.stdout)
    assert sorted(summary["restoredFromGallery"]) == sorted(jobs[:2])
    [failed] = summary["failed"]
    assert failed["jobId"] == jobs[2] and "does not match the SHA-256 recorded" in failed["reason"]
    assert summary["untracked"] == sorted([f"{jobs[2]}_0.png", f"{jobs[2]}_1.png"])
    assert set(output_files(root)) == set(kept)  # nothing removed, not even the changed file
    assert {entry["jobId"] for entry in gallery(root)["jobs"]} == set(jobs[:2])
    with Ledger(default_layout(root).ledger) as rebuilt:
        assert check_integrity(rebuilt, default_layout(root).outputs) == []
        entry = {e.job_id: e for e in rebuilt.gallery_entries(10)}[jobs[0]]
        assert [f.path for f in entry.files] == [f"{jobs[0]}_0.png", f"{jobs[0]}_1.png"]
        [announced] = [e for e in rebuilt.events_after(0, 100).events if e.payload.get("jobId") == jobs[0]]
        assert announced.payload["asset"] == {"kind": "image", "filePaths": [
            str((default_layout(root).outputs / f.path).resolve()) for f in entry.files]}


def test_repair_leaves_a_healthy_ledger_alone_and_waits_for_no_daemon(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    materialized_root(backend, root, count=1, width=16, height=16)
    ledger = default_layout(root).ledger
    before = ledger_jobs(root)
    healthy = materializer(root, backend, "repair")
    assert healthy.returncode == exits.OK and "is healthy: nothing to repair" in healthy.stderr
    assert ledger_jobs(root) == before
    with DaemonProcess(root, backend) as daemon:
        wait_until(lambda: default_layout(root).display_socket.exists(), what="the daemon up")
        busy = materializer(root, backend, "repair")
        assert busy.returncode == exits.FAILED
        assert f"another materializer is already running for this root (pid {daemon.pid}); stop it first" \
            in busy.stderr
    assert sorted(p.name for p in ledger.parent.iterdir() if "damaged" in p.name) == []


def test_repair_changes_nothing_when_the_backend_cannot_be_asked(tmp_path: Path, own_backend: DevBackend) -> None:
    root = tmp_path / "root"
    materialized_root(own_backend, root, count=1, width=16, height=16)
    damaged = damage(default_layout(root).ledger, "truncated")
    own_backend.stop()
    result = materializer(root, own_backend, "repair")
    assert result.returncode == exits.FAILED and "(nothing was changed)" in result.stderr
    assert default_layout(root).ledger.read_bytes() == damaged
    assert not [p for p in default_layout(root).media.iterdir() if "damaged" in p.name]


# -- the pieces ------------------------------------------------------------------------------------------------


def test_scan_outputs_finds_jobs_by_the_contract_name() -> None:
    jobs, others = scan_outputs([
        "job_abc_0.png", "job_abc_1.jpg", "3f2a-uuid_0.mp4", "gallery.json", ".partial-x-123", "notes.txt",
        "job_abc_1.webp", "-rf_0.png", "job_2.txt", "job_x_0.png.bak"])
    assert jobs == {"job_abc": {0: "job_abc_0.png", 1: "job_abc_1.jpg"}, "3f2a-uuid": {0: "3f2a-uuid_0.mp4"},
                    "job": {2: "job_2.txt"}}
    assert others == ["-rf_0.png", "job_abc_1.webp", "job_x_0.png.bak", "notes.txt"]


def test_gallery_jobs_takes_only_a_usable_manifest() -> None:
    entry = {"jobId": "job_a", "files": [{"index": 0, "path": "job_a_0.png"}]}
    assert gallery_jobs(json.dumps({"version": 1, "jobs": [entry, {"jobId": 5}, "x"]}).encode()) == {"job_a": entry}
    assert gallery_jobs(b'{"version": 2, "jobs": []}') is None
    assert gallery_jobs(b"{not json") is None
    assert gallery_jobs(b"\xff\xfe") is None


def test_moved_aside_names_carry_the_utc_time_and_never_collide() -> None:
    when = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
    assert moved_aside_name("materializer.db", when, []) == "materializer.db.damaged-20270115T080000Z"
    taken = ["materializer.db.damaged-20270115T080000Z-wal"]
    assert moved_aside_name("materializer.db", when, taken) == "materializer.db.damaged-20270115T080000Z-2"


def test_the_help_names_exit_code_4_and_the_way_out() -> None:
    env = clean_env()
    run = forkserver.run([sys.executable, "-m", "materializer", "run", "--help"], capture_output=True, text=True,
                         env=env, timeout=60)
    text = " ".join(run.stdout.split())
    assert "4 when the ledger is damaged" in text and "see materializer repair" in text
    repair = forkserver.run([sys.executable, "-m", "materializer", "repair", "--help"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert repair.returncode == 0 and "materializer.db.damaged-<UTC time>" in " ".join(repair.stdout.split())


def test_exit_code_4_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert re.search(r"\| `materializer run .*\| .*4 the ledger is damaged", readme)
    assert "| `materializer repair" in readme
