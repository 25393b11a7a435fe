"""The local machine is checked, not trusted (issue 13, part 4): symlinks, other users' folders, forged sockets.

Every case runs the real thing: ``materializer run`` and ``materializer watch`` as processes, a real
SQLite file, sockets served by a process that really runs as another user. Files of another user need
root (``os.chown`` to uid 65534, ``nobody``); the few tests that make them say so when not run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from materializer import exits
from materializer.layout import (
    Finding,
    InstanceLock,
    Layout,
    UntrustedPath,
    default_layout,
    inspect_layout,
    judge_file,
    judge_folder,
    secure_layout,
)
from materializer.ledger import Ledger
from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend
from stella_devbackend.harness import DaemonProcess, clean_env

from helpers import ledger_jobs, wait_until
from impostor import OTHER_UID, can_impersonate, foreign_server

as_root = pytest.mark.skipif(not can_impersonate(), reason="making files of another user (uid 65534) needs root")


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder with a short path (the sidebar socket's path must fit AF_UNIX's 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="trust", dir="/tmp"))
    os.chmod(path, 0o755)  # another user's server must reach its folder below
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class NoBackend:
    """An endpoint for a daemon that must refuse to start before it connects anywhere."""

    url: str = "http://127.0.0.1:9"
    token: str = "unused-token-for-a-refused-start"


def _stat(mode: int, uid: int = 1000) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, uid, 0, 0, 0, 0))


# -- decisions on plain data -----------------------------------------------------------------------------


def test_judge_folder() -> None:
    path = Path("/s/media")
    assert judge_folder(path, None, 1000) is None  # missing: the daemon creates it
    assert judge_folder(path, _stat(stat.S_IFDIR | 0o700), 1000) is None
    assert judge_folder(path, _stat(stat.S_IFDIR | 0o755, uid=0), 1000) is None  # root's: trusted
    link = judge_folder(path, _stat(stat.S_IFLNK | 0o777), 1000, "/elsewhere")
    assert link == Finding(path, "is a symlink (to /elsewhere); refusing to follow it",
                           "remove the link, or point --root/--state-dir at the real folder")
    assert judge_folder(path, _stat(stat.S_IFREG | 0o600), 1000) == Finding(
        path, "is not a folder", "move it away; the daemon creates its own folder there")
    assert judge_folder(path, _stat(stat.S_IFDIR | 0o700, uid=OTHER_UID), 1000) == Finding(
        path, f"belongs to uid {OTHER_UID}, not to us (uid 1000)",
        "chown 1000 /s/media, or point --root/--state-dir at a folder of your own")
    # Ours and too open: tightened (only the write bits go); root's and too open: refused; shared on
    # purpose (sticky, like /tmp), even when ours (a daemon run as root given --root /tmp): refused, untouched.
    assert judge_folder(path, _stat(stat.S_IFDIR | 0o777), 1000) == Finding(
        path, "is writable by group and others (mode 0777)", "chmod go-w /s/media", tighten_to=0o755)
    assert judge_folder(path, _stat(stat.S_IFDIR | 0o2770), 1000) == Finding(
        path, "is writable by group (mode 2770)", "chmod go-w /s/media", tighten_to=0o2750)
    assert judge_folder(path, _stat(stat.S_IFDIR | 0o777, uid=0), 1000) == Finding(
        path, "is writable by group and others (mode 0777)",
        "point --root/--state-dir at a folder of your own, or have its owner run chmod go-w /s/media")
    for uid in (0, 1000):
        assert judge_folder(path, _stat(stat.S_IFDIR | 0o1777, uid=0), uid) == Finding(
            path, "is writable by group and others (mode 1777), a shared folder",
            "point --root/--state-dir at a folder of your own")


def test_judge_file() -> None:
    path = Path("/s/media/display.sock")
    assert judge_file(path, None, 1000, "socket") is None
    assert judge_file(path, _stat(stat.S_IFSOCK | 0o600), 1000, "socket") is None
    assert judge_file(path, _stat(stat.S_IFREG | 0o600), 1000, "socket") == Finding(
        path, "is not a socket", "move it away; the daemon creates its own there")
    assert judge_file(path, _stat(stat.S_IFSOCK | 0o600, uid=OTHER_UID), 1000, "socket") == Finding(
        path, f"belongs to uid {OTHER_UID}, not to us (uid 1000)",
        "remove it and restart the daemon, which serves its own socket there")
    ledger = Path("/s/media/materializer.db")
    assert judge_file(ledger, _stat(stat.S_IFREG | 0o600), 1000) is None
    assert judge_file(ledger, _stat(stat.S_IFLNK | 0o777), 1000, link_target="/etc/x") == Finding(
        ledger, "is a symlink (to /etc/x); refusing to follow it",
        "remove the link; the daemon creates its own file there")
    assert judge_file(ledger, _stat(stat.S_IFDIR | 0o700), 1000) == Finding(
        ledger, "is not a regular file", "move it away; the daemon creates its own there")


# -- the ledger, the lock and the layout, opened for real ----------------------------------------------------


@pytest.mark.parametrize("name", ["materializer.db", "materializer.db-wal", "materializer.db-shm"])
def test_ledger_refuses_planted_symlinks_and_writes_nothing_through_them(base: Path, name: str) -> None:
    layout = default_layout(base / "root")
    secure_layout(layout, base / "root")
    victim = base / "victim"
    victim.write_bytes(b"")  # an empty file: what SQLite would happily turn into a database
    (layout.media / name).symlink_to(victim)
    with pytest.raises(UntrustedPath, match=f"{layout.media / name} is a symlink"):
        Ledger(layout.ledger)
    assert victim.read_bytes() == b""
    assert sorted(os.listdir(layout.media)) == sorted({name, "outputs"})


@as_root
def test_ledger_of_another_user_is_refused(base: Path) -> None:
    path = base / "materializer.db"
    Ledger(path).close()
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(UntrustedPath, match=f"belongs to uid {OTHER_UID}"):
        Ledger(path)


def test_ledger_swapped_while_sqlite_opens_it_is_refused(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race between the check and SQLite's open, made to happen (a wrapped connect swaps the file first)."""
    path = base / "materializer.db"
    Ledger(path).close()
    other = base / "other.db"
    Ledger(other).close()
    real_connect = sqlite3.connect

    def swap_then_connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        os.replace(other, path)
        return real_connect(*args, **kwargs)  # type: ignore[arg-type,call-overload]

    monkeypatch.setattr(sqlite3, "connect", swap_then_connect)
    with pytest.raises(UntrustedPath, match="was replaced while it was being opened"):
        Ledger(path)


