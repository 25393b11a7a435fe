"""``materializer watch``: the reference sidebar client.

Follows the Display sidebar socket (see :mod:`materializer.display`) and
prints each event: with ``--json`` every event line exactly as the daemon sent
it, otherwise one readable line per event::

    14:03:07 #42 media.materialized job_abc (text_to_image) /home/me/.stella/state/media/outputs/job_abc_0.png

The time is when ``watch`` received the event (the wire format carries none).
Text from the daemon is printed with control characters escaped, so a hostile
prompt or job id cannot drive the terminal.

Without ``--since`` only events from now on are printed; ``--since N`` first
prints the kept events after seq ``N``. Either way ``watch`` remembers the last
seq it printed: when the daemon goes away (a restart, a crash) it waits and
reconnects with exponential backoff, resuming right after that seq, so nothing
is printed twice and nothing published meanwhile is missed. For the same
reason it starts even when the daemon is not running yet: it says so on
stderr and waits for it, and when the daemon has as many sidebar clients as
it takes (``too_many_clients``) it says so and tries again the same way.
Status messages go to stderr, events to ``out``.

:func:`run_watch` runs until cancelled (Ctrl-C); it returns 1 only when
waiting cannot help: the socket path cannot be used at all, or the daemon
refused the request.

It trusts only the daemon's own socket: before every connection the folders
above it must be real folders of ours that nobody else may write to and the
socket a socket of ours (:mod:`materializer.layout`), and the process that
answers must run as us (``SO_PEERCRED``). Anything else (a symlink, another
user's folder or socket, a server of another user's) could forge events, so
``watch`` says what it found and the fix, and returns 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from materializer import exits
from materializer.display import ERROR, HELLO, PRUNED, SKIPPED, TOO_MANY_CLIENTS, WELCOME
from materializer.layout import Finding, check_file, check_folder

__all__ = ["format_event", "run_watch"]

_FIRST_RETRY_DELAY = 0.1
#: Event lines are small; this only bounds a misbehaving peer.
_MAX_LINE = 16 * 1024 * 1024


class _GiveUp(Exception):
    """The daemon refused the hello or sent garbage: reconnecting would not help."""


class _Busy(Exception):
    """The daemon has all the sidebar clients it takes: reconnecting later will help."""


async def run_watch(
    socket_path: Path,
    since: int | None,
    as_json: bool,
    out: TextIO,
    *,
    err: TextIO | None = None,
    max_retry_delay: float = 5.0,
    folders: Sequence[Path] | None = None,
) -> int:
    """Print the sidebar events of the daemon at ``socket_path`` until cancelled.

    ``since``: also print the kept events after this seq (``None``: only new
    ones). ``folders``: the folders to check above the socket, outermost
    first (default: the socket's own). Returns 1, after a message on ``err``
    (stderr by default), if the socket cannot be used or the daemon refuses
    the request; 2 if the socket cannot be trusted.
    """
    err = err if err is not None else sys.stderr
    follower = _Follower(since, as_json, out)
    folders = [socket_path.parent] if folders is None else list(folders)
    delay = _FIRST_RETRY_DELAY
    said_waiting = said_busy = False
    while True:
        untrusted = _untrusted(socket_path, folders)
        if untrusted is not None:
            _say(err, f"refusing the sidebar socket: {untrusted.message}")
            return exits.USAGE
        try:
            reader, writer = await asyncio.open_unix_connection(socket_path, limit=_MAX_LINE)
        except (FileNotFoundError, ConnectionRefusedError):
            # No daemon (yet, or restarting): wait for it.
            if not said_waiting:
                _say(err, f"waiting for the materializer daemon at {socket_path}")
                said_waiting = True
        except OSError as exc:
            _say(err, f"cannot connect to {socket_path}: {exc.strerror or exc}")
            return exits.FAILED
        else:
            impostor = _foreign_peer(socket_path, writer)
            if impostor is not None:
                writer.transport.abort()
                _say(err, f"refusing the sidebar socket: {impostor.message}")
                return exits.USAGE
            if said_waiting:
                _say(err, "connected")
            busy: _Busy | None = None
            try:
                if await follower.follow(reader, writer):
                    delay = _FIRST_RETRY_DELAY
            except _GiveUp as exc:
                _say(err, str(exc))
                return exits.FAILED
            except _Busy as exc:
                busy = exc
            except ConnectionError:
                pass
            finally:
                writer.transport.abort()
            if busy is None:
                _say(err, "the connection to the daemon was lost; reconnecting")
                said_waiting = True
            elif not said_busy:
                _say(err, f"{busy}; trying again")
            said_busy = busy is not None
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_retry_delay)


def _untrusted(socket_path: Path, folders: Sequence[Path]) -> Finding | None:
    """Why the socket cannot be trusted as the daemon's, before connecting (None: missing or fine).

    A folder of ours that others may write to counts: the daemon tightens it at start, but until then
    anyone could have put their own socket there.
    """
    for folder in folders:
        finding = check_folder(folder)
        if finding is not None:
            return finding
    return check_file(socket_path, "socket")


#: ``struct ucred`` (pid, uid, gid), as ``SO_PEERCRED`` returns it (Linux).
_UCRED = struct.Struct("3i")


def _foreign_peer(socket_path: Path, writer: asyncio.StreamWriter) -> Finding | None:
    """A finding if the process serving the socket runs as someone else (neither us nor root)."""
    sock = writer.get_extra_info("socket")
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    euid = os.geteuid()
    if uid in (euid, 0):
        return None
    return Finding(socket_path, f"is served by uid {uid} (pid {pid}), not by us (uid {euid})",
                   "stop that process, remove the socket and restart the daemon")


class _Follower:
    """Reads one connection after another, printing each event once."""

    def __init__(self, since: int | None, as_json: bool, out: TextIO) -> None:
        self.resume_after = since
        """The last seq printed (or known to be covered): the next hello's ``since``."""
        self._as_json = as_json
        self._out = out

    async def follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Say hello and print events until the daemon closes the connection; True if it welcomed us."""
        hello: dict[str, Any] = {"type": HELLO}
        if self.resume_after is not None:
            hello["since"] = self.resume_after
        writer.write(json.dumps(hello).encode("ascii") + b"\n")
        await writer.drain()
        welcomed = False
        while (raw := await _read_line(reader)).endswith(b"\n"):  # not: the end, maybe mid-line
            try:
                message = json.loads(raw)
            except (ValueError, RecursionError):  # not UTF-8, not JSON, too deep, or a 5000-digit integer
                continue  # not for us to understand; the next line may be
            if isinstance(message, dict):
                welcomed |= self._handle(message, raw)
        return welcomed

    def _handle(self, message: dict[str, Any], raw: bytes) -> bool:
        """Print the message if it is a new event or a notice; True if it was the welcome."""
        kind = message.get("type")
        if kind == ERROR and message.get("code") == TOO_MANY_CLIENTS:
            raise _Busy(f"the daemon is busy: {_printable(str(message.get('error')))}")
        if kind == ERROR:
            raise _GiveUp(f"the daemon refused the request: {_printable(str(message.get('error')))}")
        if kind == WELCOME:
            since = message.get("since")
            if isinstance(since, int) and not isinstance(since, bool):
                self.resume_after = since  # the daemon's word: it may restart numbering (new ledger)
            return True
        seq = message.get("seq")
        if kind == SKIPPED and isinstance(message.get("payload"), dict):
            seq = message["payload"].get("seq")  # it stands in for that event: resume after it
        if isinstance(seq, int) and not isinstance(seq, bool):
            if self.resume_after is not None and seq <= self.resume_after:
                return False
            self.resume_after = seq
        elif kind not in (PRUNED, SKIPPED):
            return False
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace") if self._as_json else format_event(message)
        self._out.write(line + "\n")
        self._out.flush()
        return False


def format_event(message: Mapping[str, Any], received_at: datetime | None = None) -> str:
    """One readable line for an event (or a pruned or skipped-events notice), control characters escaped."""
    when = (received_at or datetime.now()).strftime("%H:%M:%S")
    seq = message.get("seq")
    kind = message.get("type")
    payload = message.get("payload")
    payload = dict(payload) if isinstance(payload, Mapping) else {}
    head = f"{when} #{seq}" if isinstance(seq, int) else f"{when} -"
    if kind == "media.materialized":
        asset = payload.get("asset")
        paths = asset.get("filePaths") if isinstance(asset, Mapping) else None
        files = " ".join(shlex.quote(str(path)) for path in paths) if isinstance(paths, list) else ""
        detail = f"{_job(payload)} {files}"
    elif kind == "media.failed":
        text = payload.pop("message", None) or payload.pop("error", None)
        detail = f"{_job(payload)}: {text}" if text else _job(payload)
    elif kind == "materializer.state":
        state = payload.pop("state", None)
        text = payload.pop("action", None) or payload.pop("message", None)
        detail = f"{state}: {text}" if text else str(state)
        if payload:
            detail += " " + json.dumps(payload, separators=(",", ":"), sort_keys=True)
    elif kind in (PRUNED, SKIPPED):
        detail = str(payload.get("message", ""))
    else:
        detail = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    return _printable(f"{head} {kind} {detail}".rstrip())


def _job(payload: dict[str, Any]) -> str:
    job_id = payload.get("jobId")
    capability = payload.get("capability")
    return f"{job_id} ({capability})" if capability else str(job_id)


def _printable(text: str) -> str:
    """``text`` with every non-printable character (escape sequences, newlines, ...) escaped."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """The next line, ``b""`` at the end of the connection."""
    try:
        return await reader.readline()
    except ValueError:  # over the reader's limit
        raise _GiveUp(f"the daemon sent a line longer than {_MAX_LINE} bytes") from None


def _say(err: TextIO, message: str) -> None:
    print(f"materializer watch: {message}", file=err, flush=True)
