"""The limits on what the materializer accepts, each in one place: the desktop app's own.

The desktop's materializer caps a response body at 64 MiB and refuses images
over 16,384 px per edge, 100 megapixels, 300 frames or 400 MB decoded
(ruuxi/stella-v2 ``packages/desktop-ui/src/app/media/use-media-materializer.js``).
They are the defaults of the ``fetch`` and ``images`` configuration sections
and of the modules that enforce them.
"""

from __future__ import annotations

__all__ = ["MAX_DECODED_BYTES", "MAX_DOWNLOAD_BYTES", "MAX_EDGE", "MAX_FRAMES", "MAX_JOB_DOCUMENT_BYTES", "MAX_PIXELS"]

#: Largest download (and decoded data URI), in bytes.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
#: Longest image edge, in pixels.
MAX_EDGE = 16_384
#: Most pixels in one frame.
MAX_PIXELS = 100_000_000
#: Most frames in an animation.
MAX_FRAMES = 300
#: Most memory a decoded image may need (width x height x 4 x frames).
MAX_DECODED_BYTES = 400_000_000
#: The largest job document the ledger keeps (as JSON): a Convex query answer holds at most 16 MiB
#: (``FUNCTION_MAX_RESULT_SIZE``, get-convex/convex-backend ``crates/common/src/knobs.rs``) and a
#: document at most 1 MiB, so a larger one comes from no real deployment; it is quarantined instead.
MAX_JOB_DOCUMENT_BYTES = 16 * 1024 * 1024