def test_lock_symlink_is_refused(base: Path) -> None:
    layout = default_layout(base / "root")
    secure_layout(layout, base / "root")
    (base / "victim").write_text("precious")
    layout.lock.symlink_to(base / "victim")
    with pytest.raises(UntrustedPath, match="materializer.lock is a symlink"):
        InstanceLock(layout).acquire()
    assert (base / "victim").read_text() == "precious"


def test_secure_layout_creates_private_folders_and_tightens_ours(base: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = base / "root"
    layout = default_layout(root)
    assert secure_layout(layout, root) == []
    for folder in (root, layout.state, layout.media, layout.outputs):
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    os.chmod(layout.media, 0o777)
    os.chmod(layout.outputs, 0o775)
    tightened = secure_layout(layout, root)
    assert [finding.path for finding in tightened] == [layout.media, layout.outputs]
    assert stat.S_IMODE(os.lstat(layout.media).st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(layout.outputs).st_mode) == 0o755
    assert f"tightened {layout.media} to mode 0755: it is writable by group and others (mode 0777)" in caplog.text
    assert inspect_layout(layout, root) == []


def test_inspect_layout_reports_without_changing_anything(base: Path) -> None:
    root = base / "root"
    layout = default_layout(root)
    secure_layout(layout, root)
    os.chmod(layout.state, 0o770)
    (base / "elsewhere").mkdir()
    layout.outputs.rmdir()
    layout.outputs.symlink_to(base / "elsewhere")
    findings = inspect_layout(layout, root)
    assert [(finding.path, finding.tighten_to) for finding in findings] == [(layout.state, 0o750),
                                                                            (layout.outputs, None)]
    assert stat.S_IMODE(os.lstat(layout.state).st_mode) == 0o770
    # With the state folder given elsewhere, the root is not one of the layout's folders.
    os.chmod(root, 0o777)
    assert inspect_layout(Layout(layout.state), base / "unrelated") == findings
    assert inspect_layout(layout, root)[0].path == root


# -- `materializer run` as a process ---------------------------------------------------------------------------


def _refused_start(root: Path) -> tuple[int, str]:
    daemon = DaemonProcess(root, NoBackend()).start()
    assert daemon.process is not None
    code = daemon.process.wait(timeout=60)
    return code, daemon.log.read_text()


def _plant(base: Path, root: Path, what: str) -> Path:
    """Plant ``what`` in a fresh layout under ``root``; return the planted path."""
    layout = default_layout(root)
    secure_layout(layout, root)
    victim = base / "victim"
    if what == "outputs":
        layout.outputs.rmdir()
        victim.mkdir()
        layout.outputs.symlink_to(victim)
        return layout.outputs
    victim.write_bytes(b"")
    planted = {"ledger": layout.ledger, "ledger-wal": layout.ledger.with_name("materializer.db-wal"),
               "lock": layout.lock, "socket": layout.display_socket}[what]
    planted.symlink_to(victim)
    return planted


@pytest.mark.parametrize("what", ["ledger", "ledger-wal", "outputs", "lock", "socket"])
def test_run_refuses_a_planted_symlink_in_one_line_with_exit_2(base: Path, what: str) -> None:
    root = base / "root"
    planted = _plant(base, root, what)
    code, log = _refused_start(root)
    assert code == exits.USAGE
    target = base / "victim"
    fix = ("remove the link, or point --root/--state-dir at the real folder" if what == "outputs"
           else "remove the link; the daemon creates its own file there")
    assert log.splitlines() == [f"materializer run: {planted} is a symlink (to {target}); refusing to follow it; {fix}"]
    # Nothing written through the link, nothing new beside it.
    assert (os.listdir(target) == []) if target.is_dir() else target.read_bytes() == b""
    assert planted.is_symlink()
    assert sorted(os.listdir(base)) == ["root", "root.log", "root.token", "victim"]


def test_run_refuses_a_symlinked_root(base: Path) -> None:
    (base / "real").mkdir()
    (base / "root").symlink_to(base / "real")
    code, log = _refused_start(base / "root")
    assert code == exits.USAGE
    assert log.splitlines() == [f"materializer run: {base / 'root'} is a symlink (to {base / 'real'}); refusing to "
                                "follow it; remove the link, or point --root/--state-dir at the real folder"]
    assert os.listdir(base / "real") == []


def test_run_leaves_a_shared_folder_alone(base: Path) -> None:
    """A root that is shared on purpose (sticky and world-writable, like /tmp) is refused, never chmod-ed."""
    root = base / "root"
    root.mkdir()
    os.chmod(root, 0o1777)
    code, log = _refused_start(root)
    assert code == exits.USAGE
    assert log.splitlines() == [f"materializer run: {root} is writable by group and others (mode 1777), a shared "
                                "folder; point --root/--state-dir at a folder of your own"]
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o1777 and os.listdir(root) == []


@as_root
def test_run_refuses_a_folder_of_another_user(base: Path) -> None:
    """A group- and world-writable ``state/media`` owned by someone else is refused, not used."""
    root = base / "root"
    media = default_layout(root).media
    media.mkdir(parents=True)
    os.chown(media, OTHER_UID, OTHER_UID)
    os.chmod(media, 0o777)
    code, log = _refused_start(root)
    assert code == exits.USAGE
    assert log.splitlines() == [f"materializer run: {media} belongs to uid {OTHER_UID}, not to us (uid 0); "
                                f"chown 0 {media}, or point --root/--state-dir at a folder of your own"]
    assert os.listdir(media) == []
    assert stat.S_IMODE(os.lstat(media).st_mode) == 0o777  # not ours to change


def test_run_tightens_its_own_open_folders_and_says_so(backend: DevBackend, base: Path) -> None:
    root = base / "root"
    layout = default_layout(root)
    secure_layout(layout, root)
    os.chmod(layout.media, 0o777)
    os.chmod(layout.outputs, 0o770)
    with DaemonProcess(root, backend) as daemon:
        [job] = backend.create_jobs(prompt="after tightening")
        wait_until(lambda: ledger_jobs(root).get(job) == "materialized", what="the job materialized")
        log = daemon.log.read_text()
    assert stat.S_IMODE(os.lstat(layout.media).st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(layout.outputs).st_mode) == 0o750
    assert f"tightened {layout.media} to mode 0755: it is writable by group and others (mode 0777)" in log
    assert f"tightened {layout.outputs} to mode 0750: it is writable by group (mode 0770)" in log


def test_status_reports_what_run_would_refuse(base: Path) -> None:
    root = base / "root"
    planted = _plant(base, root, "ledger")
    result = forkserver.run([sys.executable, "-m", "materializer", "status", "--root", str(root), "--json"],
                            capture_output=True, text=True, timeout=60, env=clean_env(XDG_CONFIG_HOME=str(base / "c")))
    assert result.returncode == exits.OK, result.stderr
    report = json.loads(result.stdout)
    assert report["untrusted"] == [{"path": str(planted), "problem": f"is a symlink (to {base / 'victim'}); refusing "
                                    "to follow it", "fix": "remove the link; the daemon creates its own file there"}]
    assert "is a symlink" in report["ledger"]["error"]
    assert (base / "victim").read_bytes() == b""


# -- `materializer watch` against sockets it must not trust ---------------------------------------------------------

def watch(root: Path, base: Path) -> subprocess.CompletedProcess[str]:
    """``materializer watch --since 0 --json`` as a process; a trusted daemon would make it run until stopped."""
    command = [sys.executable, "-m", "materializer", "watch", "--root", str(root), "--since", "0", "--json"]
    return forkserver.run(command, capture_output=True, text=True, timeout=60,
                          env=clean_env(XDG_CONFIG_HOME=str(base / "c")))


@as_root
def test_watch_refuses_a_socket_in_another_users_folder(base: Path) -> None:
    """The issue's case: a world-writable state/media of another user's, their server at display.sock."""
    root = base / "root"
    media = default_layout(root).media
    media.mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "state", 0o755)
    os.chown(media, OTHER_UID, OTHER_UID)
    os.chmod(media, 0o777)
    with foreign_server(default_layout(root).display_socket):
        result = watch(root, base)
    assert result.returncode == exits.USAGE
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"materializer watch: refusing the sidebar socket: {media} belongs to uid {OTHER_UID}, not to us (uid 0); "
        f"chown 0 {media}, or point --root/--state-dir at a folder of your own"]


