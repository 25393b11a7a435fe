"""The materializer's configuration: four layers, validated once, reloadable live.

Each key is looked up, highest first, in

1. command-line flags (``overrides``: dotted keys such as ``"daemon.root"``,
   ``None`` meaning "flag not given");
2. the environment, ``MATERIALIZER_<SECTION>__<KEY>`` (e.g.
   ``MATERIALIZER_DAEMON__ROOT``), read by pydantic-settings; an empty value
   unsets an optional key;
3. the TOML file: ``--config FILE``, else
   ``$XDG_CONFIG_HOME/stella-materializer/config.toml`` (``~/.config`` when
   ``XDG_CONFIG_HOME`` is unset); the default file may be missing, an explicit
   one may not;
4. the defaults below, documented key by key in ``config.example.toml``.

The layers are merged, then validated in one go, so every mistake comes back
as a :class:`ConfigError` that names the key (``daemon.download_concurrency``),
the reason, and the layer the bad value came from. Unknown keys and sections
are mistakes too: a typo never silently falls back to a default. Relative
paths are taken from the working directory; ``~`` is expanded.

Live reload (file change or SIGHUP) goes through :class:`ConfigReloader`:
keys in :data:`LIVE_KEYS` take effect at once, every other key
(:data:`RESTART_KEYS`) keeps its running value and is logged as needing a
restart. A bad edit is logged and the running settings stay.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from materializer.config_sources import (
    DEFAULT_ROOT,
    ENV_DELIMITER,
    ENV_PREFIX,
    ConfigFileError,
    default_config_path,
    env_name,
    expand_path,
    read_toml,
)
from materializer.folder_watch import watch_folder
from materializer.layout import Layout, resolve_state_dir
from materializer.limits import MAX_DECODED_BYTES, MAX_DOWNLOAD_BYTES, MAX_EDGE, MAX_FRAMES, MAX_PIXELS

__all__ = [
    "ENV_PREFIX",
    "LIVE_KEYS",
    "RESTART_KEYS",
    "AuthSettings",
    "ConfigError",
    "ConfigProblem",
    "ConfigReloader",
    "DaemonSettings",
    "FetchSettings",
    "ImagesSettings",
    "LogSettings",
    "Settings",
    "default_config_path",
    "diff_settings",
    "flatten_settings",
    "load_settings",
]

log = logging.getLogger("materializer.config")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Keys whose values never appear in error messages (a command line may hold a password).
_UNECHOED_KEYS = frozenset({"auth.token_command"})


class _Section(BaseModel):
    """A ``[section]`` of the file: immutable, and strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty string unsets an optional key (the environment has no other way to say None).

        A key that cannot be unset refuses it, rather than reading ``""`` as a
        path (the working directory) or a name.
        """
        if not isinstance(value, str) or value.strip() or info.field_name is None:
            return value
        if cls.model_fields[info.field_name].default is None:
            return None if value == "" else value
        raise ValueError("is empty")


def _expand(path: Path | None) -> Path | None:
    return None if path is None else expand_path(path)


class DaemonSettings(_Section):
    """What the daemon follows, where it writes, and how hard it tries."""

    root: Path = Field(default=DEFAULT_ROOT, validate_default=True)
    state_dir: Path | None = None
    convex_url: str | None = None
    lookback_hours: float = Field(default=24.0, ge=0)
    subscription_limit: int = Field(default=200, ge=1, le=200)
    cursor_overlap_ms: int = Field(default=2000, ge=0)
    max_attempts: int = Field(default=8, ge=1)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    download_concurrency: int = Field(default=4, ge=1, le=64)
    max_outputs_per_job: int = Field(default=64, ge=1)
    memory_budget_bytes: int = Field(default=256 * 1024 * 1024, ge=16 * 1024 * 1024)
    max_sidebar_clients: int = Field(default=32, ge=1)
    lease_seconds: float = Field(default=120.0, gt=0)
    gallery_size: int = Field(default=1000, ge=1)
    thumbnails: bool = True
    inactivity_timeout_seconds: float = Field(default=60.0, gt=0)
    parent_pid: int | None = Field(default=None, ge=1)

    _expand_root = field_validator("root", "state_dir")(_expand)

    @field_validator("convex_url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        try:
            _ = parts.port  # raises on a port that is not a number or out of range
        except ValueError as exc:
            raise ValueError(f"has a bad port ({exc})") from None
        if not parts.hostname:
            raise ValueError("has no host name")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must be a bare deployment URL (no credentials, query or fragment)")
        return parts.geturl().rstrip("/")

    @field_validator("retry_max_seconds")
    @classmethod
    def _at_least_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("retry_base_seconds")
        if base is not None and value < base:
            raise ValueError(f"must be at least daemon.retry_base_seconds ({base:g})")
        return value

    @property
    def layout(self) -> Layout:
        """Where the daemon keeps its files (``state_dir``, else ``STELLA_DATA_DIR``, else ``<root>/state``)."""
        return Layout(resolve_state_dir(self.root, self.state_dir))

    def require_convex_url(self) -> str:
        """The deployment URL, for the commands that talk to the backend."""
        if self.convex_url is None:
            raise ConfigError(
                [ConfigProblem("daemon.convex_url", "not set: pass --convex-url, set "
                               "MATERIALIZER_DAEMON__CONVEX_URL or put convex_url under [daemon] in the config file")]
            )
        return self.convex_url


#: The keys that choose a token source; at most one may be set (the environment variable is the fallback).
TOKEN_SOURCE_KEYS = ("token_fd", "token_command", "token_file")


class AuthSettings(_Section):
    """Where the session token comes from: a file descriptor, a command, a file, else an environment variable."""

    token_env: str = "STELLA_TOKEN"
    token_file: Path | None = None
    token_command: str | None = None
    token_fd: int | None = Field(default=None, ge=0)

    _expand_token_file = field_validator("token_file")(_expand)

    @field_validator("token_env")
    @classmethod
    def _check_env_name(cls, name: str) -> str:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError("must be an environment variable name (letters, digits, _)")
        return name

    @field_validator("token_command")
    @classmethod
    def _check_command(cls, command: str | None, info: ValidationInfo) -> str | None:
        if command is None:
            return None
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ValueError(f"cannot be split into words ({exc})") from None
        if not argv:
            raise ValueError("is blank")
        return command

    @model_validator(mode="after")
    def _one_source(self) -> AuthSettings:
        chosen = [f"auth.{key}" for key in TOKEN_SOURCE_KEYS if getattr(self, key) is not None]
        if len(chosen) > 1:
            raise ValueError(f"{', '.join(chosen[:-1])} and {chosen[-1]} are all set; choose one" if len(chosen) > 2
                             else f"{chosen[0]} and {chosen[1]} are both set; choose one")
        return self

    @property
    def token_argv(self) -> list[str] | None:
        """``token_command`` split into words like a shell would (it is run without one)."""
        return None if self.token_command is None else shlex.split(self.token_command)


class FetchSettings(_Section):
    """Limits on each download."""

    max_bytes: int = Field(default=MAX_DOWNLOAD_BYTES, ge=1)
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=30.0, gt=0)
    total_timeout: float = Field(default=300.0, gt=0)


class ImagesSettings(_Section):
    """Limits on each image (the desktop app's)."""

    max_edge: int = Field(default=MAX_EDGE, ge=1)
    max_pixels: int = Field(default=MAX_PIXELS, ge=1)
    max_frames: int = Field(default=MAX_FRAMES, ge=1)
    max_decoded_bytes: int = Field(default=MAX_DECODED_BYTES, ge=1)


class LogSettings(_Section):
    """How much is logged, and in which shape."""

    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["text", "json"] = "text"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class Settings(BaseModel):
    """The whole validated configuration; immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Factories, not instances: the defaults (``~`` in daemon.root) are resolved at each load.
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    images: ImagesSettings = Field(default_factory=ImagesSettings)
    log: LogSettings = Field(default_factory=LogSettings)


def _all_keys() -> frozenset[str]:
    return frozenset(
        f"{section}.{key}"
        for section, field in Settings.model_fields.items()
        for key in field.annotation.model_fields  # type: ignore[union-attr]
    )


#: Keys the daemon applies while running.
LIVE_KEYS: frozenset[str] = frozenset(
    {
        "daemon.cursor_overlap_ms",
        "daemon.max_attempts",
        "daemon.retry_base_seconds",
        "daemon.retry_max_seconds",
        "daemon.gallery_size",
        "daemon.max_outputs_per_job",
        *(f"fetch.{key}" for key in FetchSettings.model_fields),
        *(f"images.{key}" for key in ImagesSettings.model_fields),
        *(f"log.{key}" for key in LogSettings.model_fields),
    }
)
#: Keys that only take effect at the next start: where it writes, what it connects to and how
#: (the backend, the token source, the subscription), and the sizes of what it built at start.
RESTART_KEYS: frozenset[str] = _all_keys() - LIVE_KEYS


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


class _Environment(BaseSettings):
    """The environment layer, read by pydantic-settings.

    One free-form table per section of :class:`Settings`: the values are
    validated (and their errors reported) together with the other layers.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, case_sensitive=False, extra="ignore"
    )

    daemon: dict[str, Any] = {}
    auth: dict[str, Any] = {}
    fetch: dict[str, Any] = {}
    images: dict[str, Any] = {}
    log: dict[str, Any] = {}


