"""The fork server (stella_devbackend/forkserver.py): what it starts is a real child process, as if executed.

Each test runs ``tests/forkprobe.py`` from a fork server of its own and checks what the probe reports
against what a freshly executed interpreter would see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stella_devbackend import forkserver

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def probe_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS)}


@pytest.fixture(scope="module")
def server(probe_env: dict[str, str]) -> Iterator[forkserver.ForkServer]:
    assert forkserver.become_subreaper(), "PR_SET_CHILD_SUBREAPER is refused here"
    running = forkserver.ForkServer(["forkprobe"], env=probe_env)
    yield running
    running.close()


def probe(server: forkserver.ForkServer, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    kwargs.setdefault("env", {**os.environ, "PYTHONPATH": str(TESTS)})
    return forkserver.Popen([sys.executable, "-m", "forkprobe", *args], fork_server=server, text=True, **kwargs)


def report_of(process: subprocess.Popen[str], stdin: str | None = None) -> tuple[dict[str, Any], str, int]:
    out, err = process.communicate(stdin, timeout=60)
    return json.loads(out), err, process.returncode


def test_a_forked_process_is_a_child_of_ours_with_its_own_arguments_folder_and_environment(
        server: forkserver.ForkServer, probe_env: dict[str, str], tmp_path: Path) -> None:
    env = {**probe_env, "ONLY_IN_THE_CHILD": "yes"}
    env.pop("HOME", None)
    process = probe(server, "3", cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    report, err, code = report_of(process)
    assert report["forked"] is True
    assert report["pid"] == process.pid and report["ppid"] == os.getpid()
    assert code == 3 and err == "to stderr\n"
    assert report["cwd"] == str(tmp_path) and report["path0"] == str(tmp_path)
    assert report["argv"] == [str(TESTS / "forkprobe.py"), "3"]
    assert report["env"] == env


def test_pipes_and_passed_descriptors_reach_it_and_nothing_else_of_ours(server: forkserver.ForkServer) -> None:
    read_end, write_end = os.pipe()
    stray = os.open(os.devnull, os.O_RDONLY)  # open here, not passed: the child must not have it
    try:
        process = probe(server, "0", "--read-stdin", "--write-fd", str(write_end), stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=[write_end])
        os.close(write_end)
        report, _, code = report_of(process, stdin="what the parent wrote")
        assert code == 0 and report["forked"] is True
        assert report["stdin"] == "what the parent wrote"
        assert os.read(read_end, 100) == b"through the passed descriptor"
        assert write_end in report["fds"] and stray not in report["fds"]
        assert {0, 1, 2} <= set(report["fds"])
    finally:
        os.close(read_end)
        os.close(stray)


def test_it_exits_as_an_interpreter_does_waiting_for_its_threads_and_running_atexit(
        server: forkserver.ForkServer, tmp_path: Path) -> None:
    late = tmp_path / "late"
    process = probe(server, "0", "--late-file", str(late), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    report, _, code = report_of(process)
    assert report["forked"] is True and code == 0
    assert late.read_text() == "thread atexit"


def test_signals_reach_it_and_its_death_by_signal_is_seen_as_such(server: forkserver.ForkServer) -> None:
    process = probe(server, "0", "--wait", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    assert json.loads(process.stdout.readline())["forked"] is True
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    process.stdout.close()


def test_what_a_fresh_interpreter_would_start_differently_is_executed(server: forkserver.ForkServer,
                                                                      probe_env: dict[str, str]) -> None:
    """Another interpreter setting, a ``preexec_fn`` or a module not of the server's: not forked."""
    cases: list[dict[str, Any]] = [
        {"env": {**probe_env, "PYTHONHASHSEED": "7"}},
        {"preexec_fn": os.getpid},
    ]
    for kwargs in cases:
        report, _, code = report_of(probe(server, "5", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, **kwargs))
        assert code == 5 and report["forked"] is False and report["ppid"] == os.getpid(), kwargs
    other = forkserver.run([sys.executable, "-m", "json.tool", "--help"], fork_server=server, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 0 and "usage" in other.stdout


def test_run_gives_what_subprocess_run_gives(server: forkserver.ForkServer, probe_env: dict[str, str]) -> None:
    result = forkserver.run([sys.executable, "-m", "forkprobe", "4"], fork_server=server, capture_output=True,
                            text=True, timeout=60, env=probe_env)
    assert result.returncode == 4 and json.loads(result.stdout)["forked"] is True
    with pytest.raises(subprocess.CalledProcessError):
        forkserver.run([sys.executable, "-m", "forkprobe", "4"], fork_server=server, capture_output=True,
                       timeout=60, env=probe_env, check=True)


def test_the_suite_itself_forks_its_daemons_and_backends_unless_asked_not_to(request: pytest.FixtureRequest) -> None:
    assert forkserver.enabled() is not request.config.getoption("--no-fork-server")


def test_a_server_whose_client_goes_away_exits(probe_env: dict[str, str]) -> None:
    running = forkserver.ForkServer(["forkprobe"], env=probe_env)
    running.close()  # closes its socket and waits (30 s at most) for the exit
    assert running.process.poll() == 0
