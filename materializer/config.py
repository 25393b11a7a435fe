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

The daemon does not import this module (pydantic costs it about 10 MB of
memory): :func:`answer_request` validates for it in a short-lived process and
answers with the plain values of :mod:`materializer.config_values`, at start
and at each live reload (:mod:`materializer.config_reload`).
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from materializer.config_sources import (
    ENV_DELIMITER,
    ENV_PREFIX,
    ConfigFileError,
    config_path,
    default_config_path,
    env_name,
    expand_path,
    read_toml,
)
from materializer.config_values import DEFAULTS, ConfigError, ConfigProblem, Values
from materializer.layout import Layout, resolve_state_dir

__all__ = [
    "ENV_PREFIX",
    "AuthSettings",
    "ConfigError",
    "ConfigProblem",
    "DaemonSettings",
    "FetchSettings",
    "ImagesSettings",
    "LogSettings",
    "Settings",
    "default_config_path",
    "load_settings",
    "settings_values",
]

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

    root: Path = Field(default=DEFAULTS["daemon.root"], validate_default=True)
    state_dir: Path | None = DEFAULTS["daemon.state_dir"]
    convex_url: str | None = DEFAULTS["daemon.convex_url"]
    lookback_hours: float = Field(default=DEFAULTS["daemon.lookback_hours"], ge=0)
    subscription_limit: int = Field(default=DEFAULTS["daemon.subscription_limit"], ge=1, le=200)
    cursor_overlap_ms: int = Field(default=DEFAULTS["daemon.cursor_overlap_ms"], ge=0)
    max_attempts: int = Field(default=DEFAULTS["daemon.max_attempts"], ge=1)
    retry_base_seconds: float = Field(default=DEFAULTS["daemon.retry_base_seconds"], gt=0)
    retry_max_seconds: float = Field(default=DEFAULTS["daemon.retry_max_seconds"], gt=0)
    download_concurrency: int = Field(default=DEFAULTS["daemon.download_concurrency"], ge=1, le=64)
    max_outputs_per_job: int = Field(default=DEFAULTS["daemon.max_outputs_per_job"], ge=1)
    memory_budget_bytes: int = Field(default=DEFAULTS["daemon.memory_budget_bytes"], ge=16 * 1024 * 1024)
    max_sidebar_clients: int = Field(default=DEFAULTS["daemon.max_sidebar_clients"], ge=1)
    lease_seconds: float = Field(default=DEFAULTS["daemon.lease_seconds"], gt=0)
    gallery_size: int = Field(default=DEFAULTS["daemon.gallery_size"], ge=1)
    thumbnails: bool = DEFAULTS["daemon.thumbnails"]
    inactivity_timeout_seconds: float = Field(default=DEFAULTS["daemon.inactivity_timeout_seconds"], gt=0)
    parent_pid: int | None = Field(default=DEFAULTS["daemon.parent_pid"], ge=1)

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


#: The keys that choose a token source; at most one may be set (the environment variable is the fallback).
TOKEN_SOURCE_KEYS = ("token_fd", "token_command", "token_file")


class AuthSettings(_Section):
    """Where the session token comes from: a file descriptor, a command, a file, else an environment variable."""

    token_env: str = DEFAULTS["auth.token_env"]
    token_file: Path | None = DEFAULTS["auth.token_file"]
    token_command: str | None = DEFAULTS["auth.token_command"]
    token_fd: int | None = Field(default=DEFAULTS["auth.token_fd"], ge=0)

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


class FetchSettings(_Section):
    """Limits on each download."""

    max_bytes: int = Field(default=DEFAULTS["fetch.max_bytes"], ge=1)
    connect_timeout: float = Field(default=DEFAULTS["fetch.connect_timeout"], gt=0)
    read_timeout: float = Field(default=DEFAULTS["fetch.read_timeout"], gt=0)
    total_timeout: float = Field(default=DEFAULTS["fetch.total_timeout"], gt=0)


class ImagesSettings(_Section):
    """Limits on each image (the desktop app's)."""

    max_edge: int = Field(default=DEFAULTS["images.max_edge"], ge=1)
    max_pixels: int = Field(default=DEFAULTS["images.max_pixels"], ge=1)
    max_frames: int = Field(default=DEFAULTS["images.max_frames"], ge=1)
    max_decoded_bytes: int = Field(default=DEFAULTS["images.max_decoded_bytes"], ge=1)


class LogSettings(_Section):
    """How much is logged, and in which shape."""

    level: Literal["debug", "info", "warning", "error", "critical"] = DEFAULTS["log.level"]
    format: Literal["text", "json"] = DEFAULTS["log.format"]

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
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key not in DEFAULTS:
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
    path = config_path(config_file)
    toml = _read_toml(path) if config_file is not None or path.exists() else {}
    env = _read_environment()
    flags = _nest(overrides)
    layers: list[tuple[str, Mapping[str, Any]]] = [("the command line", flags), ("environment", env), (str(path), toml)]
    try:
        return Settings.model_validate(_merge(toml, env, flags))
    except ValidationError as exc:
        raise ConfigError([_problem(error, layers) for error in exc.errors()]) from None


def settings_values(settings: Settings) -> Values:
    """Every key as ``"section.key": value``, the value as JSON has it (a path as a string)."""
    return {
        f"{section}.{key}": value
        for section, table in settings.model_dump(mode="json").items()
        for key, value in table.items()
    }


def _answer(request: Mapping[str, Any]) -> dict[str, Any]:
    config_file = request.get("config_file")
    try:
        settings = load_settings(None if config_file is None else Path(config_file), request.get("overrides", {}))
    except ConfigError as exc:
        return {"problems": [{"key": problem.key, "reason": problem.reason} for problem in exc.problems]}
    return {"values": settings_values(settings)}


def answer_request() -> None:
    """The daemon's configuration helper (:mod:`materializer.config_reload`): one JSON request on stdin,
    one JSON answer on stdout."""
    json.dump(_answer(json.load(sys.stdin)), sys.stdout)
