"""Where everything lives on disk: the one home of the materializer's paths.

The Stella state folder is the desktop app's: ``STELLA_DATA_DIR`` if set, else
``~/.stella`` (ruuxi/stella-v2 ``packages/runtime/kernel/home/stella-paths.ts``,
``resolveRuntimeStatePath``: the variable trimmed, then resolved), and the
desktop writes media to ``<state folder>/media/outputs/``
(``packages/desktop/electron/ipc/browser-handlers.js``). The materializer's
own default is ``<root>/state`` (the public media API doc's
``state/media/outputs/``); ``daemon.state_dir`` (``--state-dir``) or
``STELLA_DATA_DIR`` points it at the desktop's folder instead, so both
share one outputs folder.

Everything the daemon keeps sits beside the outputs, in ``<state>/media/``:
the ledger, the instance lock and the sidebar socket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STATE_DIR_ENV", "Layout", "default_layout", "resolve_state_dir"]

#: The desktop app's variable for its state folder.
STATE_DIR_ENV = "STELLA_DATA_DIR"
#: The state folder inside a root when nothing else names one.
ROOT_STATE_SUBDIR = "state"


def resolve_state_dir(root: Path, state_dir: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The Stella state folder: the setting, else ``STELLA_DATA_DIR`` as the desktop reads it, else ``<root>/state``."""
    if state_dir is not None:
        return state_dir
    from_env = environ.get(STATE_DIR_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser().resolve()
    return root / ROOT_STATE_SUBDIR


@dataclass(frozen=True, slots=True)
class Layout:
    """The paths under one Stella state folder."""

    state: Path

    @property
    def media(self) -> Path:
        """The materializer's own folder (created 0700): ledger, lock, socket, outputs."""
        return self.state / "media"

    @property
    def outputs(self) -> Path:
        return self.media / "outputs"

    @property
    def ledger(self) -> Path:
        return self.media / "materializer.db"

    @property
    def lock(self) -> Path:
        return self.media / "materializer.lock"

    @property
    def display_socket(self) -> Path:
        return self.media / "display.sock"


def default_layout(root: Path) -> Layout:
    """The layout of a root with no state folder configured: ``<root>/state``."""
    return Layout(root / ROOT_STATE_SUBDIR)
