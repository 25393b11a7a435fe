"""httpcore looks for ``sniffio`` on every request; where it is not installed, say so once.

``httpcore._synchronization.current_async_library`` runs ``import sniffio`` each time it
is called (several times per request: locks, connection pool, cancellation shields). With
the package absent, as it is now that anyio no longer requires it, every such import
walks ``sys.path`` and fails: about 60 microseconds of CPU each, a few hundred per job
downloaded. A ``None`` in :data:`sys.modules` is Python's own record of a module known
to be absent (the import fails at once, with ``ModuleNotFoundError`` as before), so
httpcore takes the same "asyncio" path it took, without the search.
"""

import importlib.util
import sys

__all__ = ["note_sniffio_absent"]


def note_sniffio_absent() -> None:
    """Record ``sniffio`` as absent in :data:`sys.modules` when it cannot be found (nothing when it can)."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]  # typeshed omits the None of an absent module
