"""The configuration as plain values: every key's default, which keys apply live, and the errors.

:mod:`materializer.config` validates with pydantic, whose import costs the daemon
about 10 MB of its idle memory (``bench/run.py --only memory``). So the daemon never
imports it: a short-lived helper process validates (:mod:`materializer.config_reload`)
and hands back the result as :data:`Values`, every key as ``"section.key"`` with
its JSON value, and what the daemon does with a configuration (diff, keep the restart
keys, build its options) works on those plain values, here.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from materializer.config_sources import DEFAULT_ROOT
from materializer.limits import MAX_DECODED_BYTES, MAX_DOWNLOAD_BYTES, MAX_EDGE, MAX_FRAMES, MAX_PIXELS

__all__ = ["DEFAULTS", "LIVE_KEYS", "RESTART_KEYS", "ConfigError", "ConfigProblem", "Values", "convex_url",
           "diff_values", "optional_path", "token_argv", "with_live_values"]

#: A whole configuration, every key as ``"section.key"``: its value as JSON has it (paths as strings).
Values = dict[str, Any]

#: Every key and its default (the fourth layer, :mod:`materializer.config`); documented key by key in
#: ``config.example.toml``.
DEFAULTS: Mapping[str, Any] = {
    "daemon.root": DEFAULT_ROOT,
    "daemon.state_dir": None,
    "daemon.convex_url": None,
    "daemon.lookback_hours": 24.0,
    "daemon.subscription_limit": 200,
    "daemon.cursor_overlap_ms": 2000,
    "daemon.max_attempts": 8,
    "daemon.retry_base_seconds": 2.0,
    "daemon.retry_max_seconds": 600.0,
    "daemon.download_concurrency": 4,
    "daemon.max_outputs_per_job": 64,
    "daemon.memory_budget_bytes": 256 * 1024 * 1024,
    "daemon.max_sidebar_clients": 32,
    "daemon.lease_seconds": 120.0,
    "daemon.gallery_size": 1000,
    "daemon.thumbnails": True,
    "daemon.inactivity_timeout_seconds": 60.0,
    "daemon.parent_pid": None,
    "auth.token_env": "STELLA_TOKEN",
    "auth.token_file": None,
    "auth.token_command": None,
    "auth.token_fd": None,
    "fetch.max_bytes": MAX_DOWNLOAD_BYTES,
    "fetch.connect_timeout": 10.0,
    "fetch.read_timeout": 30.0,
    "fetch.total_timeout": 300.0,
    "images.max_edge": MAX_EDGE,
    "images.max_pixels": MAX_PIXELS,
    "images.max_frames": MAX_FRAMES,
    "images.max_decoded_bytes": MAX_DECODED_BYTES,
    "log.level": "info",
    "log.format": "text",
}

#: Keys the daemon applies while running.
LIVE_KEYS: frozenset[str] = frozenset(
    {
        "daemon.cursor_overlap_ms",
        "daemon.max_attempts",
        "daemon.retry_base_seconds",
        "daemon.retry_max_seconds",
        "daemon.gallery_size",
        "daemon.max_outputs_per_job",
        *(key for key in DEFAULTS if key.split(".")[0] in ("fetch", "images", "log")),
    }
)
#: Keys that only take effect at the next start: where it writes, what it connects to and how
#: (the backend, the token source, the subscription), and the sizes of what it built at start.
RESTART_KEYS: frozenset[str] = frozenset(DEFAULTS) - LIVE_KEYS


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with the configuration: the key (empty for the file as a whole) and why."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}" if self.key else self.reason


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` says every problem, one per ``; ``."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(problem) for problem in self.problems))


def diff_values(old: Values, new: Values) -> tuple[list[str], list[str]]:
    """The keys that differ, split into (applied live, needing a restart), each sorted."""
    changed = sorted(key for key in new if old.get(key) != new[key])
    return [key for key in changed if key in LIVE_KEYS], [key for key in changed if key not in LIVE_KEYS]


def with_live_values(running: Values, new: Values) -> Values:
    """``running`` with the live keys taken from ``new`` (restart keys keep their running values)."""
    return {key: new[key] if key in LIVE_KEYS else value for key, value in running.items()}


def optional_path(value: str | Path | None) -> Path | None:
    """A path-valued key as a :class:`Path` (it is a string in :data:`Values`)."""
    return None if value is None else Path(value)


def token_argv(command: str | None) -> list[str] | None:
    """``auth.token_command`` split into words like a shell would (it is run without one)."""
    return None if command is None else shlex.split(command)


def convex_url(url: str | None) -> str:
    """``daemon.convex_url``, for the commands that talk to the backend: :class:`ConfigError` when it is unset."""
    if url is None:
        raise ConfigError(
            [ConfigProblem("daemon.convex_url", "not set: pass --convex-url, set "
                           "MATERIALIZER_DAEMON__CONVEX_URL or put convex_url under [daemon] in the config file")]
        )
    return url
