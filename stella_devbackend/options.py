"""The local backend's settings and command line (``materializer dev-backend``, ``python -m stella_devbackend``).

The defaults are the real systems' (each cited); flags that change them
exist for tests, which cannot wait 15 s for a heartbeat or send 5 MB
transitions. This module imports nothing beyond the standard library, so
the main command line can describe the command without the backend extra.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BackendOptions", "DESCRIPTION", "EXTENSIONS", "HELP", "add_arguments", "options_from_args"]

HELP = "run the local Stella-compatible backend (media API, Convex sync, files)"
DESCRIPTION = (
    "Run the local Stella-compatible backend. By default it behaves like the real Convex deployment and Stella "
    "backend: the client-version rule, the three public media queries, five-minute tokens, 15 s sync "
    "heartbeats, transition chunks only for npm clients over 5,000,000 bytes, 16 MiB read per query. Prints one "
    "JSON ready line (url, token, token_url, session_secret_file), then serves until SIGINT/SIGTERM."
)

#: Token lifetime: ``DEFAULT_JWT_EXPIRATION_SECONDS = 5 * 60`` (ruuxi/stella-v2 ``backend/convex/auth.ts``).
TOKEN_TTL = 300.0
#: Sync ``Ping`` after this long without another message: ``HEARTBEAT_INTERVAL`` (``crates/sync/src/worker.rs``).
SYNC_HEARTBEAT = 15.0
#: WebSocket ping frames: ``HEARTBEAT_INTERVAL``; a client not heard from is dropped after ``CLIENT_TIMEOUT``
#: (both ``crates/local_backend/src/subs/mod.rs``).
WS_HEARTBEAT = 5.0
CLIENT_TIMEOUT = 120.0
#: Transitions over this many bytes are split, into parts of at most as many: ``MAX_MESSAGE_SIZE``
#: (``crates/local_backend/src/subs/mod.rs`` ``maybe_split_transition``).
MAX_MESSAGE_SIZE = 5_000_000
#: The most bytes of documents one query may read: ``TRANSACTION_MAX_READ_SIZE_BYTES``, 16 MiB
#: (``crates/common/src/knobs.rs``; enforced per document read in ``crates/database/src/reads.rs``).
MAX_READ_BYTES = 1 << 24

#: Switchable additions the real systems do not have, by name.
EXTENSIONS: dict[str, str] = {
    "page-query": "adds media_jobs:listSucceededPage, a gap-free page query over completedAt",
    "bearer-session": "also accepts the dev session secret as 'Authorization: Bearer' at /api/auth/convex/token "
                      "(Better Auth's bearer plugin, which the Stella backend does not enable)",
    "signed-urls": "output file URLs carry a signature in their query (as a CDN's presigned URLs do) and /files/ "
                   "refuses a request without it (403)",
}


@dataclass(frozen=True)
class BackendOptions:
    data_dir: Path
    user: str = "demo-user"
    token_ttl: float = TOKEN_TTL
    job_delay: float = 0.05
    ping_interval: float = SYNC_HEARTBEAT
    ws_ping_interval: float = WS_HEARTBEAT
    client_timeout: float = CLIENT_TIMEOUT
    chunk_threshold: int = MAX_MESSAGE_SIZE
    chunk_size: int = MAX_MESSAGE_SIZE
    data_uri_outputs: bool = False
    extensions: tuple[str, ...] = ()
    clock_offset: float = 0.0
    max_read_bytes: int = MAX_READ_BYTES


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dev-backend`` flags, with the real systems' defaults."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default 0)")
    parser.add_argument("--data", metavar="DIR",
                        help="keep jobs, files, keys and the session secret here (default: a temporary folder)")
    parser.add_argument("--token-ttl", type=float, default=TOKEN_TTL, metavar="SECONDS",
                        help="lifetime of every user token, as the real backend's five minutes (default 300)")
    parser.add_argument("--user", default="demo-user", help="the signed-in user (default demo-user)")
    parser.add_argument("--job-delay", type=float, default=0.05, metavar="SECONDS",
                        help="time a job spends queued and then running (default 0.05)")
    parser.add_argument("--ping-interval", type=float, default=SYNC_HEARTBEAT, metavar="SECONDS",
                        help="send a sync Ping after this long without another message (default 15)")
    parser.add_argument("--ws-ping-interval", type=float, default=WS_HEARTBEAT, metavar="SECONDS",
                        help="send a WebSocket ping frame this often (default 5)")
    parser.add_argument("--client-timeout", type=float, default=CLIENT_TIMEOUT, metavar="SECONDS",
                        help="drop a sync client not heard from for this long (default 120)")
    parser.add_argument("--chunk-threshold", type=_at_least(1), default=MAX_MESSAGE_SIZE, metavar="BYTES",
                        help="split transitions larger than this into TransitionChunks, for npm clients at "
                             "1.28.0 or later only (default 5000000)")
    parser.add_argument("--chunk-size", type=_at_least(4), default=MAX_MESSAGE_SIZE, metavar="BYTES",
                        help="largest TransitionChunk part, at least one UTF-8 character (default 5000000)")
    parser.add_argument("--clock-offset", type=float, default=0.0, metavar="SECONDS",
                        help="run the backend's clock this far from the machine's (negative: behind), so that a "
                             "client's clock is wrong relative to the server's (default 0)")
    parser.add_argument("--max-read-bytes", type=_at_least(1), default=MAX_READ_BYTES, metavar="BYTES",
                        help="fail a query that reads more document bytes than this, as Convex's "
                             "TRANSACTION_MAX_READ_SIZE_BYTES (default 16777216)")
    parser.add_argument("--data-uri-outputs", action="store_true",
                        help="fault: deliver image outputs as data: URIs, bypassing the backend's sanitizer")
    parser.add_argument("--extension", action="append", default=[], choices=sorted(EXTENSIONS), metavar="NAME",
                        help="switch on an addition the real systems lack (repeatable): "
                             + "; ".join(f"{name}: {what}" for name, what in EXTENSIONS.items()))
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="how much the backend logs to stderr (default warning)")


def options_from_args(args: argparse.Namespace, data_dir: Path) -> BackendOptions:
    return BackendOptions(
        data_dir=data_dir, user=args.user, token_ttl=args.token_ttl, job_delay=args.job_delay,
        ping_interval=args.ping_interval, ws_ping_interval=args.ws_ping_interval,
        client_timeout=args.client_timeout, chunk_threshold=args.chunk_threshold, chunk_size=args.chunk_size,
        data_uri_outputs=args.data_uri_outputs, extensions=tuple(dict.fromkeys(args.extension)),
        clock_offset=args.clock_offset, max_read_bytes=args.max_read_bytes,
    )
