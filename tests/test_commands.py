"""The commands as a person or a service manager meets them: exit codes, output, signals, reloads."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from materializer.daemon import AUTH_ACTION
from materializer.layout import default_layout
from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend

from helpers import DaemonProcess, gallery, ledger_events, ledger_jobs, output_files, wait_until

COMMANDS = ["run", "replay", "repair", "status", "watch", "query", "doctor", "demo", "gallery", "dev-backend"]


def materializer(*args: str, env: dict[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return forkserver.run([sys.executable, "-m", "materializer", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = materializer(command, "--help")
    assert result.returncode == 0 and "usage: materializer" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_built_alone_has_the_help_errors_and_parse_of_the_whole_command_line(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``main`` builds only the parser its first word names; nothing a person sees may depend on that."""
    from materializer.cli import COMMANDS as BUILT
    from materializer.cli import build_parser

    assert list(BUILT) == COMMANDS
    seen: list[list[Any]] = []
    for wanted in ([command], None):
        outcomes: list[Any] = []
        for argv in ([command, "--help"], [command, "--no-such-flag"], [command]):
            try:
                parsed = build_parser(wanted).parse_args(argv)
            except SystemExit as exit:
                outcomes.append(exit.code)
            else:
                outcomes.append(sorted((k, str(v)) for k, v in vars(parsed).items()))
            outcomes.append(capsys.readouterr())
        seen.append(outcomes)
    assert seen[0] == seen[1]
    assert seen[0][0] == 0 and f"usage: materializer {command}" in seen[0][1].out


def test_without_a_command_word_every_command_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    from materializer.cli import main

    with pytest.raises(SystemExit):
        main(["no-such-command"])
    refusal = capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert all(f"'{command}'" in refusal and f"\n    {command}" in help_text for command in COMMANDS)


def test_version() -> None:
    from materializer import __version__

    assert materializer("--version").stdout.strip() == f"materializer {__version__}"


def test_run_refuses_invalid_configuration_with_exit_2(tmp_path: Path) -> None:
    bad_env = materializer("run", "--root", str(tmp_path), "--convex-url", "http://127.0.0.1:9",
                           env={"MATERIALIZER_DAEMON__DOWNLOAD_CONCURRENCY": "0"})
    assert bad_env.returncode == 2 and "daemon.download_concurrency" in bad_env.stderr
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nconvex_url = "ftp://example"\n')
    bad_file = materializer("run", "--config", str(config), "--root", str(tmp_path))
    assert bad_file.returncode == 2 and "daemon.convex_url" in bad_file.stderr
    missing = materializer("run", "--root", str(tmp_path))
    assert missing.returncode == 2 and "convex_url" in missing.stderr
    assert materializer("run", "--config", str(tmp_path / "nope.toml")).returncode == 2


def test_status_finds_the_state_through_every_layer_and_names_a_bad_location(tmp_path: Path) -> None:
    """`status` reads where the state is without the full validation when the layers are plain; an unusable
    location still goes through it, so the error names the key and the layer (exit 2)."""
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nroot = "{tmp_path / "from-file"}"\n')
    from_file = json.loads(materializer("status", "--json", "--config", str(config)).stdout)
    assert from_file["root"] == str(tmp_path / "from-file")
    assert from_file["stateDir"] == str(tmp_path / "from-file" / "state")
    from_env = json.loads(materializer("status", "--json", "--config", str(config),
                                       env={"MATERIALIZER_DAEMON__STATE_DIR": str(tmp_path / "s")}).stdout)
    assert from_env["root"] == str(tmp_path / "from-file") and from_env["stateDir"] == str(tmp_path / "s")
    empty = materializer("status", "--config", str(config), env={"MATERIALIZER_DAEMON__ROOT": ""})
    assert empty.returncode == 2 and "daemon.root" in empty.stderr and "MATERIALIZER_DAEMON__ROOT" in empty.stderr
    config.write_text("[daemon]\nroot = 7\n")
    not_a_path = materializer("status", "--config", str(config))
    assert not_a_path.returncode == 2 and "daemon.root" in not_a_path.stderr and str(config) in not_a_path.stderr


