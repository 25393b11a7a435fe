"""The ``materializer`` command line.

Exit codes shared by the commands: 0 success, 1 failure (or, for ``run``,
another daemon holds the root), 2 usage or configuration error, 3 sign-in
needed, 4 the ledger is damaged (``materializer repair`` is the way out).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from materializer import __version__, exits

__all__ = ["main"]



def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration keys this command's flags set (None: the flag was not given)."""
    return {
        "daemon.root": getattr(args, "root", None),
        "daemon.state_dir": getattr(args, "state_dir", None),
        "daemon.convex_url": getattr(args, "convex_url", None),
        "auth.token_file": getattr(args, "token_file", None),
        "auth.token_fd": getattr(args, "token_fd", None),
        "daemon.parent_pid": getattr(args, "parent_pid", None),
        "log.level": getattr(args, "log_level", None),
        "log.format": getattr(args, "log_format", None),
    }


def _settings(args: argparse.Namespace) -> Any:
    """Load the configuration with this command's flags on top; print the error and return None if invalid."""
    from materializer.config import ConfigError, load_settings

    try:
        return load_settings(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"materializer {args.command}: {exc}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    from materializer.early_stop import EarlyStop

    early_stop = EarlyStop.install()  # before the heavy imports below
    from materializer.config_reload import config_file_state, resolve
    from materializer.config_values import ConfigError
    from materializer.service import run_service

    overrides = _overrides(args)
    loaded_state = config_file_state(args.config)  # before the helper reads it: see ConfigReloader.watch
    try:
        values = resolve(args.config, overrides)  # validated in a helper process: see config_reload
    except ConfigError as exc:
        if early_stop.requested:  # systemd stops the whole unit: the helper may have had the SIGTERM too
            print("materializer run: asked to stop while starting: stopping", file=sys.stderr)
            return exits.OK
        print(f"materializer run: {exc}", file=sys.stderr)
        return exits.USAGE
    return run_service(values, args.config, overrides, early_stop, loaded_state)


def _one_shot(args: argparse.Namespace) -> tuple[Any, Any, tuple[float, float | None]] | int:
    """What ``replay`` and ``repair`` start from: options, a token source and their ``--since``/``--until``.

    An exit code instead when the configuration, a token source or a ``WHEN`` is unusable (said on stderr).
    """
    from materializer.config import ConfigError, settings_values
    from materializer.logs import setup_logging
    from materializer.options import DaemonOptions
    from materializer.replay import parse_when
    from materializer.tokens import provider_from_values

    settings = _settings(args)
    if settings is None:
        return exits.USAGE
    values = settings_values(settings)
    setup_logging("warning" if args.log_level is None else values["log.level"], values["log.format"])
    try:
        options = DaemonOptions.from_values(values)
        since = parse_when(args.since)
        until = parse_when(args.until) if getattr(args, "until", None) else None
        provider = provider_from_values(values)
    except (ConfigError, ValueError) as exc:
        print(f"materializer {args.command}: {exc}", file=sys.stderr)
        return exits.USAGE
    return options, provider, (since, until)


def _replay(args: argparse.Namespace) -> int:
    import asyncio

    from materializer.layout import UntrustedPath
    from materializer.ledger import LedgerOpenError
    from materializer.replay import print_summary, replay
    from materializer.service import ledger_trouble

    setup = _one_shot(args)
    if isinstance(setup, int):
        return setup
    options, provider, (since, until) = setup

    async def run() -> int:
        try:
            code, summary = await replay(options, provider, since=since, until=until, job_ids=args.job,
                                         dry_run=args.dry_run)
        except UntrustedPath as exc:
            print(f"materializer replay: {exc}", file=sys.stderr)
            return exits.USAGE
        except LedgerOpenError as exc:
            print(f"materializer replay: {ledger_trouble(exc)}", file=sys.stderr)
            return exits.LEDGER_DAMAGED
        finally:
            await provider.aclose()
        if code != exits.SIGN_IN_NEEDED:
            print_summary(summary, args.dry_run, args.json, sys.stdout)
        return code

    return asyncio.run(run())


def _repair(args: argparse.Namespace) -> int:
    import asyncio

    from materializer.repair import print_summary, repair

    setup = _one_shot(args)
    if isinstance(setup, int):
        return setup
    options, provider, (since, _) = setup

    async def run() -> int:
        try:
            code, summary = await repair(options, provider, since=since)
        finally:
            await provider.aclose()
        print_summary(summary, args.json, sys.stdout)
        return code

    return asyncio.run(run())


def _status(args: argparse.Namespace) -> int:
    from materializer.config_sources import state_location
    from materializer.layout import Layout, resolve_state_dir
    from materializer.status import collect_status, print_status

    # Only where the state is matters here: read without pydantic when the layers are plain (a fast start),
    # through the full validation otherwise (which then names what is wrong).
    location = state_location(args.config, args.root, args.state_dir)
    if location is None:
        settings = _settings(args)
        if settings is None:
            return exits.USAGE
        location = settings.daemon.root, settings.daemon.state_dir
    root, state_dir = location
    print_status(collect_status(root, Layout(resolve_state_dir(root, state_dir))), args.json, sys.stdout)
    return exits.OK


def _watch(args: argparse.Namespace) -> int:
    import asyncio

    from materializer.layout import layout_folders
    from materializer.watch import run_watch

    settings = _settings(args)
    if settings is None:
        return exits.USAGE
    if args.since is not None and args.since < 0:
        print("materializer watch: --since must not be negative", file=sys.stderr)
        return exits.USAGE
    daemon = settings.daemon
    folders = layout_folders(daemon.layout, daemon.root)[:-1]  # down to the socket's folder (not outputs)
    try:
        return asyncio.run(run_watch(daemon.layout.display_socket, args.since, args.json, sys.stdout, folders=folders))
    except (KeyboardInterrupt, BrokenPipeError):
        return exits.OK


def _query(args: argparse.Namespace) -> int:
    import asyncio

    from materializer.convex.cli_query import run_query_command
    from materializer.tokens import EnvTokenProvider, FileTokenProvider, StaticTokenProvider, TokenProvider

    try:
        call_args = json.loads(args.args_json)
    except json.JSONDecodeError as exc:
        print(f"materializer query: ARGS_JSON is not JSON: {exc}", file=sys.stderr)
        return exits.USAGE
    provider: TokenProvider
    if args.token is not None:
        print("materializer query: warning: --token puts the token on the command line, where other users of "
              "this machine can read it (ps, /proc/<pid>/cmdline); use --token-file FILE or --token-stdin",
              file=sys.stderr)
        provider = StaticTokenProvider(args.token)
    elif args.token_stdin:
        provider = StaticTokenProvider(sys.stdin.readline())
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
        return exits.OK if args.watch else exits.INTERRUPTED


def _doctor(args: argparse.Namespace) -> int:
    from materializer.doctor import run_doctor
    from materializer.logs import setup_logging

    settings = _settings(args)
    if settings is None:
        return exits.USAGE
    # The checks report what goes wrong; the clients' own log lines would only repeat it.
    setup_logging("critical" if args.log_level is None else settings.log.level, settings.log.format)
    return run_doctor(settings, as_json=args.json)


def _dev_backend(args: argparse.Namespace) -> int:
    try:
        from stella_devbackend.app import run
    except ImportError as exc:  # aiohttp is an extra
        print(f"materializer dev-backend needs the backend extra: pip install 'stella-materializer[backend]' ({exc})",
              file=sys.stderr)
        return exits.USAGE
    return run(args)


def _gallery(args: argparse.Namespace) -> int:
    from materializer.gallery_server import run_gallery

    settings = _settings(args)
    if settings is None:
        return exits.USAGE
    daemon = settings.daemon
    return run_gallery(daemon.layout, host=args.host, port=args.port, open_browser=args.open,
                       gallery_size=daemon.gallery_size)


def _demo(args: argparse.Namespace) -> int:
    from materializer.demo import run_demo

    return run_demo(args.root, gallery=args.gallery)


def _common(parser: argparse.ArgumentParser, *, daemon: bool = True) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="configuration file (default $XDG_CONFIG_HOME/stella-materializer/config.toml)")
    parser.add_argument("--root", type=Path, metavar="DIR", help="Stella root (default ~/.stella)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="Stella state folder; outputs go to DIR/media/outputs (default $STELLA_DATA_DIR, "
                        "else ROOT/state)")
    if daemon:
        parser.add_argument("--convex-url", metavar="URL", help="the Stella backend's deployment URL")
        parser.add_argument("--token-file", type=Path, metavar="FILE", help="read the session token from FILE")
        parser.add_argument("--token-fd", type=int, metavar="N",
                            help="read session tokens, one per line (newest wins), from inherited file descriptor N")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log verbosity")
    parser.add_argument("--log-format", choices=["text", "json"], help="log line format (json for journald)")


def build_parser(wanted: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The command line, with the parsers of the ``wanted`` subcommands only (default: all of them).

    A subcommand's parser does not depend on the others, so its usage, help
    and errors are the same whichever others are built.
    """
    parser = argparse.ArgumentParser(
        prog="materializer",
        description="Materialize the signed-in user's Stella media jobs onto disk. Every setting can also come "
        "from MATERIALIZER_<SECTION>__<KEY> or the config file; see config.example.toml.",
    )
    parser.add_argument("--version", action="version", version=f"materializer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in COMMANDS.items():
        if wanted is None or name in wanted:
            add(commands)
    return parser


def _add_run(commands: Any) -> None:
    run = commands.add_parser("run", help="run the daemon in the foreground",
                              description="Follow the signed-in user's succeeded media jobs and materialize them. "
                              "SIGTERM/SIGINT stop it, SIGHUP reloads the configuration. Exit 1 when another "
                              "daemon holds the root, 2 on a configuration error or a state folder it cannot trust "
                              "(a symlink, another user's folder or file: the message names it and the fix), 4 when "
                              "the ledger is damaged (empty, truncated, garbled: it is left as it is; see "
                              "materializer repair).")
    _common(run)
    run.add_argument("--parent-pid", type=int, metavar="PID", help="exit cleanly when process PID exits")
    run.set_defaults(handler=_run)


def _add_replay(commands: Any) -> None:
    replay = commands.add_parser("replay", help="fetch missed jobs and materialize what is missing",
                                 description="One-shot: list jobs over HTTP and materialize whatever is missing. "
                                 "Safe while the daemon runs. Exit 0 all done, 1 some failed, 2 usage or "
                                 "configuration, 3 sign-in needed.")
    _common(replay)
    replay.add_argument("--since", default="24h", metavar="WHEN",
                        help="from this moment: an ISO date/time or a duration back from now (2h, 7d); default 24h")
    replay.add_argument("--until", metavar="WHEN", help="up to this moment (same forms)")
    replay.add_argument("--job", action="append", default=[], metavar="ID", help="only this job (repeatable)")
    replay.add_argument("--dry-run", action="store_true", help="list what would be materialized, change nothing")
    replay.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    replay.set_defaults(handler=_replay)


def _add_repair(commands: Any) -> None:
    repair = commands.add_parser(
        "repair", help="move a damaged ledger aside and rebuild it from the files on disk and the backend",
        description="With no daemon running: move a damaged ledger (and its -wal, -shm) aside to "
        "materializer.db.damaged-<UTC time>, then rebuild it from the outputs on disk (<jobId>_<index>.<ext>), "
        "gallery.json where usable, and the backend (the jobs since --since, and getByJobId for each job on "
        "disk). No file is removed. A healthy ledger is left alone. Exit 0 repaired (or nothing to repair), "
        "1 another daemon runs, the backend could not be asked (nothing changed), some jobs were not restored or "
        "a range is not covered, 2 usage or configuration, 3 sign-in needed, 4 a ledger repair must not touch "
        "(from a newer version).",
    )
    _common(repair)
    repair.add_argument("--since", default="24h", metavar="WHEN",
                        help="also list the jobs completed since then (ISO date/time or 2h, 7d); default 24h")
    repair.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    repair.set_defaults(handler=_repair)


def _add_status(commands: Any) -> None:
    status = commands.add_parser("status", help="show the daemon's state (works when it is stopped)")
    _common(status, daemon=False)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=_status)


def _add_watch(commands: Any) -> None:
    watch = commands.add_parser("watch", help="follow the sidebar socket and print its events",
                                description="Follow the daemon's sidebar socket and print its events until Ctrl-C "
                                "(exit 0). Exit 1 when the socket cannot be used or the daemon refuses the request, "
                                "2 when the socket cannot be trusted (a symlink, not a socket, another user's socket "
                                "or folder, a server run by another user).")
    _common(watch, daemon=False)
    watch.add_argument("--since", type=int, metavar="N", help="first replay every event after sequence number N")
    watch.add_argument("--json", action="store_true", help="print each event as one JSON line")
    watch.set_defaults(handler=_watch)


def _add_query(commands: Any) -> None:
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
    token.add_argument("--token", help="the user's token (warns: other users can read the command line; prefer "
                       "--token-file, --token-stdin or $STELLA_TOKEN)")
    token.add_argument("--token-file", type=Path, metavar="FILE", help="read the token from FILE")
    token.add_argument("--token-stdin", action="store_true", help="read the token from the first line of stdin")
    query.add_argument("--watch", action="store_true", help="subscribe and print every new result")
    query.set_defaults(handler=_query)


def _add_doctor(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor", help="check the deployment, the token and the outputs folder, one line per check",
        description="Check a setup the way a person debugging it would: the deployment answers, accepts this "
        "client, TLS, the token, the three media queries, the optional page query, the sync socket and the "
        "outputs folder. One line per check (ok, WARN, FAIL, skip), or one JSON object with --json. Exit 0 all "
        "good (warnings allowed), 1 a check failed, 2 usage or configuration, 3 sign-in needed.",
    )
    _common(doctor)
    doctor.add_argument("--json", action="store_true", help='print {"ok", "checks": [{"name", "status", "detail"}]}')
    doctor.set_defaults(handler=_doctor)


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser("demo", help="run the local backend and the materializer end to end",
                               description="Start the local backend and the materializer, submit jobs of every "
                               "capability, and show the files that land on disk.")
    demo.add_argument("--root", type=Path, help="materializer root (default: a new temporary folder, kept)")
    demo.add_argument("--gallery", action="store_true",
                      help="also serve the live gallery page (its URL is printed) and keep it up until Ctrl-C")
    demo.set_defaults(handler=_demo)


def _add_gallery(commands: Any) -> None:
    gallery = commands.add_parser(
        "gallery", help="serve a live web page of what was made (loopback only, behind a secret URL)",
        description="Serve the gallery of a root on a loopback address and print its URL once; the URL holds a "
        "random secret that every request needs (anything else gets 403). The page shows jobs newest first, "
        "updates live from the ledger, and works with the daemon stopped. Runs until Ctrl-C (exit 0); exit 1 "
        "when it cannot listen, 2 on a usage or configuration error.",
    )
    _common(gallery, daemon=False)
    gallery.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)")
    gallery.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    gallery.add_argument("--open", action="store_true", help="open the page in the default browser")
    gallery.set_defaults(handler=_gallery)


def _add_dev_backend(commands: Any) -> None:
    """``dev-backend``, described by the local backend's own flags module (standard library only).

    The backend is a package of its own (``stella_devbackend``); only its
    options are read here, when the parser is built, never at import.
    """
    try:
        from stella_devbackend import options
    except ImportError:  # installed without the backend package: the command says what is missing when run
        # No prefix character it could meet, so every flag is taken as one of the ignored arguments.
        backend = commands.add_parser("dev-backend", help="run the local Stella-compatible backend (backend extra)",
                                      prefix_chars="\0", add_help=False)
        backend.add_argument("arguments", nargs="*", help=argparse.SUPPRESS)
    else:
        backend = commands.add_parser("dev-backend", help=options.HELP, description=options.DESCRIPTION)
        options.add_arguments(backend)
    backend.set_defaults(handler=_dev_backend)


COMMANDS: dict[str, Callable[[Any], None]] = {
    "run": _add_run,
    "replay": _add_replay,
    "repair": _add_repair,
    "status": _add_status,
    "watch": _add_watch,
    "query": _add_query,
    "doctor": _add_doctor,
    "demo": _add_demo,
    "gallery": _add_gallery,
    "dev-backend": _add_dev_backend,
}
"""Each subcommand and what adds its parser, in the order ``--help`` lists them."""


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    # Build only the parser the first word names (a faster start: the dev backend's flags alone take
    # 20 ms); anything else (help, a mistake) gets them all, so that the choices listed are complete.
    first = arguments[0] if arguments else ""
    wanted = [first] if first in COMMANDS else [] if first == "--version" else None
    args = build_parser(wanted).parse_args(arguments)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return exits.INTERRUPTED
