"""The Convex functions the materializer calls, and the one loop that pages through a page query.

The real backend has exactly three public media queries (ruuxi/stella-v2
``packages/contracts/convex-api.ts``, the ``media_jobs`` entry):
``getByJobId``, ``listSucceededSince`` and ``listFailedSince``. A gap-free
page query (:data:`PAGE_QUERY`) exists only on backends that add one (the
local backend with ``--extension page-query``); callers use it where it
answers and learn from its "Could not find public function" that it is not
there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from materializer.convex.http import ConvexHttpClient, ConvexHttpError

__all__ = ["FAILED_QUERY", "JOB_QUERY", "PAGE_QUERY", "PAGE_SIZE", "SUCCEEDED_QUERY", "WINDOW_MAX", "PageQueryBroken",
           "succeeded_pages"]

SUCCEEDED_QUERY = "media_jobs:listSucceededSince"
FAILED_QUERY = "media_jobs:listFailedSince"
JOB_QUERY = "media_jobs:getByJobId"
PAGE_QUERY = "media_jobs:listSucceededPage"
#: The most jobs ``listSucceededSince`` returns (its ``limit`` is clamped to 1..200).
WINDOW_MAX = 200
PAGE_SIZE = 200


class PageQueryBroken(ConvexHttpError):
    """The page query answers, but not with pages that move on: it cannot close a gap on this backend."""


async def succeeded_pages(http: ConvexHttpClient, token: Callable[[], Awaitable[str | None]], since: float,
                          until: float | None = None) -> AsyncIterator[list[Any]]:
    """Pages of succeeded jobs with ``completedAt >= since``, oldest first, until one reaches ``until``.

    Raises :class:`~materializer.convex.http.ConvexFunctionError` when the backend has no page
    query, :class:`PageQueryBroken` for an answer that is not a page or a cursor that does not move
    on (a backend that would page forever), and :class:`~materializer.convex.http.ConvexHttpError`
    when a request fails.
    """
    cursor: str | None = None
    cursors_seen: set[str | None] = {None}
    while True:
        page = await http.query(PAGE_QUERY, {"since": since, "paginationOpts": {"numItems": PAGE_SIZE,
                                                                              "cursor": cursor}}, await token())
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
