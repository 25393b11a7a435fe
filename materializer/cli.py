"""The ``materializer`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from materializer import __version__

__all__ = ["main"]


def _dev_backend(args: argparse.Namespace) -> int:
    try:
        from materializer.devbackend.app import run
    except ImportError as exc:  # aiohttp is an extra
        print(f"materializer dev-backend needs the backend extra: pip install 'stella-materializer[backend]' ({exc})",
              file=sys.stderr)
        return 2
    return run(
        args.host,
        args.port,
        args.data,
        user=args.user,
        token_ttl=args.token_ttl,
        job_delay=args.job_delay,
        ping_interval=args.ping_interval,
        chunk_size=args.chunk_size,
        data_uri_outputs=args.data_uri_outputs,
        log_level=args.log_level,
    )


def _query(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from materializer.convex.cli_query import run_query_command
    from materializer.tokens import EnvTokenProvider, FileTokenProvider, StaticTokenProvider, TokenProvider

    try:
        call_args = json.loads(args.args_json)
    except json.JSONDecodeError as exc:
        print(f"materializer query: ARGS_JSON is not JSON: {exc}", file=sys.stderr)
        return 2
    provider: TokenProvider
    if args.token is not None:
        provider = StaticTokenProvider(args.token)
    elif args.token_file is not None:
        provider = FileTokenProvider(args.token_file)
    else:
        provider = EnvTokenProvider()

    async def run() -> int:
        try:
            return await run_query_command(args.path, call_args, args.url, provider, args.watch, sys.stdout)
        finally:
            await provider.aclose()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0 if args.watch else 130


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from materializer.daemon import AlreadyRunning, DaemonOptions, Materializer
    from materializer.tokens import EnvTokenProvider, FileTokenProvider, TokenProvider

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.convex_url:
        print("materializer run: --convex-url is required", file=sys.stderr)
        return 2
    options = DaemonOptions(root=args.root.expanduser(), convex_url=args.convex_url)
    provider: TokenProvider = FileTokenProvider(args.token_file) if args.token_file else EnvTokenProvider()

    async def main() -> int:
        daemon = Materializer(options, provider, display_factory=_display_factory())
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, daemon.stop)
        try:
            await daemon.run()
        except AlreadyRunning as exc:
            print(f"materializer run: {exc}", file=sys.stderr)
            return 1
        finally:
            await daemon.aclose()
            await provider.aclose()
        return 0

    return asyncio.run(main())


def _display_factory():  # type: ignore[no-untyped-def]
    try:
        from materializer.display import DisplayServer
    except ImportError:
        return None
    return DisplayServer


def _demo(args: argparse.Namespace) -> int:
    from materializer.demo import run_demo

    return run_demo(args.root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="materializer",
        description="Materialize the signed-in user's Stella media jobs onto disk.",
    )
    parser.add_argument("--version", action="version", version=f"materializer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backend = commands.add_parser(
        "dev-backend",
        help="run the local Stella-compatible backend (media API, Convex sync, files)",
        description="Run the local Stella-compatible backend. Prints one JSON ready line, "
        "then serves until SIGINT/SIGTERM.",
    )
    backend.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    backend.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default 0)")
    backend.add_argument("--data", metavar="DIR", help="keep jobs, files and keys here (default: a temporary folder)")
    backend.add_argument("--token-ttl", type=float, default=86400.0, metavar="SECONDS",
                         help="lifetime of the printed demo token (default 86400)")
    backend.add_argument("--user", default="demo-user", help="subject of the printed demo token (default demo-user)")
    backend.add_argument("--job-delay", type=float, default=0.05, metavar="SECONDS",
                         help="time a job spends queued and then running (default 0.05)")
    backend.add_argument("--ping-interval", type=float, default=15.0, metavar="SECONDS",
                         help="how often sync sockets get a Ping (default 15)")
    backend.add_argument("--chunk-size", type=int, default=256 * 1024, metavar="CHARS",
                         help="transitions longer than this go out as TransitionChunks to versioned clients")
    backend.add_argument("--data-uri-outputs", action="store_true",
                         help="deliver image outputs as data: URIs instead of URLs")
    backend.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                         help="how much the backend logs to stderr (default warning)")
    backend.set_defaults(handler=_dev_backend)

    query = commands.add_parser(
        "query", help="run a Convex query once, or watch it (debugging)",
        description="Run a Convex query once over HTTP and print its value as one JSON line, or with --watch "
        "subscribe over the sync protocol and print one line per new value until interrupted. "
        "Exit codes: 0 ok, 1 the function threw, 2 usage, 3 sign-in needed.",
    )
    query.add_argument("path", metavar="PATH", help="function path, e.g. media_jobs:listSucceededSince")
    query.add_argument("args_json", metavar="ARGS_JSON", nargs="?", default="{}", help="arguments as a JSON object")
    query.add_argument("--url", required=True, help="deployment URL, e.g. http://127.0.0.1:8000")
    token = query.add_mutually_exclusive_group()
    token.add_argument("--token", help="the user's token (prefer --token-file or $STELLA_TOKEN: argv is visible)")
    token.add_argument("--token-file", type=Path, metavar="FILE", help="read the token from FILE")
    query.add_argument("--watch", action="store_true", help="subscribe and print every new result")
    query.set_defaults(handler=_query)

    run = commands.add_parser("run", help="run the materializer daemon in the foreground",
                              description="Follow the signed-in user's succeeded media jobs and materialize them.")
    run.add_argument("--config", type=Path, metavar="FILE", help="configuration file (TOML)")
    run.add_argument("--root", type=Path, default=Path("~/.stella"), help="Stella root (default ~/.stella)")
    run.add_argument("--convex-url", help="the backend's deployment URL")
    run.add_argument("--token-file", type=Path, metavar="FILE", help="read the token from FILE (watched)")
    run.set_defaults(handler=_run)

    demo = commands.add_parser("demo", help="run the local backend and the materializer end to end",
                               description="Start the local backend and the materializer, submit jobs of every "
                               "capability, and show the files that land on disk.")
    demo.add_argument("--root", type=Path, help="materializer root (default: a temporary folder)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
