"""Configuration: the four layers, every kind of mistake, the example file, live reload (really watched)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from materializer.config import Settings, _Environment, default_config_path, load_settings, settings_values
from materializer.config_reload import ConfigReloader, config_file_state, resolve, resolve_async
from materializer.config_sources import state_location
from materializer.config_values import (
    DEFAULTS,
    LIVE_KEYS,
    RESTART_KEYS,
    ConfigError,
    Values,
    convex_url,
    diff_values,
    token_argv,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
DEADLINE = 20.0  # seconds; a deadline against hangs, never a performance threshold


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No MATERIALIZER_* variables from outside; HOME and XDG_CONFIG_HOME inside tmp_path."""
    for name in list(os.environ):
        if name.upper().startswith("MATERIALIZER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    yield


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` as editors do: write a new file beside it, rename it over."""
    temporary = path.with_name(path.name + ".swp")
    temporary.write_text(text)
    os.replace(temporary, path)


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def problems(error: ConfigError) -> dict[str, str]:
    return {problem.key: problem.reason for problem in error.problems}


# --- layers and precedence -------------------------------------------------------------------


def test_defaults_without_any_file(tmp_path: Path) -> None:
    settings = load_settings(None, {})
    assert settings == Settings()
    assert settings.daemon.root == tmp_path / "home" / ".stella"
    assert settings.daemon.convex_url is None
    assert settings.daemon.download_concurrency == 4
    assert settings.auth.token_env == "STELLA_TOKEN"
    assert settings.fetch.max_bytes == 64 * 1024 * 1024
    assert (settings.log.level, settings.log.format) == ("info", "text")


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config_file(
        tmp_path,
        '[daemon]\nroot = "/from/file"\ndownload_concurrency = 5\ngallery_size = 10\nmax_attempts = 3\n'
        '[log]\nlevel = "warning"\n',
    )
    monkeypatch.setenv("MATERIALIZER_DAEMON__DOWNLOAD_CONCURRENCY", "6")
    monkeypatch.setenv("MATERIALIZER_DAEMON__GALLERY_SIZE", "11")
    monkeypatch.setenv("MATERIALIZER_LOG__LEVEL", "DEBUG")

    settings = load_settings(path, {"daemon.gallery_size": 12, "daemon.root": None, "log.level": None})

    assert settings.daemon.gallery_size == 12  # flag over environment and file
    assert settings.daemon.download_concurrency == 6  # environment over file
    assert settings.log.level == "debug"  # environment over file; a None flag is "not given"
    assert settings.daemon.root == Path("/from/file")  # file over default; None flag ignored
    assert settings.daemon.max_attempts == 3  # file over default
    assert settings.daemon.lease_seconds == 120.0  # default


def test_environment_names_reach_every_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MATERIALIZER_DAEMON__ROOT", "~/elsewhere")
    monkeypatch.setenv("MATERIALIZER_DAEMON__CONVEX_URL", "https://happy-animal-123.convex.cloud/")
    monkeypatch.setenv("MATERIALIZER_AUTH__TOKEN_FILE", "~/token")
    monkeypatch.setenv("MATERIALIZER_FETCH__READ_TIMEOUT", "7.5")
    monkeypatch.setenv("MATERIALIZER_IMAGES__MAX_FRAMES", "12")
    monkeypatch.setenv("MATERIALIZER_LOG__FORMAT", "json")

    settings = load_settings(None, {})

    assert settings.daemon.root == tmp_path / "home" / "elsewhere"
    assert settings.daemon.convex_url == "https://happy-animal-123.convex.cloud"
    assert settings.auth.token_file == tmp_path / "home" / "token"
    assert settings.fetch.read_timeout == 7.5
    assert settings.images.max_frames == 12
    assert settings.log.format == "json"
    assert set(_Environment.model_fields) == set(Settings.model_fields)  # every section is read


def test_default_file_follows_xdg_config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_config_path() == tmp_path / "xdg" / "stella-materializer" / "config.toml"
    default_config_path().parent.mkdir(parents=True)
    default_config_path().write_text("[daemon]\ngallery_size = 7\n")
    assert load_settings(None, {}).daemon.gallery_size == 7

    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_config_path() == tmp_path / "home" / ".config" / "stella-materializer" / "config.toml"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    assert default_config_path() == tmp_path / "home" / ".config" / "stella-materializer" / "config.toml"


def test_a_missing_default_file_is_fine_a_missing_explicit_one_is_not(tmp_path: Path) -> None:
    assert not default_config_path().exists()
    assert load_settings(None, {}) == Settings()
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(missing))} does not exist"):
        load_settings(missing, {})


def test_relative_paths_start_at_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, {"daemon.root": "r", "auth.token_file": Path("t/token")})
    assert settings.daemon.root == tmp_path / "r"
    assert settings.auth.token_file == tmp_path / "t" / "token"


def test_an_empty_environment_value_unsets_an_optional_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config_file(tmp_path, '[auth]\ntoken_command = "print-token"\n[daemon]\nparent_pid = 42\n')
    monkeypatch.setenv("MATERIALIZER_AUTH__TOKEN_COMMAND", "")
    monkeypatch.setenv("MATERIALIZER_DAEMON__PARENT_PID", "")
    settings = load_settings(path, {})
    assert settings.auth.token_command is None
    assert settings.daemon.parent_pid is None


def test_a_token_source_flag_replaces_the_other_source(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[auth]\ntoken_command = "print-token --fresh"\n')
    assert token_argv(load_settings(path, {}).auth.token_command) == ["print-token", "--fresh"]
    settings = load_settings(path, {"auth.token_file": "/run/token"})
    assert settings.auth.token_file == Path("/run/token")
    assert settings.auth.token_command is None


def test_convex_url_is_required_only_where_used() -> None:
    settings = load_settings(None, {})
    with pytest.raises(ConfigError, match=r"daemon\.convex_url: not set"):
        convex_url(settings.daemon.convex_url)
    url = convex_url(load_settings(None, {"daemon.convex_url": "http://127.0.0.1:3210"}).daemon.convex_url)
    assert url == "http://127.0.0.1:3210"


# --- mistakes --------------------------------------------------------------------------------

FROM_FILE = "from {file}"
FROM_FLAG = "from the command line"

INVALID = [
    # (TOML text, environment, flags, key, fragments of the reason)
    ("[daemon]\ndownload_concurrency = 65\n", {}, {}, "daemon.download_concurrency",
     ["less than or equal to 64", "got 65", FROM_FILE]),
    ("[daemon]\ndownload_concurrency = 0\n", {}, {}, "daemon.download_concurrency",
     ["greater than or equal to 1", FROM_FILE]),
    ('[daemon]\ndownload_concurrency = "many"\n', {}, {}, "daemon.download_concurrency",
     ["valid integer", "got 'many'", FROM_FILE]),
    ("[daemon]\nsubscription_limit = 201\n", {}, {}, "daemon.subscription_limit", ["less than or equal to 200"]),
    ("[daemon]\nmemory_budget_bytes = 1000000\n", {}, {}, "daemon.memory_budget_bytes",
     ["greater than or equal to 16777216", FROM_FILE]),
    ("", {"MATERIALIZER_DAEMON__MAX_OUTPUTS_PER_JOB": "0"}, {}, "daemon.max_outputs_per_job",
     ["greater than or equal to 1", "MATERIALIZER_DAEMON__MAX_OUTPUTS_PER_JOB"]),
    ("[daemon]\nmax_sidebar_clients = 0\n", {}, {}, "daemon.max_sidebar_clients", ["greater than or equal to 1"]),
    ("[daemon]\nlookback_hours = -1\n", {}, {}, "daemon.lookback_hours", ["greater than or equal to 0"]),
    ("[daemon]\nroot = 5\n", {}, {}, "daemon.root", ["valid path"]),
    ('[daemon]\nconvex_url = "ftp://example.com"\n', {}, {}, "daemon.convex_url", ["http:// or https://"]),
    ('[daemon]\nconvex_url = "https://"\n', {}, {}, "daemon.convex_url", ["no host name"]),
    ('[daemon]\nconvex_url = "https://example.com:99999"\n', {}, {}, "daemon.convex_url", ["bad port"]),
    ('[daemon]\nconvex_url = "https://user:pw@example.com"\n', {}, {}, "daemon.convex_url", ["bare deployment URL"]),
    ("[daemon]\nretry_base_seconds = 5\nretry_max_seconds = 1\n", {}, {}, "daemon.retry_max_seconds",
     ["at least daemon.retry_base_seconds (5)", FROM_FILE]),
    ("[daemon]\ndownload_concurency = 2\n", {}, {}, "daemon.download_concurency",
     ["unknown key (did you mean download_concurrency?)", FROM_FILE]),
    ("[deamon]\nroot = '/x'\n", {}, {}, "deamon", ["unknown section (did you mean daemon?)", FROM_FILE]),
    ("[plugins]\nx = 1\n", {}, {}, "plugins", ["unknown section (known: auth, daemon, fetch, images, log)"]),
    ('root = "/x"\n', {}, {}, "root", ["unknown section"]),
    ("daemon = 5\n", {}, {}, "daemon", ["valid dictionary"]),
    ('[auth]\ntoken_env = "NOT A NAME"\n', {}, {}, "auth.token_env", ["environment variable name"]),
    ('[auth]\ntoken_command = "  "\n', {}, {}, "auth.token_command", ["is blank"]),
    ('[auth]\ntoken_file = "/t"\ntoken_command = "print-token"\n', {}, {}, "auth",
     ["auth.token_command and auth.token_file are both set; choose one"]),
    ('[auth]\ntoken_fd = 3\ntoken_command = "print-token"\n', {}, {}, "auth",
     ["auth.token_fd and auth.token_command are both set; choose one"]),
    ('[auth]\ntoken_fd = -1\n', {}, {}, "auth.token_fd", ["greater than or equal to 0"]),
    ('[fetch]\nread_timeout = 0\n', {}, {}, "fetch.read_timeout", ["greater than 0"]),
    ('[images]\nmax_edge = 1.5\n', {}, {}, "images.max_edge", ["valid integer"]),
    ('[log]\nlevel = "loud"\n', {}, {}, "log.level", ["'debug', 'info', 'warning', 'error' or 'critical'"]),
    ('[log]\nformat = "xml"\n', {}, {}, "log.format", ["'text' or 'json'"]),
    ("", {"MATERIALIZER_DAEMON__LEASE_SECONDS": "soon"}, {}, "daemon.lease_seconds",
     ["valid number", "from environment variable MATERIALIZER_DAEMON__LEASE_SECONDS"]),
    ("", {"MATERIALIZER_DAEMON__ROOTS": "/x"}, {}, "daemon.roots",
     ["unknown key (did you mean root?)", "from environment variable MATERIALIZER_DAEMON__ROOTS"]),
    ("[daemon]\nmax_attempts = 3\n", {"MATERIALIZER_DAEMON__MAX_ATTEMPTS": "0"}, {}, "daemon.max_attempts",
     ["greater than or equal to 1", "environment variable"]),
    ("", {"MATERIALIZER_DAEMON__ROOT": ""}, {}, "daemon.root",
     ["is empty", "from environment variable MATERIALIZER_DAEMON__ROOT"]),
    ('[auth]\ntoken_env = ""\n', {}, {}, "auth.token_env", ["is empty", FROM_FILE]),
    ("", {}, {"daemon.parent_pid": 0}, "daemon.parent_pid", ["greater than or equal to 1", FROM_FLAG]),
    ("[daemon]\ngallery_size = 5\n", {}, {"daemon.gallery_size": -1}, "daemon.gallery_size", [FROM_FLAG]),
    ("", {}, {"daemon.no_such_flag": 1}, "daemon.no_such_flag", ["unknown key"]),
]


@pytest.mark.parametrize(("toml", "env", "flags", "key", "fragments"), INVALID)
def test_an_invalid_value_names_the_key_the_reason_and_where_it_came_from(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toml: str,
    env: dict[str, str],
    flags: dict[str, Any],
    key: str,
    fragments: list[str],
) -> None:
    path = config_file(tmp_path, toml)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, flags)
    assert list(problems(caught.value)) == [key]
    message = str(caught.value)
    assert message.startswith(f"{key}: ")
    for fragment in fragments:
        assert fragment.format(file=path) in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[daemon]\ndownload_concurrency = 100\n[log]\nlevel = "loud"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {"daemon.gallery_size": 0})
    assert set(problems(caught.value)) == {"daemon.download_concurrency", "log.level", "daemon.gallery_size"}
    assert str(caught.value).count("; ") == 2


def test_a_token_command_is_never_quoted_in_an_error(tmp_path: Path) -> None:
    path = config_file(tmp_path, "[auth]\ntoken_command = \"curl -u me:hunter2 'https://x\"\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert "auth.token_command: cannot be split into words" in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[daemon\nroot = 1\n", "is not valid TOML: Expected ']' at the end of a table declaration (at line 1"),
        (b"[daemon]\nroot = \n", "is not valid TOML: Invalid value (at line 2"),
        (b"[daemon]\nroot = '\xff\xfe'\n", "is not UTF-8 text"),
    ],
)
def test_a_broken_file_is_reported_with_its_path(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value) == str(caught.value.problems[0])
    assert str(caught.value).startswith(f"config file {path} ")
    assert fragment in str(caught.value)


def test_an_unreadable_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(tmp_path))} cannot be read: Is a directory"):
        load_settings(tmp_path, {})


def test_a_whole_section_in_one_variable_must_be_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATERIALIZER_DAEMON", '{"gallery_size": 3}')
    assert load_settings(None, {}).daemon.gallery_size == 3
    monkeypatch.setenv("MATERIALIZER_DAEMON", "gallery_size=3")
    with pytest.raises(ConfigError, match="environment: .*daemon"):
        load_settings(None, {})


# --- the state location without pydantic (materializer status) --------------------------------

PATH_TEXT = st.sampled_from(["", " ", "~/s", "rel/dir", "/abs/x", " padded ", "123", "[1]", '{"a": 1}', "null",
                             "true", "~", "."])
TOML_VALUE = st.one_of(PATH_TEXT, st.integers(-2, 2), st.booleans(), st.just(["x"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file_root=st.none() | TOML_VALUE, file_state=st.none() | TOML_VALUE, daemon_table=st.booleans(),
    env_root=st.none() | PATH_TEXT, env_state=st.none() | PATH_TEXT,
    env_spelling=st.sampled_from(["MATERIALIZER_DAEMON__{}", "materializer_daemon__{}", "MATERIALIZER_DAEMON__{}__X"]),
    whole_section=st.none() | st.sampled_from(['{"root": "/j"}', "{}", "nope"]),
    flag_root=st.none() | st.sampled_from(["/f", "f", "~/f"]), flag_state=st.none() | st.sampled_from(["/fs", "fs"]),
)
def test_the_state_location_read_without_pydantic_is_what_the_full_load_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_root: Any, file_state: Any, daemon_table: bool,
    env_root: str | None, env_state: str | None, env_spelling: str, whole_section: str | None,
    flag_root: str | None, flag_state: str | None,
) -> None:
    """``status`` reads daemon.root and daemon.state_dir from the layers itself; whenever it answers,
    its answer is the validated settings' (and it answers for every plain configuration)."""
    for name in list(os.environ):
        if name.upper().startswith("MATERIALIZER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    table = {key: value for key, value in (("root", file_root), ("state_dir", file_state)) if value is not None}
    path = tmp_path / "config.toml"
    if daemon_table:
        path.write_text("[daemon]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in table.items()))
    else:  # a [daemon] that is not a table
        path.write_text("" if file_root is None else f"daemon = {_toml(file_root)}\n")
    for key, value in (("ROOT", env_root), ("STATE_DIR", env_state)):
        if value is not None:
            monkeypatch.setenv(env_spelling.format(key if env_spelling.isupper() else key.lower()), value)
    if whole_section is not None:
        monkeypatch.setenv("MATERIALIZER_DAEMON", whole_section)
    flags = {"daemon.root": None if flag_root is None else Path(flag_root),
             "daemon.state_dir": None if flag_state is None else Path(flag_state)}
    fast = state_location(path, flags["daemon.root"], flags["daemon.state_dir"])
    try:
        full = load_settings(path, flags).daemon
    except ConfigError:
        assert fast is None, "an invalid location must go to the full load, which names the problem"
        return
    if fast is not None:
        assert fast == (full.root, full.state_dir)
    plain_env = env_spelling == "MATERIALIZER_DAEMON__{}" and whole_section is None and all(
        value is None or value.strip() for value in (env_root, env_state))
    plain_file = (all(isinstance(value, str) and value.strip() for value in table.values()) if daemon_table
                  else file_root is None)
    if plain_env and plain_file:
        assert fast is not None, "a plain configuration is read without pydantic"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value)


def test_the_state_location_falls_back_to_the_full_load_for_a_broken_file(tmp_path: Path) -> None:
    broken = config_file(tmp_path, "[daemon\nroot = 1")
    assert state_location(broken, None, None) is None
    assert state_location(tmp_path / "missing.toml", None, None) is None
    assert state_location(None, None, None) == (Path.home() / ".stella", None)


# --- the example file ------------------------------------------------------------------------


def example_keys() -> tuple[dict[str, Any], set[str], set[str]]:
    """(active values, keys shown commented out, keys marked [live]) of config.example.toml."""
    text = EXAMPLE.read_text()
    active = {
        f"{section}.{key}": value for section, table in tomllib.loads(text).items() for key, value in table.items()
    }
    commented: set[str] = set()
    live: set[str] = set()
    section = ""
    comments: list[str] = []
    for line in text.splitlines():
        if match := re.fullmatch(r"\[(\w+)\]", line):
            section, comments = match.group(1), []
        elif match := re.fullmatch(r"(# )?(\w+) = .*", line):
            key = f"{section}.{match.group(2)}"
            if match.group(1):
                commented.add(key)
            if any("[live]" in comment for comment in comments):
                live.add(key)
            comments = []
        elif line.startswith("#"):
            comments.append(line)
    return active, commented, live


def test_the_example_file_shows_every_key_with_its_default() -> None:
    active, commented, _ = example_keys()
    defaults = settings_values(Settings())
    assert Settings.model_validate(tomllib.loads(EXAMPLE.read_text())) == Settings()
    assert set(active) | commented == set(defaults)
    assert not set(active) & commented
    # TOML has no null: exactly the keys without a default are shown commented out.
    assert commented == {key for key, value in defaults.items() if value is None}


def test_the_example_file_marks_exactly_the_live_keys() -> None:
    _, _, live = example_keys()
    assert live == LIVE_KEYS


def test_the_example_file_loads_as_a_config_file() -> None:
    assert load_settings(EXAMPLE, {}) == Settings()


# --- diffs and live reload -------------------------------------------------------------------


def test_the_plain_defaults_are_the_validated_ones() -> None:
    """config_values.DEFAULTS (what the daemon's options default to) has every key, as validation gives it."""
    validated = settings_values(Settings())
    assert set(DEFAULTS) == set(validated)
    plain = {key: str(value) if isinstance(value, Path) else value for key, value in DEFAULTS.items()}
    assert {**plain, "daemon.root": validated["daemon.root"]} == validated
    assert validated["daemon.root"] == str(Path.home() / ".stella")


def test_live_and_restart_keys_split_all_keys() -> None:
    assert not LIVE_KEYS & RESTART_KEYS
    assert LIVE_KEYS | RESTART_KEYS == set(settings_values(Settings()))
    assert {"daemon.root", "daemon.convex_url", "auth.token_file", "auth.token_command"} <= RESTART_KEYS
    assert {"log.level", "daemon.max_attempts", "fetch.max_bytes", "images.max_edge"} <= LIVE_KEYS


def test_diff_values_splits_what_changed() -> None:
    old = settings_values(load_settings(None, {}))
    new = settings_values(load_settings(None, {"log.level": "debug", "daemon.root": "/elsewhere",
                                               "fetch.read_timeout": 5}))
    assert diff_values(old, new) == (["fetch.read_timeout", "log.level"], ["daemon.root"])
    assert diff_values(new, new) == ([], [])


# --- the helper process that validates for the daemon ------------------------------------------


def test_the_helper_answers_what_load_settings_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All four layers reach the helper: the file and the flags in its request, the environment inherited."""
    path = config_file(tmp_path, '[daemon]\nmax_attempts = 3\n[fetch]\nread_timeout = 7.5\n')
    monkeypatch.setenv("MATERIALIZER_LOG__LEVEL", "debug")
    flags = {"daemon.root": tmp_path / "root", "daemon.convex_url": "http://127.0.0.1:3210", "auth.token_fd": None}
    values = resolve(path, flags)
    assert values == settings_values(load_settings(path, flags))
    assert (values["daemon.max_attempts"], values["fetch.read_timeout"], values["log.level"]) == (3, 7.5, "debug")
    assert values["daemon.root"] == str(tmp_path / "root")


def test_the_helper_reports_every_problem_as_load_settings_does(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[daemon]\nmax_attempts = 0\nroot = ""\n[nope]\n')
    with pytest.raises(ConfigError) as direct:
        load_settings(path, {})
    with pytest.raises(ConfigError) as helped:
        resolve(path, {})
    assert helped.value.problems == direct.value.problems
    assert len(helped.value.problems) == 3
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(tmp_path / "missing.toml", {})


async def test_the_helper_answers_inside_an_event_loop(tmp_path: Path) -> None:
    path = config_file(tmp_path, "[daemon]\ngallery_size = 12\n")
    assert (await resolve_async(path, {}))["daemon.gallery_size"] == 12
    with pytest.raises(ConfigError, match=r"daemon\.gallery_size"):
        await resolve_async(config_file(tmp_path, "[daemon]\ngallery_size = -1\n"), {})


def test_the_helper_runs_this_package_not_one_in_the_working_directory(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``materializer`` folder where the daemon was started is not what validates its configuration."""
    planted = tmp_path / "cwd" / "materializer"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("")
    (planted / "config.py").write_text(
        "import json, sys\ndef answer_request():\n    json.dump({'values': {'planted': True}}, sys.stdout)\n")
    monkeypatch.chdir(planted.parent)
    assert resolve(None, {}) == settings_values(load_settings(None, {}))


def test_a_helper_that_fails_is_a_config_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper that dies, or answers nonsense, gives its exit code and last line, not a traceback."""
    monkeypatch.setattr("materializer.config_reload._HELPER",
                        (sys.executable, "-c", "import sys; print('traceback...', file=sys.stderr); sys.exit('gone')"))
    with pytest.raises(ConfigError, match=r"^the configuration could not be read \(its helper process, exit code 1: "
                                          r"gone\)$"):
        resolve(None, {})
    monkeypatch.setattr("materializer.config_reload._HELPER", (sys.executable, "-c", "print('[1, 2]')"))
    with pytest.raises(ConfigError, match=r"exit code 0: no answer"):
        resolve(None, {})


def test_the_daemon_process_never_imports_pydantic() -> None:
    """What ``materializer run`` imports (the service, the daemon, the reloader) leaves pydantic out."""
    code = ("import sys, materializer.cli, materializer.service, materializer.config_reload; "
            "print(sorted(name for name in sys.modules if name == 'materializer.config' "
            "or name.split('.')[0] in ('pydantic', 'pydantic_core', 'pydantic_settings')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


class Recorder:
    """Collects what a reloader hands over, for tests to wait on."""

    def __init__(self) -> None:
        self.outcomes: asyncio.Queue[Values | ConfigError] = asyncio.Queue()

    def __call__(self, outcome: Values | ConfigError) -> None:
        self.outcomes.put_nowait(outcome)

    async def next(self) -> Values | ConfigError:
        return await asyncio.wait_for(self.outcomes.get(), DEADLINE)


def values_of(path: Path | None, flags: dict[str, Any]) -> Values:
    return settings_values(load_settings(path, flags))


async def test_reload_applies_live_keys_and_holds_restart_keys(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[daemon]\nroot = "/first"\n')
    recorder = Recorder()
    reloader = ConfigReloader(values_of(path, {}), path, {}, recorder)

    path.write_text('[daemon]\nroot = "/second"\nmax_attempts = 2\n[log]\nlevel = "debug"\n')
    reloader.reload()  # as SIGHUP does: in a task of its own

    applied = await recorder.next()
    assert isinstance(applied, dict)
    assert applied is reloader.values
    assert (applied["daemon.max_attempts"], applied["log.level"]) == (2, "debug")
    assert applied["daemon.root"] == "/first"  # needs a restart: the running value stays
    assert reloader.restart_needed == ["daemon.root"]

    await reloader.reload_now()  # nothing new: nothing to hand over
    assert recorder.outcomes.empty()

    path.write_text('[daemon]\nroot = "/first"\nmax_attempts = 2\n[log]\nlevel = "debug"\n')
    await reloader.reload_now()  # the restart-only change was undone
    assert await recorder.next() == applied
    assert reloader.restart_needed == []


async def test_a_bad_edit_keeps_the_running_settings(tmp_path: Path) -> None:
    path = config_file(tmp_path, "[daemon]\nmax_attempts = 4\n")
    recorder = Recorder()
    running = values_of(path, {})
    reloader = ConfigReloader(running, path, {}, recorder)

    path.write_text("[daemon]\nmax_attempts = 0\n")
    await reloader.reload_now()
    error = await recorder.next()
    assert isinstance(error, ConfigError)
    assert "daemon.max_attempts" in str(error)
    assert reloader.values is running
    assert reloader.error is error

    await reloader.reload_now()  # the same error is handed over once
    assert recorder.outcomes.empty()

    path.write_text("[daemon]\nmax_attempts = 4\n")
    await reloader.reload_now()  # fixed: the running settings are confirmed, the error is gone
    assert await recorder.next() == running
    assert reloader.error is None


async def test_reload_keeps_the_flags(tmp_path: Path) -> None:
    path = config_file(tmp_path, "[daemon]\ngallery_size = 5\n")
    recorder = Recorder()
    flags = {"daemon.gallery_size": 9}
    reloader = ConfigReloader(values_of(path, flags), path, flags, recorder)
    path.write_text("[daemon]\ngallery_size = 6\nmax_attempts = 2\n")
    await reloader.reload_now()
    applied = await recorder.next()
    assert isinstance(applied, dict)
    assert (applied["daemon.gallery_size"], applied["daemon.max_attempts"]) == (9, 2)


async def test_watch_reloads_on_every_save_and_survives_a_bad_one(tmp_path: Path) -> None:
    folder = tmp_path / "xdg" / "stella-materializer"
    folder.mkdir(parents=True)
    path = folder / "config.toml"
    path.write_text('[log]\nlevel = "info"\n')
    recorder = Recorder()
    reloader = ConfigReloader(values_of(None, {}), None, {}, recorder)
    watcher = asyncio.create_task(reloader.watch())
    try:
        # Saved right away: seen whether it lands before or after the watch is in place.
        write_atomically(path, '[log]\nlevel = "debug"\n')
        applied = await recorder.next()
        assert isinstance(applied, dict) and applied["log.level"] == "debug"

        write_atomically(path, '[log]\nlevel = "debug"\n[daemon]\nmax_attempts = "x"\n')
        error = await recorder.next()
        assert isinstance(error, ConfigError) and "daemon.max_attempts" in str(error)
        assert reloader.values is applied

        (folder / "unrelated.toml").write_text("not even toml [")  # other files in the folder are ignored
        write_atomically(path, '[log]\nlevel = "warning"\n')
        applied = await recorder.next()
        assert isinstance(applied, dict) and applied["log.level"] == "warning"
        assert reloader.error is None
        assert not watcher.done()
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        await reloader.aclose()


async def test_watch_reloads_at_its_start_only_if_the_file_changed_since_it_was_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The catch-up reload at the watch's start runs a helper only for an edit made since the load."""
    folder = tmp_path / "xdg" / "stella-materializer"
    folder.mkdir(parents=True)
    path = folder / "config.toml"
    path.write_text('[log]\nlevel = "info"\n')
    helpers: list[Path | None] = []

    async def counted(config_file: Path | None, overrides: Any) -> Values:
        helpers.append(config_file)
        return await resolve_async(config_file, overrides)

    monkeypatch.setattr("materializer.config_reload.resolve_async", counted)

    # Unchanged since the load: no reload at the start; the first one is the edit's.
    recorder = Recorder()
    reloader = ConfigReloader(values_of(None, {}), None, {}, recorder, config_file_state(None))
    watcher = asyncio.create_task(reloader.watch())
    try:
        await asyncio.wait_for(reloader.reload_now(), DEADLINE)  # the same load as a catch-up would be
        assert recorder.outcomes.empty() and len(helpers) == 1
        write_atomically(path, '[log]\nlevel = "debug"\n')
        applied = await recorder.next()
        assert isinstance(applied, dict) and applied["log.level"] == "debug"
        assert len(helpers) == 2
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        await reloader.aclose()

    # Edited between the load and the watch: caught at the start, with no further edit.
    loaded, values = config_file_state(None), values_of(None, {})
    write_atomically(path, '[log]\nlevel = "warning"\n')
    recorder = Recorder()
    reloader = ConfigReloader(values, None, {}, recorder, loaded)
    watcher = asyncio.create_task(reloader.watch())
    try:
        applied = await recorder.next()
        assert isinstance(applied, dict) and applied["log.level"] == "warning"
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        await reloader.aclose()


async def test_watch_without_the_folder_ends_quietly(tmp_path: Path) -> None:
    recorder = Recorder()
    reloader = ConfigReloader(values_of(None, {}), tmp_path / "missing" / "config.toml", {}, recorder)
    await asyncio.wait_for(reloader.watch(), DEADLINE)
    assert recorder.outcomes.empty()
