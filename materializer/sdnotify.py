"""systemd's notify protocol (``sd_notify(3)``), with the standard library only.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a datagram socket
(a path, or an abstract name written ``@name``), and waits for ``READY=1``
before it counts the service as started. ``STATUS=`` lines show in
``systemctl status``; with ``WatchdogSec=`` it also passes
``$WATCHDOG_USEC`` and restarts the service when ``WATCHDOG=1`` pings stop.

Without ``$NOTIFY_SOCKET`` (a terminal, the desktop app, tests) every call is
a no-op. Sending never raises and never blocks: a failure is logged once and
the daemon carries on, since systemd's bookkeeping must not take it down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "run_watchdog"]

log = logging.getLogger("materializer.sdnotify")


def _socket_address(value: str) -> str | bytes | None:
    """The address to send to: a path, or an abstract name (``@name`` becomes ``\\0name``)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


class Notifier:
    """Tells systemd how the service is doing, if systemd is listening.

    Reads ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from
    ``environ`` (the process environment by default) once, at creation.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw_address = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw_address)
        if raw_address and self._address is None:
            log.warning("ignoring NOTIFY_SOCKET %r: not a socket path or @abstract name", raw_address)
        self._watchdog_usec = self._read_watchdog_usec(env)
        self._socket: socket.socket | None = None
        self._failure_logged = False

    @staticmethod
    def _read_watchdog_usec(env: Mapping[str, str]) -> int | None:
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        pid = env.get("WATCHDOG_PID")
        # The variables may have been inherited from the service's main process: not ours to ping.
        if pid is not None and pid != str(os.getpid()):
            return None
        return usec if usec > 0 else None

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds within which systemd expects a ``WATCHDOG=1`` ping, or None when it does not watch."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; whether it went out (False when disabled)."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._failure_logged:
                self._failure_logged = True
                log.warning("cannot notify systemd (further failures are not logged): %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The service is up (``READY=1``), optionally with a status line."""
        return self.send("READY=1", *([] if status is None else [_status_line(status)]))

    def status(self, text: str) -> bool:
        """A one-line description of the current state, shown by ``systemctl status``."""
        return self.send(_status_line(text))

    def watchdog(self) -> bool:
        """A keep-alive ping (``WATCHDOG=1``)."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """The service is shutting down (``STOPPING=1``)."""
        return self.send("STOPPING=1", *([] if status is None else [_status_line(status)]))

    def close(self) -> None:
        """Release the socket (a later send opens a new one)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status_line(text: str) -> str:
    # A line break would end the assignment and start another one.
    return "STATUS=" + " ".join(text.splitlines())


async def run_watchdog(notifier: Notifier) -> None:
    """Ping systemd's watchdog at half its interval, until cancelled; returns at once if it is off.

    The pings come from the event loop itself, so a loop that is stuck stops
    them and systemd restarts the service.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval / 2)
