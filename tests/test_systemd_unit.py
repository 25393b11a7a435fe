"""The shipped user unit: `systemd-analyze --user verify` accepts it without a word, and it says what it must."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from materializer import exits

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "stella-materializer.service"


def unit_section(name: str) -> dict[str, list[str]]:
    """``Key: [values]`` of one section (keys may repeat in unit files)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == f"[{name}]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_the_unit_verifies_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install systemd (apt-get install systemd) to verify the unit"
    # A home where ExecStart's %h/.local/bin/materializer exists, and a runtime folder for the user manager.
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    executable = home / ".local" / "bin" / "materializer"
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    environment = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}

    result = subprocess.run(
        [analyze, "--user", "verify", str(UNIT)], env=environment, capture_output=True, text=True, timeout=60
    )

    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verify_would_notice_a_missing_executable(tmp_path: Path) -> None:
    """The check above is real: without the executable, verify complains."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install systemd (apt-get install systemd) to verify the unit"
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    environment = {**os.environ, "HOME": str(tmp_path / "empty-home"), "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run(
        [analyze, "--user", "verify", str(UNIT)], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "/empty-home/.local/bin/materializer is not executable" in result.stderr


def test_the_unit_is_a_notify_service_with_a_watchdog_and_a_sandbox() -> None:
    service = unit_section("Service")
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "%h/.local/bin/materializer run",
        "Restart": "on-failure",
        "RestartPreventExitStatus": f"{exits.USAGE} {exits.LEDGER_DAMAGED}",
        "WatchdogSec": "30",
        "TimeoutStopSec": "15",
        "UMask": "0077",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "%h/.stella",
        "PrivateTmp": "yes",
        "PrivateUsers": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: service.get(key, [None])[-1] for key in expected} == expected
    assert "RestartSec" in service
    assert "ExecReload" in service  # SIGHUP reloads the configuration


def test_the_unit_installs_into_the_user_session() -> None:
    assert unit_section("Install") == {"WantedBy": ["default.target"]}
