"""The exit codes every command shares (``materializer --help`` and the README list them per command)."""

from __future__ import annotations

__all__ = ["FAILED", "INTERRUPTED", "LEDGER_DAMAGED", "OK", "SIGN_IN_NEEDED", "USAGE"]

#: Done; for ``run``, stopped cleanly.
OK = 0
#: Something failed (with reasons); for ``run``, another daemon holds the state folder.
FAILED = 1
#: A usage or configuration error; also a state folder that cannot be trusted (a planted symlink,
#: another user's folder or file, see :mod:`materializer.layout`), which restarting cannot fix either.
USAGE = 2
#: Sign-in needed: the token is missing, expired or refused (the action text is printed).
SIGN_IN_NEEDED = 3
#: The ledger is there but unusable (empty, truncated, garbled, another program's database, or from a newer
#: version): left as it is, with a one-line message naming it and the way out (``materializer repair``).
#: Restarting cannot help, so the systemd unit does not.
LEDGER_DAMAGED = 4
#: Interrupted (Ctrl-C) where that is not the normal way to stop.
INTERRUPTED = 130
