"""Logging: both formats, the journal prefix, and tokens redacted from every part of a record."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from materializer.logs import setup_logging
from materializer.redaction import REDACTED, redact, register_secret
from stella_devbackend.jwt import sign_hs256

JWT = sign_hs256({"sub": "user_123", "exp": 4_000_000_000}, b"k" * 32)
OPAQUE = "opaque-credential-9f8e7d"

log = logging.getLogger("materializer.test")


@pytest.fixture
def logging_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Put the root logger, library levels and warning capture back as they were."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "websockets", "watchfiles")}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)
    logging.captureWarnings(False)


@pytest.fixture
def stream(logging_restored: None) -> io.StringIO:
    return io.StringIO()


def emit_everywhere(secret: str) -> None:
    """Log ``secret`` in every place a record can carry it."""
    log.info("in the message " + secret)
    log.info("in an argument %s", secret)
    log.info("in a mapping argument %(value)s", {"value": secret})
    log.info("in the extra fields", extra={"token": secret, "nested": {"header": [f"x {secret}"]}})
    try:
        try:
            raise KeyError(secret)
        except KeyError as inner:
            raise RuntimeError(f"refused {secret}") from inner
    except RuntimeError:
        log.exception("in a traceback")
    log.warning("in the stack", stack_info=True, extra={"why": secret})


SECRETS: list[tuple[str, Callable[[], str]]] = [
    ("jwt", lambda: JWT),
    ("bearer", lambda: f"Authorization: Bearer {OPAQUE}"),
    ("jwt in json", lambda: json.dumps({"type": "Authenticate", "value": JWT})),
]


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(("name", "make"), SECRETS, ids=[name for name, _ in SECRETS])
def test_tokens_never_reach_the_output(
    stream: io.StringIO, fmt: str, name: str, make: Callable[[], str]
) -> None:
    setup_logging("debug", fmt, stream)  # type: ignore[arg-type]
    emit_everywhere(make())
    output = stream.getvalue()
    assert JWT not in output and OPAQUE not in output
    assert JWT.split(".")[1] not in output  # not even the claims
    assert output.count(REDACTED) >= 7
    assert "in a traceback" in output and "RuntimeError" in output and "KeyError" in output
    if fmt == "json":
        records = [json.loads(line) for line in output.splitlines()]
        assert len(records) == 6
        assert all(REDACTED in record["token"] for record in records if "token" in record)
        assert REDACTED in records[4]["exc"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_registered_secrets_are_redacted_even_when_json_would_escape_them(stream: io.StringIO, fmt: str) -> None:
    secret = 'plain "quoted" sécret\\value'
    register_secret(secret)
    setup_logging("info", fmt, stream)  # type: ignore[arg-type]
    emit_everywhere(secret)
    output = stream.getvalue()
    assert secret not in output
    assert json.dumps(secret)[1:-1] not in output
    assert "sécret" not in output and "s\\u00e9cret" not in output


def test_registering_blank_or_tiny_text_redacts_nothing(stream: io.StringIO) -> None:
    register_secret("   ")
    register_secret("")
    register_secret("t")  # no credential is one character long; redacting it would garble every line
    setup_logging("info", "text", stream)
    log.info("a  b test")
    assert stream.getvalue().endswith("materializer.test: a  b test\n")


def test_rotated_tokens_stay_redacted(stream: io.StringIO) -> None:
    old, new = "rotated-token-old-111", "rotated-token-new-222"
    register_secret(old)
    register_secret(new)
    setup_logging("info", "text", stream)
    log.info("%s then %s", old, new)
    assert old not in stream.getvalue() and new not in stream.getvalue()


def test_a_broken_log_call_does_not_leak_its_arguments(stream: io.StringIO, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "text", stream)
    root = logging.getLogger()
    root.handlers[:] = root.handlers[-1:]  # only ours: pytest's capture handler raises on this error
    log.info("two placeholders %s %s", JWT)  # too few arguments: logging's own error path
    captured = capsys.readouterr()
    assert "logging error in materializer.test" in stream.getvalue()
    for output in (stream.getvalue(), captured.err, captured.out):
        assert JWT not in output


def test_python_warnings_are_logged_and_redacted(stream: io.StringIO) -> None:
    setup_logging("info", "json", stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"odd token {JWT}", UserWarning, stacklevel=1)
    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["logger"] == "py.warnings"
    assert JWT not in record["msg"] and REDACTED in record["msg"]


def test_redact_leaves_ordinary_text_alone() -> None:
    ordinary = [
        "GET https://cdn.example-host.provider.net/a/b.png 200",
        'WWW-Authenticate: Bearer realm="stella-media"',
        "job_abc.def.ghi materialized as job_abc.def.ghi_0.png",
        "Bearer",
    ]
    for text in ordinary:
        assert redact(text) == text
    assert redact(f"token={JWT}&x=1") == f"token={REDACTED}&x=1"
    assert redact(f"bearer {OPAQUE}, next") == f"bearer {REDACTED}, next"


def test_text_lines_are_readable(stream: io.StringIO) -> None:
    setup_logging("info", "text", stream)
    log.info("materialized %d files", 4, extra={"job_id": "job_1"})
    line = stream.getvalue()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO    materializer\.test: materialized 4 files job_id=job_1\n", line
    )


def test_json_lines_carry_the_fields_and_extras(stream: io.StringIO) -> None:
    setup_logging("debug", "json", stream)
    log.debug("gap detected", extra={"since_ms": 5, "until_ms": 9.5, "ids": ("a", "b"), "path": Path("/r")})
    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["ts"])
    assert record | {"ts": None} == {
        "ts": None,
        "level": "debug",
        "logger": "materializer.test",
        "msg": "gap detected",
        "since_ms": 5,
        "until_ms": 9.5,
        "ids": ["a", "b"],
        "path": "/r",
    }


def test_lines_to_the_journal_carry_a_priority_instead_of_a_time(
    logging_restored: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with (tmp_path / "journal").open("w+") as journal:
        status = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        setup_logging("debug", "text", journal)
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e %s", JWT)
        journal.seek(0)
        lines = journal.read().splitlines()
    assert lines == [
        "<7>materializer.test: d",
        "<6>materializer.test: i",
        "<4>materializer.test: w",
        f"<3>materializer.test: e {REDACTED}",
    ]


def test_another_stream_is_not_the_journal(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    setup_logging("info", "text", stream)
    log.info("x")
    assert not stream.getvalue().startswith("<")


def test_setup_is_idempotent_and_a_second_call_reconfigures(stream: io.StringIO) -> None:
    setup_logging("info", "text", stream)
    setup_logging("warning", "json", stream)
    log.info("dropped")
    log.warning("kept")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["msg"] == "kept"


def test_library_chatter_stays_below_the_line(stream: io.StringIO) -> None:
    setup_logging("debug", "text", stream)
    logging.getLogger("httpx").info("HTTP Request: GET https://x")
    logging.getLogger("httpcore.connection").debug("connect_tcp.started")
    logging.getLogger("httpx").warning("worth seeing")
    assert stream.getvalue().count("\n") == 1
    assert "worth seeing" in stream.getvalue()


@pytest.mark.parametrize(("level", "fmt"), [("loud", "text"), ("info", "xml")])
def test_unknown_level_or_format_is_refused(logging_restored: None, level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        setup_logging(level, fmt)  # type: ignore[arg-type]
