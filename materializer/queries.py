"""The Convex functions the materializer calls, and the one loop that pages through a page query.

The real backend has exactly three public media queries (ruuxi/stella-v2
``packages/contracts/convex-api.ts``, the ``media_jobs`` entry):
``getByJobId``, ``listSucceededSince`` and ``listFailedSince``. A gap-free
page query (:data:`PAGE_QUERY`) exists only on backends that add one (the
local backend with ``--extension page-query``); callers use it where it
answers and learn from its "Could not find public function" that it is not
there.

A page may fail for its size alone (Convex fails a function that reads more
than 16 MiB of documents: ``TooManyBytesRead``, get-convex/convex-backend
``crates/database/src/reads.rs``), so a failing page is asked for again with
half as many items, down to one, before the failure counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from materializer.convex.http import ConvexFunctionError, ConvexHttpClient, ConvexHttpError

__all__ = ["FAILED_QUERY", "JOB_QUERY", "MISSING_FUNCTION", "PAGE_QUERY", "PAGE_SIZE", "SUCCEEDED_QUERY",
           "WINDOW_MAX", "PageQueryBroken", "is_missing_function", "succeeded_pages"]

SUCCEEDED_QUERY = "media_jobs:listSucceededSince"
FAILED_QUERY = "media_jobs:listFailedSince"
JOB_QUERY = "media_jobs:getByJobId"
PAGE_QUERY = "media_jobs:listSucceededPage"
#: The most jobs ``listSucceededSince`` returns (its ``limit`` is clamped to 1..200).
WINDOW_MAX = 200
PAGE_SIZE = 200
#: How a Convex deployment answers for a function it does not have (``crates/udf/src/validation.rs``,
#: ``missing_or_internal_error``).
MISSING_FUNCTION = "Could not find public function"


class PageQueryBroken(ConvexHttpError):
    """The page query answers, but not with pages that move on: it cannot close a gap on this backend."""


def is_missing_function(exc: ConvexFunctionError) -> bool:
    """Whether the function failed because the deployment does not have it."""
    return MISSING_FUNCTION in exc.error_message


async def succeeded_pages(http: ConvexHttpClient, token: Callable[[], Awaitable[str | None]], since: float,
                          until: float | None = None, page_size: int = PAGE_SIZE) -> AsyncIterator[list[Any]]:
    """Pages of succeeded jobs with ``completedAt >= since``, oldest first, until one reaches ``until``.

    A page whose function fails is asked for again with half as many items (down to one).
    Raises :class:`~materializer.convex.http.ConvexFunctionError` when the backend has no page
    query (:func:`is_missing_function`) or a page of one job fails, :class:`PageQueryBroken` for
    an answer that is not a page or a cursor that does not move on (a backend that would page
    forever), and :class:`~materializer.convex.http.ConvexHttpError` when a request fails.
    """
    cursor: str | None = None
    cursors_seen: set[str | None] = {None}
    size = page_size
    while True:
        try:
            page = await http.query(PAGE_QUERY, {"since": since, "paginationOpts": {"numItems": size,
                                                                                  "cursor": cursor}}, await token())
        except ConvexFunctionError as exc:
            if is_missing_function(exc) or size == 1:
                raise
            size = max(1, size // 2)
            continue
        if not isinstance(page, dict) or not isinstance(page.get("page"), list):
            raise PageQueryBroken(f"{PAGE_QUERY} answered {type(page).__name__}, not a page of jobs")
        docs = page["page"]
        yield docs
        last = docs[-1].get("completedAt") if docs and isinstance(docs[-1], dict) else None
        reached = until is not None and isinstance(last, (int, float)) and not isinstance(last, bool) and last >= until
        if page.get("isDone") is True or not docs or reached:
            return
        cursor = page.get("continueCursor")
        if not isinstance(cursor, str) or cursor in cursors_seen:
            raise PageQueryBroken(f"{PAGE_QUERY} does not move on (its continueCursor repeats or is missing)")
        cursors_seen.add(cursor)
