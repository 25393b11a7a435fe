"""What every httpx client of the materializer shares: one TLS context, and httpcore's sniffio question answered.

TLS. Each ``httpx.AsyncClient`` (and each transport) loads the CA bundle into a TLS
context of its own unless given one: about 20 ms of CPU and 1 MB each, paid by every
fetcher, every ``ConvexHttpClient`` (the daemon opens one per gap it fills) and each
of their transports. :func:`tls_context` makes httpx's default context once (once for
clients that take ``SSL_CERT_FILE``/``SSL_CERT_DIR`` from the environment, as httpx's
``trust_env`` does, and once for those that do not).

sniffio. ``httpcore._synchronization.current_async_library`` runs ``import sniffio``
each time it is called (several times per request: locks, connection pool, cancellation
shields). With the package absent, as it is now that anyio no longer requires it, every
such import walks ``sys.path`` and fails: about 60 microseconds of CPU each, a few
hundred per job downloaded. A ``None`` in :data:`sys.modules` is Python's own record of
a module known to be absent (the import fails at once, with ``ModuleNotFoundError`` as
before), so httpcore takes the same "asyncio" path it took, without the search. Done
when this module is imported, before any client exists.
"""

import functools
import importlib.util
import ssl
import sys

import httpx

__all__ = ["tls_context"]


@functools.cache
def tls_context(*, trust_env: bool) -> ssl.SSLContext:
    """httpx's default TLS context for a client of that ``trust_env``, made once per process."""
    return httpx.create_ssl_context(trust_env=trust_env)


def _note_sniffio_absent() -> None:
    """Record ``sniffio`` as absent in :data:`sys.modules` when it cannot be found (nothing when it can)."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]  # typeshed omits the None of an absent module


_note_sniffio_absent()
