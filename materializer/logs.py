"""Logging: readable lines on a terminal, JSON lines for shippers, and no token ever written.

:func:`setup_logging` installs one handler on the root logger (calling it
again replaces it, so a live reload can change level and format):

- ``text``: ``2025-01-31 12:00:00.123 INFO    materializer.daemon: message key=value``.
  When stderr is connected to the journal (``$JOURNAL_STREAM``, as systemd
  sets it), the time is left to journald and each line starts with a
  ``<priority>`` prefix instead, so ``journalctl -p warning`` works;
- ``json``: one object per line, ``{"ts", "level", "logger", "msg", ...}``
  plus the record's ``extra`` fields and ``exc`` (the traceback).

Everything written passes through :func:`materializer.redaction.redact`, in
messages, arguments, extra fields and tracebacks alike: no token is ever
written (the same function guards what the ledger stores and sends).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from materializer.redaction import redact

__all__ = ["setup_logging"]

#: Loggers of libraries that are chatty below WARNING (every request, frame or file event).
_QUIET_LIBRARIES = ("httpx", "httpcore", "websockets", "watchfiles")
#: syslog priorities (as journald reads them from a ``<N>`` line prefix) from each level up.
_JOURNAL_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields given with ``extra=``."""
    return {key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS and not key.startswith("_")}


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data, every string in it redacted."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {redact(str(key)): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    return redact(str(value))


#: Line breaks and other control characters, as escapes: a message is one line whatever text from a
#: server or a job document it quotes, so no such text can pass for log lines of its own.
_CONTROL_ESCAPES = {code: repr(chr(code))[1:-1] for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
                    if code != 0x09}


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value``, redacted; the message on one line."""

    def __init__(self, fmt: str = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s") -> None:
        super().__init__(fmt, "%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = record.message.translate(_CONTROL_ESCAPES)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            head, newline, tail = line.partition("\n")
            pairs = " ".join(f"{key}={value}" for key, value in extras.items())
            line = f"{head} {pairs}{newline}{tail}"
        return redact(line)


class JournalFormatter(TextFormatter):
    """``<priority>logger: message``: journald stores the time and the priority itself."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((value for level, value in _JOURNAL_PRIORITIES if record.levelno >= level), 7)
        return f"<{priority}>{super().format(record)}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC), ``level``, ``logger``, ``msg``, extras, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            payload.setdefault(key, value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return json.dumps(_jsonable(payload), ensure_ascii=False)


class _Handler(logging.StreamHandler[TextIO]):
    """The one handler :func:`setup_logging` owns."""

    def handleError(self, record: logging.LogRecord) -> None:
        # The default handler prints the record's message and arguments unredacted.
        error = sys.exc_info()[1]
        try:
            self.stream.write(redact(f"--- logging error in {record.name} ({record.pathname}:{record.lineno}): "
                                     f"{type(error).__name__}: {error}") + "\n")
            self.flush()
        except Exception:  # noqa: BLE001 - nowhere left to report it
            pass


def _is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd connected us to (``$JOURNAL_STREAM=dev:ino``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


def setup_logging(level: str, fmt: Literal["text", "json"] = "text", stream: TextIO | None = None) -> None:
    """Send all logging to ``stream`` (stderr by default) at ``level``, in format ``fmt``.

    Idempotent: a second call replaces the handler the first one installed.
    Library loggers stay at WARNING or above; Python warnings are logged too,
    so a JSON stream stays JSON.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}")
    target = stream if stream is not None else sys.stderr
    handler = _Handler(target)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif _is_journal(target):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)

