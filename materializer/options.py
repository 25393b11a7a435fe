"""What the daemon and ``replay`` run with, built once from the configuration (:mod:`materializer.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from materializer.config import LIVE_KEYS, Settings
from materializer.images import ImageLimits
from materializer.layout import Layout, resolve_state_dir

__all__ = ["LIVE_OPTIONS", "OPTION_KEYS", "DaemonOptions", "image_limits"]

def _default(key: str) -> Any:
    """The default of configuration key ``section.name``, as :mod:`materializer.config` declares it."""
    section, name = key.split(".")
    model = Settings.model_fields[section].annotation
    return model.model_fields[name].default  # type: ignore[union-attr]


#: Each option the daemon reads from the configuration, and the key it comes from (and its default).
OPTION_KEYS: dict[str, str] = {
    "lookback_hours": "daemon.lookback_hours",
    "subscription_limit": "daemon.subscription_limit",
    "cursor_overlap_ms": "daemon.cursor_overlap_ms",
    "max_attempts": "daemon.max_attempts",
    "retry_base_seconds": "daemon.retry_base_seconds",
    "retry_max_seconds": "daemon.retry_max_seconds",
    "download_concurrency": "daemon.download_concurrency",
    "max_outputs_per_job": "daemon.max_outputs_per_job",
    "memory_budget_bytes": "daemon.memory_budget_bytes",
    "max_sidebar_clients": "daemon.max_sidebar_clients",
    "lease_seconds": "daemon.lease_seconds",
    "gallery_size": "daemon.gallery_size",
    "thumbnails": "daemon.thumbnails",
    "inactivity_timeout": "daemon.inactivity_timeout_seconds",
    "fetch_max_bytes": "fetch.max_bytes",
    "connect_timeout": "fetch.connect_timeout",
    "read_timeout": "fetch.read_timeout",
    "total_timeout": "fetch.total_timeout",
}
#: Options a configuration reload applies at once: those of the live keys, and the image limits.
LIVE_OPTIONS: tuple[str, ...] = (*(name for name, key in OPTION_KEYS.items() if key in LIVE_KEYS), "image_limits")


@dataclass
class DaemonOptions:
    """Everything the daemon needs to know; built from the configuration by the CLI.

    The defaults are the configuration's own (:data:`OPTION_KEYS`); tests and benchmarks build
    options directly with what they change.
    """

    root: Path
    convex_url: str
    #: The Stella state folder; None: ``STELLA_DATA_DIR``, else ``<root>/state`` (see :mod:`materializer.layout`).
    state_dir: Path | None = None
    lookback_hours: float = _default(OPTION_KEYS["lookback_hours"])
    subscription_limit: int = _default(OPTION_KEYS["subscription_limit"])
    cursor_overlap_ms: float = _default(OPTION_KEYS["cursor_overlap_ms"])
    max_attempts: int = _default(OPTION_KEYS["max_attempts"])
    retry_base_seconds: float = _default(OPTION_KEYS["retry_base_seconds"])
    retry_max_seconds: float = _default(OPTION_KEYS["retry_max_seconds"])
    download_concurrency: int = _default(OPTION_KEYS["download_concurrency"])
    max_outputs_per_job: int = _default(OPTION_KEYS["max_outputs_per_job"])
    memory_budget_bytes: int = _default(OPTION_KEYS["memory_budget_bytes"])
    max_sidebar_clients: int = _default(OPTION_KEYS["max_sidebar_clients"])
    lease_seconds: float = _default(OPTION_KEYS["lease_seconds"])
    gallery_size: int = _default(OPTION_KEYS["gallery_size"])
    thumbnails: bool = _default(OPTION_KEYS["thumbnails"])
    inactivity_timeout: float = _default(OPTION_KEYS["inactivity_timeout"])
    fetch_max_bytes: int = _default(OPTION_KEYS["fetch_max_bytes"])
    connect_timeout: float = _default(OPTION_KEYS["connect_timeout"])
    read_timeout: float = _default(OPTION_KEYS["read_timeout"])
    total_timeout: float = _default(OPTION_KEYS["total_timeout"])
    image_limits: ImageLimits = field(default_factory=lambda: image_limits(Settings()))
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout(resolve_state_dir(self.root, self.state_dir))

    @classmethod
    def from_settings(cls, settings: Settings) -> DaemonOptions:
        values = {name: getattr(getattr(settings, key.split(".")[0]), key.split(".")[1])
                  for name, key in OPTION_KEYS.items()}
        return cls(root=settings.daemon.root, convex_url=settings.daemon.require_convex_url(),
                   state_dir=settings.daemon.state_dir, image_limits=image_limits(settings), **values)


def image_limits(settings: Settings) -> ImageLimits:
    """The image limits of a configuration (a file is never larger than a download may be)."""
    return ImageLimits(**settings.images.model_dump(), max_file_bytes=settings.fetch.max_bytes)
