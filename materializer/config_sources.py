"""Where the configuration's layers come from, without the validating machinery.

:mod:`materializer.config` validates the merged layers with pydantic, whose
import alone costs several times a bare interpreter's start. ``status`` only
needs to know where the state folder is, so :func:`state_location` reads
``daemon.root`` and ``daemon.state_dir`` from the same layers, in the same
order, with the same readers. Whenever a layer holds something only the full
validation can judge (an empty value, a whole section in one variable, a
value that is not a plain string), it answers ``None`` and the caller loads
the full settings, whose error then names the problem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_ROOT", "ENV_DELIMITER", "ENV_PREFIX", "ConfigFileError", "config_path", "default_config_path",
           "env_name", "expand_path", "read_toml", "state_location"]

ENV_PREFIX = "MATERIALIZER_"
ENV_DELIMITER = "__"
#: ``daemon.root`` when no layer sets it (``~`` is expanded at each load).
DEFAULT_ROOT = Path("~/.stella")


class ConfigFileError(Exception):
    """The configuration file cannot be read as TOML; ``str()`` says why and names the file."""


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/stella-materializer/config.toml``, with the XDG fallback ``~/.config``."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    config_home = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return config_home / "stella-materializer" / "config.toml"


def config_path(config_file: Path | None) -> Path:
    """The config file a load reads: ``--config``'s, else the default one (:func:`default_config_path`)."""
    return config_file if config_file is not None else default_config_path()


def env_name(key: str) -> str:
    """The environment variable of a dotted key: ``daemon.root`` is ``MATERIALIZER_DAEMON__ROOT``."""
    return ENV_PREFIX + key.upper().replace(".", ENV_DELIMITER)


def expand_path(path: Path) -> Path:
    """A configured path as used: ``~`` expanded, relative to the working directory."""
    return path.expanduser().absolute()


def read_toml(path: Path) -> dict[str, Any]:
    """The file's tables; :class:`ConfigFileError` when it is missing, unreadable or not TOML."""
    import tomllib  # only when there is a file: 6 ms of a `status` start that most often has none

    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigFileError(f"config file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {path} is not valid TOML: {exc}") from None


_LOCATION_KEYS = ("root", "state_dir")


def _plain(value: Any) -> str | None:
    """A path the full validation would take as it is; None for anything it must judge itself."""
    return value if isinstance(value, str) and value.strip() else None


def _from_environment() -> dict[str, str] | None:
    names = {env_name(f"daemon.{key}"): key for key in _LOCATION_KEYS}
    section = ENV_PREFIX + "DAEMON"
    nested = tuple(f"{variable}{ENV_DELIMITER}" for variable in names)
    found: dict[str, str] = {}
    for name, value in os.environ.items():
        upper = name.upper()
        if upper == section or upper.startswith(nested):
            return None  # a whole section as JSON, or a path given as a nested table
        if upper in names:
            if name != upper or _plain(value) is None:
                return None  # a lower-case spelling (which of two wins is pydantic-settings' to say), or empty
            found[names[upper]] = value
    return found


def _from_file(config_file: Path | None) -> dict[str, str] | None:
    path = config_path(config_file)
    if config_file is None and not path.exists():
        return {}
    try:
        tables = read_toml(path)
    except ConfigFileError:
        return None
    daemon = tables.get("daemon", {})
    if not isinstance(daemon, Mapping):
        return None
    found: dict[str, str] = {}
    for key in _LOCATION_KEYS:
        if key in daemon:
            plain = _plain(daemon[key])
            if plain is None:
                return None
            found[key] = plain
    return found


def state_location(
    config_file: Path | None, root: Path | None, state_dir: Path | None
) -> tuple[Path, Path | None] | None:
    """``(daemon.root, daemon.state_dir)`` as :func:`materializer.config.load_settings` would give them.

    ``root`` and ``state_dir`` are the command-line flags (None: not given).
    None when a layer needs the full validation to be judged.
    """
    from_file = _from_file(config_file)
    from_env = _from_environment()
    if from_file is None or from_env is None:
        return None
    flags = {key: str(value) for key, value in (("root", root), ("state_dir", state_dir)) if value is not None}
    if any(_plain(value) is None for value in flags.values()):
        return None
    merged = {**from_file, **from_env, **flags}
    chosen_root = expand_path(Path(merged["root"])) if "root" in merged else expand_path(DEFAULT_ROOT)
    chosen_state = expand_path(Path(merged["state_dir"])) if "state_dir" in merged else None
    return chosen_root, chosen_state