@as_root
def test_watch_refuses_a_server_of_another_user_on_a_socket_file_of_ours(base: Path) -> None:
    """Folders and socket file all ours (moved and chowned into place): the peer's uid still gives it away."""
    root = base / "root"
    layout = default_layout(root)
    secure_layout(layout, root)
    drop = base / "drop"
    drop.mkdir()
    os.chown(drop, OTHER_UID, OTHER_UID)
    with foreign_server(drop / "s") as server:
        os.replace(drop / "s", layout.display_socket)
        os.chown(layout.display_socket, 0, 0)
        result = watch(root, base)
    assert inspect_layout(layout, root) == []  # everything on disk looks right
    assert result.returncode == exits.USAGE
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"materializer watch: refusing the sidebar socket: {layout.display_socket} is served by uid {OTHER_UID} "
        f"(pid {server.pid}), not by us (uid 0); stop that process, remove the socket and restart the daemon"]


@pytest.mark.parametrize("what", ["symlink", "file", "open folder"])
def test_watch_refuses_what_is_not_the_daemons_socket(base: Path, what: str) -> None:
    root = base / "root"
    layout = default_layout(root)
    secure_layout(layout, root)
    if what == "symlink":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(base / "real.sock"))
        listener.listen(1)
        layout.display_socket.symlink_to(base / "real.sock")
        expected = f"{layout.display_socket} is a symlink (to {base / 'real.sock'})"
    elif what == "file":
        layout.display_socket.write_text("not a socket")
        expected = f"{layout.display_socket} is not a socket"
    else:
        os.chmod(layout.media, 0o777)
        expected = f"{layout.media} is writable by group and others (mode 0777); chmod go-w {layout.media}"
    result = watch(root, base)
    assert result.returncode == exits.USAGE and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"materializer watch: refusing the sidebar socket: {expected}")
