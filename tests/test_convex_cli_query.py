"""The ``materializer query`` command's logic (``run_query_command``) against the local backend."""

from __future__ import annotations

import asyncio
import io
import json
import math

import pytest

from materializer.convex.cli_query import display_json, run_query_command
from materializer.convex.values import Int64
from materializer.tokens import StaticTokenProvider
from stella_devbackend.control import DevBackend

LIST = "media_jobs:listSucceededSince"
DEADLINE = 30.0  # seconds; a deadline against hangs, never a performance threshold


def test_display_json_is_convex_json_with_whole_numbers_plain() -> None:
    assert display_json({"createdAt": 1717000000000.0, "ratio": 1.5, "n": Int64(3), "raw": b"\x01",
                         "inf": math.inf, "huge": 1e300, "ok": True, "none": None, "text": "é"}) == (
        '{"createdAt":1717000000000,"ratio":1.5,"n":{"$integer":"AwAAAAAAAAA="},"raw":{"$bytes":"AQ=="},'
        '"inf":{"$float":"AAAAAAAA8H8="},"huge":1e+300,"ok":true,"none":null,"text":"é"}'
    )


async def test_one_shot_prints_one_json_line(backend: DevBackend) -> None:
    [job] = await asyncio.to_thread(backend.create_jobs, count=1, completedAt=1717000000000)
    out = io.StringIO()
    code = await run_query_command(LIST, {"since": 0}, backend.url, StaticTokenProvider(backend.token), False, out)
    assert code == 0
    [line] = out.getvalue().splitlines()
    [printed] = json.loads(line)
    assert printed["jobId"] == job
    assert line.count('"completedAt":1717000000000,') == 1  # a whole float64 is printed as the number it is


async def test_one_shot_function_error_exits_1_with_the_error_on_stderr(
    backend: DevBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    code = await run_query_command(LIST, {"since": "x"}, backend.url, StaticTokenProvider(backend.token), False, out)
    assert code == 1 and out.getvalue() == ""
    error = json.loads(capsys.readouterr().err)
    assert "ArgumentValidationError" in error["error"]


async def test_one_shot_refused_or_missing_token_exits_3(
    backend: DevBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    assert await run_query_command(LIST, {"since": 0}, backend.url, StaticTokenProvider("nope"), False, out) == 3
    assert "refused the token (HTTP 401)" in capsys.readouterr().err
    assert await run_query_command(LIST, {"since": 0}, backend.url, StaticTokenProvider(" "), False, out) == 3
    assert "no token: the given token is empty" in capsys.readouterr().err
    assert out.getvalue() == ""


async def test_unreachable_deployment_exits_1(unused_tcp_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_query_command(LIST, {}, f"http://127.0.0.1:{unused_tcp_port}", None, False, io.StringIO())
    assert code == 1 and "ConnectError" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["not", "an", "object"], {"since": object()}, {"$bad": 1}])
async def test_bad_args_exit_2(args: object, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_query_command(LIST, args, "http://127.0.0.1:9", None, True, io.StringIO())  # type: ignore[arg-type]
    assert code == 2 and "bad args" in capsys.readouterr().err


async def test_watch_prints_every_new_result_across_disconnects_and_a_restart(backend: DevBackend) -> None:
    out = io.StringIO()
    command = asyncio.create_task(run_query_command(
        LIST, {"since": 0, "limit": 200}, backend.url, StaticTokenProvider(backend.token), True, out))

    def printed_ids() -> list[list[str]]:
        return [[job["jobId"] for job in json.loads(line)] for line in out.getvalue().splitlines()]

    async def printed(expected_newest_first: list[str]) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE
        while not printed_ids() or printed_ids()[-1] != expected_newest_first:
            assert loop.time() < end, f"timed out; printed so far: {printed_ids()}"
            await asyncio.sleep(0.01)

    await printed([])
    created: list[str] = []
    for step in range(3):
        created += await asyncio.to_thread(backend.create_jobs, count=1)
        await printed(created[::-1])
        await asyncio.to_thread(backend.drop_connections if step < 2 else backend.restart)
    created += await asyncio.to_thread(backend.create_jobs, count=1)
    await printed(created[::-1])
    assert printed_ids() == [created[:n][::-1] for n in range(len(created) + 1)]  # one line per new result
    command.cancel()
    with pytest.raises(asyncio.CancelledError):
        await command
