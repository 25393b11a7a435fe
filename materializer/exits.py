"""The exit codes every command shares (``materializer --help`` and the README list them per command)."""

from __future__ import annotations

__all__ = ["FAILED", "INTERRUPTED", "OK", "SIGN_IN_NEEDED", "USAGE"]

#: Done; for ``run``, stopped cleanly.
OK = 0
#: Something failed (with reasons); for ``run``, another daemon holds the state folder.
FAILED = 1
#: A usage or configuration error; also a state folder that cannot be trusted (a planted symlink,
#: another user's folder or file, see :mod:`materializer.layout`), which restarting cannot fix either.
USAGE = 2
#: Sign-in needed: the token is missing, expired or refused (the action text is printed).
SIGN_IN_NEEDED = 3
#: Interrupted (Ctrl-C) where that is not the normal way to stop.
INTERRUPTED = 130