def _read_environment() -> dict[str, Any]:
    try:
        return _Environment().model_dump(exclude_unset=True)
    except SettingsError as exc:
        # A whole section given as one variable (MATERIALIZER_DAEMON) that is not a JSON object.
        raise ConfigError([ConfigProblem("", f"environment: {exc}")]) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return read_toml(path)
    except ConfigFileError as exc:
        raise ConfigError([ConfigProblem("", str(exc))]) from None


def _nest(overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Dotted flag keys as sections; a flag choosing the token file or command unsets the other."""
    known = _all_keys()
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError([ConfigProblem(key, "unknown key")])
        if value is None:
            continue
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    auth = nested.get("auth", {})
    flagged = [key for key in TOKEN_SOURCE_KEYS if key in auth]
    if len(flagged) == 1:
        for other in TOKEN_SOURCE_KEYS:
            auth.setdefault(other, None)
    return nested


def _merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win, key by key inside each section."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for section, table in layer.items():
            if isinstance(table, Mapping) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **table}
            else:
                merged[section] = dict(table) if isinstance(table, Mapping) else table
    return merged


def _has(layer: Mapping[str, Any], loc: tuple[str, ...]) -> bool:
    node: Any = layer
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _problem(error: Any, layers: list[tuple[str, Mapping[str, Any]]]) -> ConfigProblem:
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        known = sorted(Settings.model_fields) if len(loc) == 1 else sorted(
            Settings.model_fields[loc[0]].annotation.model_fields  # type: ignore[union-attr]
        )
        what = "section" if len(loc) == 1 else "key"
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {close[0]}?" if close else "known: " + ", ".join(known)
        reason = f"unknown {what} ({hint})"
    elif kind == "value_error":
        reason = str(error["ctx"]["error"])
    else:
        message: str = error["msg"]
        reason = message[:1].lower() + message[1:] if message[1:2].islower() else message
        if key not in _UNECHOED_KEYS:
            shown = repr(error["input"])
            reason += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    origin = next((name for name, layer in layers if _has(layer, loc)), None)
    if origin == "environment":
        origin = f"environment variable {env_name(key)}"
    return ConfigProblem(key, f"{reason}, from {origin}" if origin else reason)


def load_settings(config_file: Path | None, overrides: Mapping[str, Any]) -> Settings:
    """Merge flags, environment, TOML file and defaults (in that order) into validated settings.

    ``config_file`` None means the default file, which may be missing.
    Raises :class:`ConfigError` for anything invalid.
    """
    path = config_file if config_file is not None else default_config_path()
    toml = _read_toml(path) if config_file is not None or path.exists() else {}
    env = _read_environment()
    flags = _nest(overrides)
    layers: list[tuple[str, Mapping[str, Any]]] = [("the command line", flags), ("environment", env), (str(path), toml)]
    try:
        return Settings.model_validate(_merge(toml, env, flags))
    except ValidationError as exc:
        raise ConfigError([_problem(error, layers) for error in exc.errors()]) from None


def flatten_settings(settings: Settings) -> dict[str, Any]:
    """Every key as ``"section.key": value``."""
    return {
        f"{section}.{key}": value
        for section, table in settings.model_dump().items()
        for key, value in table.items()
    }


def diff_settings(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """The keys that differ, split into (applied live, needing a restart), each sorted."""
    before, after = flatten_settings(old), flatten_settings(new)
    changed = sorted(key for key in after if before[key] != after[key])
    return [key for key in changed if key in LIVE_KEYS], [key for key in changed if key not in LIVE_KEYS]


def _with_live_values(running: Settings, new: Settings) -> Settings:
    """``running`` with the live keys taken from ``new`` (restart keys keep their running values)."""
    sections: dict[str, Any] = {}
    for section in Settings.model_fields:
        live = {key: getattr(getattr(new, section), key)
                for key in type(getattr(running, section)).model_fields if f"{section}.{key}" in LIVE_KEYS}
        sections[section] = getattr(running, section).model_copy(update=live)
    return running.model_copy(update=sections)


class ConfigReloader:
    """Reloads the configuration on SIGHUP (:meth:`reload`) and on file changes (:meth:`watch`).

    ``settings`` is what the daemon runs with: live keys follow the file,
    restart keys keep the values it started with (``restart_needed`` lists
    those that now differ). ``on_change`` is called with the new settings
    when a reload changes anything (or recovers from an error), and with the
    :class:`ConfigError` when a reload fails (once per distinct error); a
    failed reload changes nothing.
    """

    def __init__(
        self,
        settings: Settings,
        config_file: Path | None,
        overrides: Mapping[str, Any],
        on_change: Callable[[Settings | ConfigError], None],
    ) -> None:
        self.settings = settings
        self.config_file = config_file
        self.path = config_file if config_file is not None else default_config_path()
        self.overrides = dict(overrides)
        self.restart_needed: list[str] = []
        self.error: ConfigError | None = None
        self._on_change = on_change

    def reload(self) -> None:
        """Load the configuration again and apply what can change live."""
        try:
            loaded = load_settings(self.config_file, self.overrides)
        except ConfigError as exc:
            if self.error is None or str(exc) != str(self.error):
                self.error = exc
                log.error("configuration not reloaded, keeping the running settings: %s", exc)
                self._on_change(exc)
            return
        recovered, self.error = self.error is not None, None
        live, restart = diff_settings(self.settings, loaded)
        if not (live or restart != self.restart_needed or recovered):
            log.debug("configuration reloaded; nothing changed")
            return
        if live:
            log.info("configuration reloaded; applied: %s", ", ".join(live))
        if restart and restart != self.restart_needed:
            log.warning("configuration changed; needs a restart to apply: %s", ", ".join(restart))
        self.restart_needed = restart
        self.settings = _with_live_values(self.settings, loaded)
        self._on_change(self.settings)

    async def watch(self) -> None:
        """Reload whenever the config file changes, until cancelled.

        The folder is watched, so a file replaced by rename (as editors save)
        is seen. One reload right after the watch is in place catches an edit
        made between start-up and then. Without the folder there is nothing
        to watch (SIGHUP still reloads).
        """
        folder = self.path.parent
        if not folder.is_dir():
            log.info("not watching %s: folder %s does not exist (SIGHUP reloads)", self.path.name, folder)
            return
        name = self.path.name
        # awatch sets up its inotify watch in its first step, before it first waits: a
        # callback queued now runs after that, so no change can fall in between.
        catch_up = asyncio.get_running_loop().call_soon(self.reload)
        try:
            async for _changes in watch_folder(folder, watch_filter=lambda _, path: os.path.basename(path) == name):
                self.reload()
        finally:
            catch_up.cancel()
