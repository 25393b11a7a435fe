"""Redaction: no token is ever written, stored or sent, whoever quotes it.

:func:`redact` replaces anything shaped like a JWT, ``Bearer <credential>``, and
every string given to :func:`register_secret` (the token sources register each
token they hand out) with ``[redacted]``. It guards every sink: the log lines
(:mod:`materializer.logs`), and, through :func:`redact_value` on every string
of a JSON value, what the ledger keeps or sends (event payloads, which the
sidebar receives, state, reasons, the gallery's columns, finished job
documents), so a server that quotes a token in an error message cannot get it
stored or sent either.

Standard library only, and no :mod:`logging`: ``materializer status`` imports
the ledger, and so this module, on its way to a fast start.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

__all__ = ["MIN_SECRET_CHARS", "REDACTED", "redact", "redact_value", "register_secret"]

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