def test_status_with_the_daemon_stopped_and_running(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    never = json.loads(materializer("status", "--json", "--root", str(root)).stdout)
    assert never["running"] is False and never["ledger"] is None
    with DaemonProcess(root, backend) as daemon:
        job = backend.create_jobs(count=1, share_files=True)[0]
        wait_until(lambda: ledger_jobs(root).get(job) == "materialized", what="the job")
        wait_until(lambda: json.loads(materializer("status", "--json", "--root", str(root)).stdout)
                   .get("connection") == "connected", what="a connected status")
        report = json.loads(materializer("status", "--json", "--root", str(root)).stdout)
        assert report["running"] is True and report["pid"] == daemon.process.pid  # type: ignore[union-attr]
        assert report["counts"]["materialized"] == 1 and report["backlog"] == 0
        assert report["lastEvent"]["type"] in ("media.materialized", "materializer.state")
        assert "running (pid" in materializer("status", "--root", str(root)).stdout
    stopped = json.loads(materializer("status", "--json", "--root", str(root)).stdout)
    assert stopped["running"] is False and stopped["connection"] == "stopped"
    assert stopped["counts"]["materialized"] == 1


def _replay(root: Path, backend: DevBackend, *args: str,
            token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    token = token_file or root.parent / "replay.token"
    if token_file is None:
        token.write_text(backend.token)
    return materializer("replay", "--root", str(root), "--convex-url", backend.url, "--token-file", str(token), *args)


def test_replay_materializes_what_is_missing_once(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    jobs = backend.create_jobs(count=5, images=2, share_files=True)
    dry = _replay(root, backend, "--dry-run", "--json")
    assert dry.returncode == 0 and sorted(json.loads(dry.stdout)["wouldMaterialize"]) == sorted(jobs)
    assert output_files(root) == []
    first = _replay(root, backend, "--json")
    assert first.returncode == 0, first.stderr
    assert sorted(json.loads(first.stdout)["materialized"]) == sorted(jobs)
    assert len(output_files(root)) == 10
    assert {entry["jobId"] for entry in gallery(root)["jobs"]} == set(jobs)
    again = _replay(root, backend)
    assert again.returncode == 0 and "materialized 0, already present 5, failed 0" in again.stdout
    only = _replay(root, backend, "--job", jobs[0], "--json")
    assert json.loads(only.stdout)["alreadyPresent"] == [jobs[0]]
    assert len(ledger_events(root, "media.materialized")) == 5


def test_replay_exit_codes(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert _replay(root, backend, "--since", "yesterday-ish").returncode == 2
    refused = tmp_path / "refused.token"
    refused.write_text(backend.mint_token("demo-user", -10))
    signed_out = _replay(root, backend, token_file=refused)
    assert signed_out.returncode == 3 and AUTH_ACTION in signed_out.stderr
    backend.create_jobs(count=1, doc={"output": {"images": [{"url": "file:///etc/passwd"}]}})
    failed = _replay(root, backend, "--json")
    assert failed.returncode == 1
    assert "file" in json.loads(failed.stdout)["failed"][0]["reason"]


def test_replay_while_the_daemon_runs_announces_each_job_once(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    with DaemonProcess(root, backend):
        wait_until(lambda: (root / "state/media/display.sock").exists(), what="the daemon up")
        jobs = backend.create_jobs(count=40, images=2, width=128, height=128)
        result = _replay(root, backend, "--json")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: all(ledger_jobs(root).get(j) == "materialized" for j in jobs), what="every job")
        wait_until(lambda: len(gallery(root)["jobs"]) == 40, what="the manifest")
    announced = [e.payload["jobId"] for e in ledger_events(root, "media.materialized")]
    assert sorted(announced) == sorted(jobs)
    assert len(output_files(root)) == 80


class LineReader:
    """Lines from a pipe, each waited for with a deadline (select on the raw descriptor, no hidden buffer)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, b""

    def line(self, timeout: float) -> str:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise AssertionError("no line within the deadline")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError("the stream ended")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def test_watch_prints_sidebar_events(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    with DaemonProcess(root, backend):
        watcher = forkserver.Popen([sys.executable, "-m", "materializer", "watch", "--json", "--since", "0",
                                    "--root", str(root)], stdout=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = LineReader(watcher.stdout.fileno())  # type: ignore[union-attr]
        try:
            job = backend.create_jobs(count=1, share_files=True)[0]
            while True:
                event = json.loads(lines.line(30))
                if event.get("type") == "media.materialized":
                    break
            assert event["payload"]["jobId"] == job
            paths = event["payload"]["asset"]["filePaths"]
            assert [Path(p).name for p in paths] == [f"{job}_0.png"] and all(Path(p).is_absolute() for p in paths)
        finally:
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(timeout=15) == 0


def test_parent_death_stops_the_daemon_cleanly(backend: DevBackend, tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    root = tmp_path / "root"
    daemon = DaemonProcess(root, backend, ["--parent-pid", str(parent.pid)]).start()
    wait_until(lambda: (root / "state/media/display.sock").exists(), what="the daemon up")
    parent.stdin.close()  # type: ignore[union-attr]
    parent.wait(timeout=10)
    assert daemon.process is not None and daemon.process.wait(timeout=30) == 0
    assert "exited: stopping" in daemon.log.read_text()


def test_sigterm_while_starting_stops_cleanly_and_writes_the_gallery(backend: DevBackend, tmp_path: Path) -> None:
    """systemd may stop the unit at any moment: a SIGTERM during start-up is a clean stop, not a death by signal."""
    [job_id] = backend.create_jobs(prompt="before the start")
    root = tmp_path / "root"
    with DaemonProcess(root, backend) as daemon:
        wait_until(lambda: job_id in ledger_jobs(root) and ledger_jobs(root)[job_id] == "materialized", timeout=60,
                   what="the job materialized")
    (default_layout(root).outputs / "gallery.json").unlink()
    daemon = DaemonProcess(root, backend).start()
    assert daemon.wait_catching(signal.SIGTERM), "the daemon never caught SIGTERM"
    assert daemon.signal(signal.SIGTERM) == 0  # still importing the daemon: remembered, then a normal stop
    log = daemon.log.read_text()
    assert "asked to stop while starting" in log and "Traceback" not in log
    assert [entry["jobId"] for entry in gallery(root)["jobs"]] == [job_id]  # rewritten by the stopped run


def test_a_start_rewrites_a_gallery_left_behind_by_a_killed_daemon(backend: DevBackend, tmp_path: Path) -> None:
    [job_id] = backend.create_jobs(prompt="materialized, then the manifest lost")
    root = tmp_path / "root"
    with DaemonProcess(root, backend):
        wait_until(lambda: ledger_jobs(root).get(job_id) == "materialized", timeout=60, what="the job materialized")
    manifest = default_layout(root).outputs / "gallery.json"
    manifest.unlink()
    with DaemonProcess(root, backend):
        wait_until(manifest.exists, timeout=30, what="gallery.json written at start")
        assert [entry["jobId"] for entry in gallery(root)["jobs"]] == [job_id]


def test_systemd_notify_ready_status_and_watchdog(backend: DevBackend, tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="sdn-"))
    address = folder / "notify"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(address))
    sink.settimeout(30)
    root = tmp_path / "root"
    daemon = DaemonProcess(root, backend, env={"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "400000"}).start()
    try:
        seen: list[str] = []
        while not ({"READY=1", "WATCHDOG=1"} <= set(seen) and any(s.startswith("STATUS=connected") for s in seen)):
            seen += sink.recv(4096).decode().splitlines()
        assert daemon.signal(signal.SIGTERM) == 0
        while "STOPPING=1" not in seen:
            seen += sink.recv(4096).decode().splitlines()
    finally:
        sink.close()
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()


def test_token_file_rotation_and_redaction(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    daemon = DaemonProcess(root, backend)
    expired = backend.mint_token("demo-user", -10)
    daemon.token_file.write_text(expired)
    live = backend.token
    forged = live[:-8] + ("A" * 8 if not live.endswith("A" * 8) else "B" * 8)  # live claims, a failing signature

    def status() -> dict[str, Any]:
        return json.loads(materializer("status", "--json", "--root", str(root)).stdout)

    with daemon:
        # An expired token opens no socket: the daemon says it needs a fresh one.
        wait_until(lambda: status().get("connection") == "token_needed", what="token_needed")
        report = status()
        assert "expired" in report["detail"] and report["action"] is None
        # A token the server refuses is a sign-in problem, with the action text for the person.
        daemon.token_file.write_text(forged)
        wait_until(lambda: status().get("connection") == "auth_required", what="auth_required")
        assert status()["action"] == AUTH_ACTION
        job = backend.create_jobs(count=1, share_files=True)[0]
        daemon.token_file.write_text(backend.token)
        wait_until(lambda: ledger_jobs(root).get(job) == "materialized", what="the job after the new token")
    log = daemon.log.read_text()
    assert expired not in log and forged not in log and backend.token not in log
    states = [e.payload["state"] for e in ledger_events(root, "materializer.state")]
    assert states.count("token_needed") >= 1 and states.count("auth_required") >= 1


def test_token_command(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    secret = tmp_path / "secret"
    secret.write_text(backend.token)
    config = tmp_path / "config.toml"
    config.write_text(f'[auth]\ntoken_command = "cat {secret}"\n')
    job = backend.create_jobs(count=1, share_files=True)[0]
    command = [sys.executable, "-m", "materializer", "run", "--config", str(config), "--root", str(root),
               "--convex-url", backend.url]
    with forkserver.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            wait_until(lambda: ledger_jobs(root).get(job) == "materialized" if (root / "state").exists() else False,
                       what="the job with a token from a command")
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and backend.token not in err


def test_token_fd_rotation_keeps_the_daemon_going_across_token_lifetimes(tmp_path: Path) -> None:
    """Launched as the desktop launches it: tokens down an inherited pipe (``--token-fd``), each living 3 s
    (real ones: 5 minutes, ruuxi/stella-v2 backend/convex/auth.ts), fetched from the backend's token
    endpoint with the session cookie as the app fetches them (packages/desktop/electron/services/auth-service.ts)."""
    root = tmp_path / "root"
    read_end, write_end = os.pipe()
    with DevBackend.start(tmp_path / "backend", token_ttl=3, extra_args=["--job-delay", "0.01"]) as backend:
        handed: list[str] = []

        def hand_a_token() -> None:
            handed.append(backend.fetch_token())
            os.write(write_end, f"{handed[-1]}\n".encode())

        hand_a_token()
        command = [sys.executable, "-m", "materializer", "run", "--root", str(root), "--convex-url", backend.url,
                   "--token-fd", str(read_end)]
        with forkserver.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, pass_fds=[read_end]) as process:
            os.close(read_end)
            # The app hands a new token every second, on its own timer, well before expiry (not
            # after each job: a job slowed by a loaded machine must not starve the daemon of tokens).
            stop_handing = threading.Event()

            def the_app() -> None:
                while not stop_handing.wait(1.0):
                    hand_a_token()

            app = threading.Thread(target=the_app, daemon=True)
            app.start()
            try:
                jobs: list[str] = []
                started = time.monotonic()
                # Jobs keep coming while three lifetimes' worth of tokens go by.
                while time.monotonic() - started < 9:
                    jobs += backend.create_jobs(count=1, share_files=True)
                    wait_until(lambda: ledger_jobs(root).get(jobs[-1]) == "materialized"
                               if (root / "state").exists() else False, what="the job")
                    time.sleep(max(0.0, started + len(jobs) - time.monotonic()))  # a job a second, not a wait
                assert all(ledger_jobs(root).get(job) == "materialized" for job in jobs)
                assert backend.stats()["sync_connections"] == 1  # refreshed on the live socket, never closed
            finally:
                stop_handing.set()
                app.join()
                process.send_signal(signal.SIGTERM)
                _, err = process.communicate(timeout=30)
                os.close(write_end)
    assert process.returncode == 0
    assert not any(token in err for token in handed)


def test_config_reload_on_sighup_and_file_change(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = tmp_path / "config.toml"
    config.write_text('[log]\nlevel = "info"\n')
    daemon = DaemonProcess(root, backend, ["--config", str(config)])
    with daemon:
        wait_until(lambda: "materializer running" in daemon.log.read_text(), what="start-up")
        config.write_text('[log]\nlevel = "info"\n[daemon]\nlookback_hours = 1\nmax_attempts = 3\n')
        wait_until(lambda: "daemon.lookback_hours" in daemon.log.read_text(), what="a restart-needed note")
        config.write_text('[daemon]\nmax_attempts = "many"\n')
        daemon.signal_no_wait(signal.SIGHUP)
        wait_until(lambda: "configuration not reloaded" in daemon.log.read_text(), what="the bad edit reported")
        assert "daemon.max_attempts" in daemon.log.read_text().split("configuration not reloaded")[1]
        job = backend.create_jobs(count=1, share_files=True)[0]
        wait_until(lambda: ledger_jobs(root).get(job) == "materialized", what="still working after a bad edit")


def test_demo_end_to_end_with_its_gallery(tmp_path: Path) -> None:
    """``demo --gallery``: the demo (the same run as without the flag), its page from the start, up until Ctrl-C."""
    root = tmp_path / "demo"
    command = [sys.executable, "-m", "materializer", "demo", "--gallery", "--root", str(root)]
    with forkserver.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL) as process:
        try:
            assert process.stdout is not None
            lines: list[str] = []
            while not lines or not lines[-1].startswith("the gallery stays up"):
                line = process.stdout.readline()
                assert line, "".join(lines)
                lines.append(line)
            [url] = {match for line in lines for match in re.findall(r"http://127\.0\.0\.1:\d+/[\w-]+/", line)}
            assert sum(url in line for line in lines) == 2  # when it starts, and when the demo is done
            snapshot = httpx.get(url + "api/snapshot").json()
            assert snapshot["daemon"]["running"] and snapshot["connection"]["state"] == "connected"
            assert len(snapshot["jobs"]) == 14
            assert all(f["thumbnail"] for job in snapshot["jobs"] for f in job["files"])
            assert httpx.get(url.rsplit("/", 2)[0] + "/api/snapshot").status_code == 403
        finally:
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert any("gallery manifest:" in line for line in lines)
    files = output_files(root)
    assert len(files) == 17  # 4 + 1 + 1 + 1 + 10 realtime frames
    assert len(gallery(root)["jobs"]) == 14
