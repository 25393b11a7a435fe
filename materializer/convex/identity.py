"""Who this client says it is to a Convex deployment, and what the deployment says back about that.

A Convex deployment decides which client it is talking to before it runs
anything (get-convex/convex-backend ``crates/common/src/http/mod.rs``,
``client_version_state_middleware`` and ``client_version_from_req_parts``):
it reads the ``Convex-Client`` header, ``<client>-<semver>``, and only
without that header takes a version in the path (``/api/<v>/sync``) as the
*npm* client's. npm at or below 0.19.1 is refused with ``400
ClientVersionUnsupported`` (``crates/common/deprecation.json``), so a client
of our own must name itself in the header on every request and keep its
version out of the path. Our name is one the server does not know
(``crates/common/src/version.rs`` ``ClientType::Unrecognized``), which has no
thresholds: it is never refused for its version.

The same middleware adds ``x-convex-deprecation-state`` and
``x-convex-deprecation-message`` to answers for clients it is about to stop
supporting (``crates/convex/sync_types/src/headers.rs``); whoever receives
them logs them once through :func:`note_deprecation`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from materializer import __version__

__all__ = [
    "CLIENT_HEADER",
    "CLIENT_ID",
    "DEPRECATION_MESSAGE_HEADER",
    "DEPRECATION_STATE_HEADER",
    "client_headers",
    "note_deprecation",
]

log = logging.getLogger("materializer.convex")

#: The header a Convex deployment reads the client's name and version from.
CLIENT_HEADER = "Convex-Client"
#: Our ``<client>-<semver>``, parsed by the server as client ``stella-materializer``.
CLIENT_ID = f"stella-materializer-{__version__}"
DEPRECATION_STATE_HEADER = "x-convex-deprecation-state"
DEPRECATION_MESSAGE_HEADER = "x-convex-deprecation-message"

_noted: set[tuple[str, str]] = set()


def client_headers() -> dict[str, str]:
    """The headers that identify us, for every WebSocket upgrade and HTTP request."""
    return {CLIENT_HEADER: CLIENT_ID, "User-Agent": f"stella-materializer/{__version__}"}


def note_deprecation(headers: Mapping[str, str]) -> str | None:
    """Log the server's deprecation notice, once per distinct notice in this process; return it.

    ``headers`` is any case-insensitive mapping (httpx's and websockets' both are).
    """
    state = headers.get(DEPRECATION_STATE_HEADER)
    if not state:
        return None
    message = headers.get(DEPRECATION_MESSAGE_HEADER) or ""
    notice = f"{state}: {message}" if message else state
    key = (state, message)
    if key not in _noted:
        _noted.add(key)
        log.warning("the Convex deployment says this client is deprecated (%s)", notice[:500])
    return notice
