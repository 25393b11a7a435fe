"""What the daemon and ``replay`` run with, built from the configuration (:mod:`materializer.config_values`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from materializer.config_values import DEFAULTS, LIVE_KEYS, Values, convex_url, optional_path
from materializer.images import ImageLimits
from materializer.layout import Layout, resolve_state_dir

__all__ = ["LIVE_OPTIONS", "OPTION_KEYS", "DaemonOptions", "image_limits"]

def _default(key: str) -> Any:
    """The default of configuration key ``section.name``."""
    return DEFAULTS[key]


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
    image_limits: ImageLimits = field(default_factory=lambda: image_limits(DEFAULTS))
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout(resolve_state_dir(self.root, self.state_dir))

    @classmethod
    def from_values(cls, values: Values) -> DaemonOptions:
        """The options of a validated configuration; :class:`ConfigError` without ``daemon.convex_url``."""
        return cls(root=Path(values["daemon.root"]), convex_url=convex_url(values["daemon.convex_url"]),
                   state_dir=optional_path(values["daemon.state_dir"]), image_limits=image_limits(values),
                   **{name: values[key] for name, key in OPTION_KEYS.items()})


def image_limits(values: Mapping[str, Any]) -> ImageLimits:
    """The image limits of a configuration (a file is never larger than a download may be)."""
    return ImageLimits(max_edge=values["images.max_edge"], max_pixels=values["images.max_pixels"],
                       max_frames=values["images.max_frames"], max_decoded_bytes=values["images.max_decoded_bytes"],
                       max_file_bytes=values["fetch.max_bytes"])
