"""Logging: readable lines on a terminal, JSON lines for shippers, and no token ever written.

:func:`setup_logging` installs one handler on the root logger (calling it
again replaces it, so a live reload can change level and format):

- ``text``: ``2025-01-31 12:00:00.123 INFO    materializer.daemon: message key=value``.
  When stderr is connected to the journal (``$JOURNAL_STREAM``, as systemd
  sets it), the time is left to journald and each line starts with a
  ``<priority>`` prefix instead, so ``journalctl -p warning`` works;
- ``json``: one object per line, ``{"ts", "level", "logger", "msg", ...}``
  plus the record's ``extra`` fields and ``exc`` (the traceback).

Everything written passes through :func:`redact`: anything shaped like a JWT,
``Bearer <credential>``, and every string given to :func:`register_secret`
(the token sources register each token they hand out) become
``[redacted]``, in messages, arguments, extra fields and tracebacks alike.

Logs are not the only sink. The same function guards everything the
materializer keeps or sends: :func:`redact_value` applies it to every string
of a JSON value, and the ledger passes through it what it stores (event
payloads, which the sidebar receives, state, reasons, the gallery's
columns, finished job documents), so a server that quotes a token in an
error message cannot get it stored or sent either.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

__all__ = ["REDACTED", "redact", "redact_value", "register_secret", "setup_logging"]

REDACTED = "[redacted]"

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# `Bearer realm="..."` (a WWW-Authenticate challenge) carries no credential.
_BEARER = re.compile(r"\b(Bearer\s+)(?!realm=)[^\s\"',;]+", re.IGNORECASE)
#: How many registered secrets are remembered (the newest win): a rotated token can still
#: turn up in a late error message, but the list must not grow for ever.
_MAX_SECRETS = 32

_secrets_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
_secrets_pattern: re.Pattern[str] | None = None

#: Loggers of libraries that are chatty below WARNING (every request, frame or file event).
_QUIET_LIBRARIES = ("httpx", "httpcore", "websockets", "watchfiles")
#: syslog priorities (as journald reads them from a ``<N>`` line prefix) from each level up.
_JOURNAL_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


#: The shortest text :func:`register_secret` takes as a secret.
MIN_SECRET_CHARS = 8


def register_secret(secret: str) -> None:
    """Redact ``secret`` (exactly, wherever it appears) from every log line from now on.

    Text shorter than :data:`MIN_SECRET_CHARS` is no credential (a JWT is hundreds of characters),
    and redacting it everywhere would garble every line that happens to contain it.
    """
    global _secrets, _secrets_pattern
    if len(secret.strip()) < MIN_SECRET_CHARS:
        return
    with _secrets_lock:
        kept = tuple(s for s in _secrets if s != secret)[-(_MAX_SECRETS - 1):] + (secret,)
        # Also as repr() and JSON show it (a traceback quoting an exception argument, a logged
        # payload), where quotes, backslashes and other characters come out escaped.
        spellings = {
            spelling
            for s in kept
            for spelling in (s, repr(s)[1:-1], json.dumps(s)[1:-1], json.dumps(s, ensure_ascii=False)[1:-1])
        }
        # Longest first, so a secret containing another is replaced whole.
        alternatives = sorted(spellings, key=len, reverse=True)
        _secrets_pattern = re.compile("|".join(re.escape(s) for s in alternatives))
        _secrets = kept


def redact(text: str) -> str:
    """``text`` with registered secrets, JWTs and bearer credentials replaced by ``[redacted]``."""
    pattern = _secrets_pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _JWT.sub(REDACTED, text)
    return _BEARER.sub(lambda match: match.group(1) + REDACTED, text)


def redact_value(value: Any) -> Any:
    """A JSON value (dicts, lists, strings, numbers) with :func:`redact` applied to every string and key.

    Structural, not on serialized text: a credential that ends in a JSON escape cannot take the escape
    with it and break the document.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(key) if isinstance(key, str) else key: redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(item) for item in value]
    return value


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

