"""Who is calling: the Convex client-version rule every route of a real deployment applies.

Mirrors get-convex/convex-backend:

- ``crates/common/src/version.rs``: ``ClientVersion::from_str`` (the
  ``Convex-Client`` header ``<client>-<semver>``, read by taking the longest
  parseable semver from the right), ``ClientType`` (unknown names are let
  through), ``current_state`` (its messages) and ``from_path_param``;
- ``crates/common/deprecation.json``: the thresholds, compared with ``<=``
  (``ClientVersionIdent::below_threshold``);
- ``crates/common/src/http/mod.rs``: ``client_version_from_req_parts`` (the
  header first, else the path version as npm's or the CLI's, else an unknown
  client) and the ``InvalidClientVersion`` rejection around it;
- ``crates/local_backend/src/subs/mod.rs`` ``new_sync_worker_config``: only
  npm clients at ``MIN_NPM_VERSION_FOR_TRANSITION_CHUNKS`` or later get
  ``TransitionChunk`` messages.

Pure logic, no I/O: :mod:`stella_devbackend.app` applies it to requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "ClientVersion",
    "ClientVersionError",
    "Semver",
    "State",
    "client_version_of",
]


class ClientVersionError(ValueError):
    """A client version the server cannot parse: answered ``400 InvalidClientVersion`` with this message.

    (``ExtractClientVersion`` wraps every parse error, ``InvalidVersion`` among
    them, in ``InvalidClientVersion``: ``crates/common/src/http/mod.rs``.)
    """


_NUMBER = r"(?:0|[1-9][0-9]*)"
_PRE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_BUILD_ID = r"[0-9A-Za-z-]+"
_SEMVER = re.compile(
    rf"({_NUMBER})\.({_NUMBER})\.({_NUMBER})(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?(?:\+({_BUILD_ID}(?:\.{_BUILD_ID})*))?",
    re.ASCII,
)
_U64_MAX = 2**64 - 1


def _identifier_key(identifier: str) -> tuple[int, int | str]:
    """Numeric identifiers sort numerically and before alphanumeric ones (SemVer 2.0 precedence)."""
    return (0, int(identifier)) if identifier.isdigit() else (1, identifier)


@dataclass(frozen=True)
class Semver:
    """A strict SemVer 2.0 version, as the Rust ``semver`` crate parses and orders it."""

    major: int
    minor: int
    patch: int
    pre: tuple[str, ...] = ()
    build: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Semver | None:
        """The version ``text`` spells exactly (no ``v`` prefix, no leading zeros), or None."""
        match = _SEMVER.fullmatch(text)
        if match is None:
            return None
        major, minor, patch = (int(part) for part in match.group(1, 2, 3))
        if max(major, minor, patch) > _U64_MAX:
            return None
        pre = tuple(match.group(4).split(".")) if match.group(4) else ()
        build = tuple(match.group(5).split(".")) if match.group(5) else ()
        return cls(major, minor, patch, pre, build)

    def _key(self) -> tuple[object, ...]:
        # A release sorts after its pre-releases; empty build metadata sorts before any.
        pre = (1,) if not self.pre else (0, tuple(_identifier_key(i) for i in self.pre))
        build = (0,) if not self.build else (1, tuple(_identifier_key(i) for i in self.build))
        return (self.major, self.minor, self.patch, pre, build)

    def __le__(self, other: Semver) -> bool:
        return self._key() <= other._key()

    def __lt__(self, other: Semver) -> bool:
        return self._key() < other._key()

    def __ge__(self, other: Semver) -> bool:
        return self._key() >= other._key()

    def __gt__(self, other: Semver) -> bool:
        return self._key() > other._key()

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.pre:
            text += "-" + ".".join(self.pre)
        if self.build:
            text += "+" + ".".join(self.build)
        return text


class State(Enum):
    """``ClientVersionState``; the value is its ``variant_name()``, sent in ``x-convex-deprecation-state``."""

    UNSUPPORTED = "Unsupported"
    UPGRADE_REQUIRED = "UpgradeRequired"
    SUPPORTED = "Supported"


@dataclass(frozen=True)
class _Family:
    """One client family of ``deprecation.json``: its thresholds (inclusive) and upgrade advice."""

    upgrade_required: Semver
    unsupported: Semver
    instructions: str


_NPM = _Family(Semver(0, 19, 1), Semver(0, 19, 1),
               "Update your Convex npm version with `npx convex update` or `npm update`.")
_PYTHON = _Family(Semver(0, 2, 0), Semver(0, 0, 2),
                  "Update your Convex python version with `pip install --upgrade convex`.")
_RUST = _Family(Semver(0, 0, 1), Semver(0, 0, 1),
                "Update your Convex rust version with `cargo update -p convex` or by updating `Cargo.toml`.")

#: Header client name (lower-cased) -> (the name the server prints, its family or None).
#: ``ClientType::from_str`` and ``Display``; a name not in this table is let through unversioned.
CLIENT_TYPES: dict[str, tuple[str, _Family | None]] = {
    "python-convex": ("python", _PYTHON),
    "python": ("python", _PYTHON),
    "npm-cli": ("npm-cli", _NPM),
    "npm": ("npm", _NPM),
    "actions": ("actions", _NPM),
    "rust": ("rust", _RUST),
    "create-convex": ("create-convex", None),
    "streaming-import": ("streaming-import", None),
    "airbyte-export": ("airbyte-export", None),
    "fivetran-import": ("fivetran-import", None),
    "fivetran-export": ("fivetran-export", None),
    "dashboard": ("dashboard", None),
    "swift": ("swift", None),
    "kotlin": ("kotlin", None),
}

#: ``MIN_NPM_VERSION_FOR_TRANSITION_CHUNKS`` (``crates/common/src/version.rs``).
MIN_NPM_VERSION_FOR_TRANSITION_CHUNKS = Semver(1, 28, 0)


@dataclass(frozen=True)
class ClientVersion:
    """A client as the server identified it: its printed name, thresholds, and version (None: unrecognized)."""

    client: str
    family: _Family | None
    version: Semver | None
    version_text: str

    @classmethod
    def parse(cls, header: str) -> ClientVersion:
        """``<client>-<semver>``, the longest parseable semver taken from the right (``FromStr``)."""
        parts = header.split("-")
        if len(parts) < 2:
            raise ClientVersionError(
                f"Failed to parse client version string: '{header}'. Expected format is "
                "{client_name}-{semver}, e.g. my-esolang-client-0.0.1",
            )
        for n in range(1, len(parts)):
            version = Semver.parse("-".join(parts[n:]))
            if version is not None:
                return cls._named("-".join(parts[:n]), version, str(version))
        return cls._named(parts[0], None, "-".join(parts[1:]))

    @classmethod
    def _named(cls, name: str, version: Semver | None, text: str) -> ClientVersion:
        lowered = name.lower()
        printed, family = CLIENT_TYPES.get(lowered, (lowered, None))
        return cls(printed, family, version, text)

    @classmethod
    def from_path(cls, version_text: str, path: str) -> ClientVersion:
        """A version in the path belongs to npm on ``/sync`` and ``/udf``, to the CLI elsewhere."""
        version = Semver.parse(version_text)
        if version is None:
            raise ClientVersionError(f"Failed to parse client version: {version_text!r} is not a semantic version")
        client = "npm" if path.endswith("/sync") or path.endswith("/udf") else "npm-cli"
        return cls(client, _NPM, version, str(version))

    @classmethod
    def unknown(cls) -> ClientVersion:
        return cls("unknown", None, None, "unknownversion")

    def _below(self, threshold: Semver) -> bool:
        """``below_threshold``: at or below it; an unrecognized version always is."""
        return self.version is None or self.version <= threshold

    def state(self) -> tuple[State, str]:
        """``current_state``: whether the server serves this client, and the message it gives."""
        family = self.family
        if family is None:
            return State.SUPPORTED, ""
        if self._below(family.unsupported):
            return State.UNSUPPORTED, (f"The Convex {self.client} package at version {self.version_text} is no "
                                       f"longer supported. {family.instructions}")
        if self._below(family.upgrade_required):
            return State.UPGRADE_REQUIRED, (
                f"The Convex {self.client} package at {self.version_text} is deprecated and will no longer be "
                "supported soon. When this version is no longer supported, requests to Convex will fail, so it "
                f"is best to upgrade and redeploy your application as soon as possible. {family.instructions}"
            )
        return State.SUPPORTED, ""

    @property
    def supports_transition_chunks(self) -> bool:
        """``new_sync_worker_config``: npm at 1.28.0 or later; every other client gets whole transitions."""
        return self.client == "npm" and self.version is not None and (
            self.version >= MIN_NPM_VERSION_FOR_TRANSITION_CHUNKS
        )

    def __str__(self) -> str:
        return f"{self.client}-{self.version_text}"


def _header_text(value: str | None) -> str | None:
    """The header as ``HeaderValue::to_str`` reads it: None unless every character is visible ASCII or tab."""
    if value is None or any(not (c == "\t" or " " <= c <= "~") for c in value):
        return None
    return value


def client_version_of(header: str | None, path_version: str | None, path: str) -> ClientVersion:
    """``client_version_from_req_parts``: the header, else the path's version, else an unknown client."""
    text = _header_text(header)
    if text is not None:
        return ClientVersion.parse(text)
    if path_version is not None:
        return ClientVersion.from_path(path_version, path)
    return ClientVersion.unknown()
