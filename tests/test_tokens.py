"""Token providers: static, environment, file (really watched), command (really run)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from materializer.config_values import DEFAULTS
from materializer.tokens import (
    CommandTokenProvider,
    EnvTokenProvider,
    FdTokenProvider,
    FileTokenProvider,
    StaticTokenProvider,
    TokenProvider,
    TokenSourceError,
    provider_from_values,
)

SECRET = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIn0.c2lnbmF0dXJlLWJ5dGVz"
DEADLINE = 20.0  # seconds; a deadline against hangs, never a performance threshold


async def still_waiting(task: asyncio.Task[Any]) -> bool:
    """Give the task a few turns of the loop; True if it is still waiting."""
    for _ in range(20):
        await asyncio.sleep(0)
    return not task.done()


async def finishes(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, DEADLINE)


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


# -- static and environment ------------------------------------------------------------------------


async def test_static_token_is_stripped_and_never_changes() -> None:
    provider = StaticTokenProvider(f"  {SECRET}\n")
    assert isinstance(provider, TokenProvider)
    assert await provider.get() == SECRET == await provider.get(force_refresh=True)
    await finishes(provider.wait_changed("something else"))
    waiting = asyncio.create_task(provider.wait_changed(SECRET))
    assert await still_waiting(waiting)
    waiting.cancel()
    assert SECRET not in repr(provider) and SECRET not in str(provider)


async def test_empty_static_token_is_no_token() -> None:
    provider = StaticTokenProvider("   ")
    assert await provider.get() is None
    assert provider.last_error == "the given token is empty"


async def test_env_token_is_read_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STELLA_TOKEN", raising=False)
    provider = EnvTokenProvider()
    assert await provider.get() is None
    assert provider.last_error == "environment variable STELLA_TOKEN is unset or empty"
    monkeypatch.setenv("STELLA_TOKEN", f"\t{SECRET} ")
    assert await provider.get() == SECRET
    assert provider.last_error is None
    await finishes(provider.wait_changed(None))
    waiting = asyncio.create_task(provider.wait_changed(SECRET))
    assert await still_waiting(waiting)
    waiting.cancel()
    assert SECRET not in repr(provider)
    assert repr(EnvTokenProvider("OTHER")) == "EnvTokenProvider(name='OTHER')"


def test_env_provider_needs_a_name() -> None:
    with pytest.raises(TokenSourceError):
        EnvTokenProvider("")


# -- file --------------------------------------------------------------------------------------------------


@pytest.fixture
async def file_provider(tmp_path: Path) -> AsyncIterator[FileTokenProvider]:
    provider = FileTokenProvider(tmp_path / "token")
    yield provider
    await provider.aclose()


async def test_file_token_is_read_on_every_get(file_provider: FileTokenProvider) -> None:
    path = file_provider.path
    assert await file_provider.get() is None
    assert file_provider.last_error == f"token file {path} does not exist"
    path.write_text("\n\n")
    assert await file_provider.get() is None
    assert file_provider.last_error == f"token file {path} is empty"
    path.write_text(f"{SECRET}\n")
    assert await file_provider.get() == SECRET and file_provider.last_error is None
    path.write_bytes(b"\xff\xfe not utf-8")
    assert await file_provider.get() is None
    assert file_provider.last_error == f"token file {path} cannot be read: UnicodeDecodeError"
    assert SECRET not in repr(file_provider)


async def test_file_wait_changed_wakes_on_a_rewritten_file(file_provider: FileTokenProvider) -> None:
    file_provider.path.write_text("first-token")
    waiting = asyncio.create_task(file_provider.wait_changed("first-token"))
    while not file_provider.watching:
        await asyncio.sleep(0)
    assert await still_waiting(waiting)
    write_atomically(file_provider.path, "second-token\n")
    await finishes(waiting)
    assert await file_provider.get() == "second-token"


async def test_file_wait_changed_wakes_when_the_file_appears_and_ignores_same_content(
    file_provider: FileTokenProvider,
) -> None:
    waiting = asyncio.create_task(file_provider.wait_changed(None))
    while not file_provider.watching:
        await asyncio.sleep(0)
    (file_provider.path.parent / "unrelated").write_text("x")
    file_provider.path.write_text("   \n")  # still no token
    # Each change wakes the watcher; the waiter re-reads and keeps waiting while there is no token.
    assert await still_waiting(waiting)
    file_provider.path.write_text(SECRET)
    await finishes(waiting)


async def test_file_wait_changed_returns_at_once_when_already_different(file_provider: FileTokenProvider) -> None:
    file_provider.path.write_text("new")
    await finishes(file_provider.wait_changed("old"))


async def test_file_watch_stops_on_aclose_and_can_start_again(file_provider: FileTokenProvider) -> None:
    file_provider.path.write_text("a")
    waiting = asyncio.create_task(file_provider.wait_changed("a"))
    while not file_provider.watching:
        await asyncio.sleep(0)
    waiting.cancel()
    await file_provider.aclose()
    assert not file_provider.watching
    waiting = asyncio.create_task(file_provider.wait_changed("a"))
    while not file_provider.watching:
        await asyncio.sleep(0)
    write_atomically(file_provider.path, "b")
    await finishes(waiting)


def test_file_provider_needs_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(TokenSourceError, match="does not exist"):
        FileTokenProvider(tmp_path / "missing" / "token")


# -- command -------------------------------------------------------------------------------------------------------


def command(tmp_path: Path, body: str) -> list[str]:
    """A real command: a small Python script that counts its runs in ``runs``."""
    script = tmp_path / "token_command.py"
    script.write_text(
        "import pathlib, sys\n"
        f"here = pathlib.Path({str(tmp_path)!r})\n"
        "runs = here / 'runs'\n"
        "runs.write_text(str(int(runs.read_text() or 0) + 1) if runs.exists() else '1')\n"
        + body
    )
    return [sys.executable, str(script)]


def runs(tmp_path: Path) -> int:
    path = tmp_path / "runs"
    text = path.read_text() if path.exists() else ""
    return int(text) if text else 0


async def test_command_token_runs_once_then_on_force_refresh(tmp_path: Path) -> None:
    (tmp_path / "source").write_text(SECRET)
    provider = CommandTokenProvider(command(tmp_path, "print('  ' + (here / 'source').read_text() + '  ')"))
    assert await provider.get() == SECRET
    assert await provider.get() == SECRET
    assert runs(tmp_path) == 1
    (tmp_path / "source").write_text("rotated")
    assert await provider.get() == SECRET  # cached until asked to refresh
    assert await provider.get(force_refresh=True) == "rotated"
    assert runs(tmp_path) == 2
    assert SECRET not in repr(provider)


async def test_command_failure_is_no_token_with_a_reason_that_hides_tokens(tmp_path: Path) -> None:
    provider = CommandTokenProvider(
        command(tmp_path, f"print({SECRET!r}); sys.stderr.write('bad session ' + {SECRET!r} + '\\n'); sys.exit(3)")
    )
    assert await provider.get() is None
    assert provider.last_error is not None
    assert "exited with status 3: bad session <redacted>" in provider.last_error
    assert SECRET not in provider.last_error


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["/nonexistent/token-command"], "could not start"),
        ([sys.executable, "-c", "print('   ')"], "printed nothing"),
        ([sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'\\xff')"], "not UTF-8"),
    ],
)
async def test_command_problems_are_explained(argv: list[str], reason: str) -> None:
    provider = CommandTokenProvider(argv)
    assert await provider.get() is None
    assert provider.last_error is not None and reason in provider.last_error


async def test_command_that_hangs_is_killed(tmp_path: Path) -> None:
    provider = CommandTokenProvider([sys.executable, "-c", "import time; time.sleep(600)"], timeout=0.2)
    assert await finishes(provider.get()) is None
    assert provider.last_error is not None and "did not finish" in provider.last_error


async def test_command_wait_changed_polls_until_the_answer_changes(tmp_path: Path) -> None:
    (tmp_path / "source").write_text("one")
    provider = CommandTokenProvider(command(tmp_path, "print((here / 'source').read_text())"), poll_interval=0.01)
    assert await provider.get() == "one"
    waiting = asyncio.create_task(provider.wait_changed("one"))
    while runs(tmp_path) < 3:  # it keeps asking while the answer is the same
        await asyncio.sleep(0.01)
    assert not waiting.done()
    (tmp_path / "source").write_text("two")
    await finishes(waiting)
    assert await provider.get() == "two"


def test_only_the_command_needs_polling_to_see_a_change(tmp_path: Path) -> None:
    assert CommandTokenProvider(["true"]).polls_for_changes
    assert not StaticTokenProvider("t").polls_for_changes
    assert not EnvTokenProvider().polls_for_changes
    assert not FileTokenProvider(tmp_path / "token").polls_for_changes


def test_command_must_not_be_empty() -> None:
    with pytest.raises(TokenSourceError):
        CommandTokenProvider("  ")


def test_command_string_is_split_like_a_shell() -> None:
    assert CommandTokenProvider("stella auth 'print token'").argv == ["stella", "auth", "print token"]


# -- a file descriptor the launching app writes to ------------------------------------------------------


@pytest.fixture
def pipe() -> Any:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


async def test_fd_tokens_arrive_line_by_line_and_the_newest_wins(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    provider = FdTokenProvider(read_end, first_token_timeout=DEADLINE)
    first = asyncio.create_task(provider.get())
    assert await still_waiting(first)  # the first get waits for a first line
    os.write(write_end, b"tok-one\n")
    assert await finishes(first) == "tok-one"
    changed = asyncio.create_task(provider.wait_changed("tok-one"))
    os.write(write_end, b"tok-two\ntok-thr")  # a line and a half: only complete lines count
    await finishes(changed)
    assert await provider.get() == "tok-two"
    os.write(write_end, b"ee\n\n")
    await finishes(provider.wait_changed("tok-two"))
    assert await provider.get(force_refresh=True) == "tok-three"
    assert "tok" not in repr(provider)
    await provider.aclose()


async def test_fd_end_of_file_keeps_the_last_token_and_waits_without_spinning(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    provider = FdTokenProvider(read_end)
    os.write(write_end, b"the-token\n")
    assert await finishes(provider.get()) == "the-token"
    os.close(write_end)
    waiting = asyncio.create_task(provider.wait_changed("the-token"))
    assert await still_waiting(waiting)
    assert await provider.get() == "the-token"
    waiting.cancel()
    await provider.aclose()


async def test_fd_closed_before_any_token_says_so(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    provider = FdTokenProvider(read_end, first_token_timeout=DEADLINE)
    os.close(write_end)
    assert await finishes(provider.get()) is None
    assert provider.last_error == f"file descriptor {read_end} closed before any token arrived"
    await provider.aclose()


def test_a_closed_fd_is_a_configuration_error() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(TokenSourceError, match=f"token file descriptor {read_end} is not open"):
        FdTokenProvider(read_end)


def test_the_configuration_chooses_one_source_fd_then_command_then_file_then_environment(tmp_path: Path) -> None:
    values = {**DEFAULTS, "auth.token_env": "MY_TOKEN"}
    chosen = provider_from_values(values)
    assert isinstance(chosen, EnvTokenProvider) and chosen.name == "MY_TOKEN"
    values["auth.token_file"] = str(tmp_path / "token")
    assert isinstance(provider_from_values(values), FileTokenProvider)
    values["auth.token_command"] = "print-token --fresh"
    command = provider_from_values(values)
    assert isinstance(command, CommandTokenProvider) and command.argv == ["print-token", "--fresh"]
    read_end, write_end = os.pipe()
    try:
        values["auth.token_fd"] = read_end
        assert isinstance(provider_from_values(values), FdTokenProvider)
    finally:
        os.close(read_end)
        os.close(write_end)
