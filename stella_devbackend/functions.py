"""The public Convex queries of the ``media_jobs`` module, with Convex-style argument validation.

Exactly the three queries the real backend has (ruuxi/stella-v2
``backend/convex/media_jobs.ts``, listed in ``packages/contracts/convex-api.ts``):
``getByJobId``, ``listSucceededSince`` and ``listFailedSince``. Anything
else is "not found" unless an extension adds it (``--extension
page-query`` adds ``listSucceededPage``, which the real backend does not
have). A function that throws becomes ``QueryFailed`` on the sync protocol
and an HTTP 200 ``status: "error"`` answer on ``/api/query``; both carry
the message built here.

Every run has a read budget, Convex's ``TRANSACTION_MAX_READ_SIZE_BYTES``
(16 MiB, ``crates/common/src/knobs.rs``): a query that reads more document
bytes fails with the message of ``crates/database/src/reads.rs``
(``TooManyBytesRead``), whatever its ``limit`` asked for. So a window of
large jobs fails on the real backend rather than arriving as one huge answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stella_devbackend.db import JobTable, PageCursorError, ReadBudget, TooManyBytesRead
from stella_devbackend.options import MAX_READ_BYTES

__all__ = ["EXTENSION_FUNCTIONS", "FunctionError", "Functions", "canonical_udf_path"]

#: ``listSucceededSince`` / ``listFailedSince``: ``Math.max(1, Math.min(args.limit ?? 50, 200))``.
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
#: The statuses ``listFailedSince`` returns (the reference contract: failed *and* unknown jobs).
FAILED_STATUSES = ("failed", "unknown")


#: ``OVER_LIMIT_HELP`` (``crates/database/src/reads.rs``), the end of every read-limit message.
OVER_LIMIT_HELP = ("Consider using smaller limits in your queries, paginating your queries, or using indexed queries "
                   "with a selective index range expressions.")


class FunctionError(Exception):
    """The function threw; the message is what Convex clients see."""


Query = Callable[[JobTable, str | None, dict[str, Any], ReadBudget], Any]


# -- validators (crates/common/src/schemas/validator.rs ValidationError, crates/udf/src/validation.rs) ------


@dataclass(frozen=True)
class _V:
    name: str
    check: Callable[[Any], bool]
    optional: bool = False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


NUMBER = _V("v.number()", _is_number)
BOOLEAN = _V("v.boolean()", lambda value: isinstance(value, bool))
STRING = _V("v.string()", lambda value: isinstance(value, str))
STRING_OR_NULL = _V("v.union(v.string(), v.null())", lambda value: value is None or isinstance(value, str))

Fields = Mapping[str, "_V | Fields"]


def _optional(validator: _V) -> _V:
    return _V(f"v.optional({validator.name})", validator.check, optional=True)


def _show(value: Any) -> str:
    """A value roughly as Convex prints it in validation errors: ``{since: "x"}``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_show(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return json.dumps(value) if isinstance(value, (str, bool)) or value is None else str(value)


def _show_validator(fields: Fields) -> str:
    shown = (f"{key}: {_show_validator(v) if not isinstance(v, _V) else v.name}" for key, v in fields.items())
    return "v.object({" + ", ".join(shown) + "})"


def _invalid(problem: str, path: str, shown: str, validator: str) -> FunctionError:
    context = f"Path: {path}" if path else ""
    return FunctionError(f"ArgumentValidationError: {problem}\n{context}\n{shown}\nValidator: {validator}")


def _validate(args: dict[str, Any], fields: Fields, path: str = "") -> None:
    """Convex object validators refuse extra fields, missing required fields and wrong types."""
    for key in args:
        if key not in fields:
            raise _invalid(f"Object contains extra field `{key}` that is not in the validator.", path,
                           f"Object: {_show(args)}", _show_validator(fields))
    for key, validator in fields.items():
        where = f"{path}.{key}"
        if key not in args:
            if isinstance(validator, _V) and validator.optional:
                continue
            raise _invalid(f"Object is missing the required field `{key}`. Consider wrapping the field validator "
                           "in `v.optional(...)` if this is expected.", path, f"Object: {_show(args)}",
                           _show_validator(fields))
        value = args[key]
        if not isinstance(validator, _V):
            if not isinstance(value, dict):
                raise _invalid("Value does not match validator.", where, f"Value: {_show(value)}",
                               _show_validator(validator))
            _validate(value, validator, where)
        elif not validator.check(value):
            raise _invalid("Value does not match validator.", where, f"Value: {_show(value)}", validator.name)


# -- the queries ------------------------------------------------------------------------------------------


def _take_count(limit: Any) -> int:
    """``Math.max(1, Math.min(limit ?? 50, 200))`` handed to ``.take()``, which wants a non-negative integer.

    ``take`` (get-convex/convex-js ``src/server/impl/query_impl.ts``) throws
    for NaN or a fraction rather than rounding.
    """
    if limit is None:
        return DEFAULT_LIMIT
    count = float(limit)
    if not math.isnan(count):  # NaN stays NaN through Math.min/Math.max
        count = max(1.0, min(count, float(MAX_LIMIT)))
    if not count.is_integer():
        raise FunctionError("Uncaught TypeError: Arg 1 `n` to `take` must be a non-negative integer")
    return int(count)


def _response(doc: dict[str, Any], include_logs: bool) -> dict[str, Any]:
    """``toStoredMediaJobResponse``: ``logs`` only when asked for and non-empty."""
    if "logs" not in doc or (include_logs and doc["logs"]):
        return doc
    return {key: value for key, value in doc.items() if key != "logs"}


LIST_ARGS: Fields = {"since": NUMBER, "limit": _optional(NUMBER), "includeLogs": _optional(BOOLEAN)}


def _list_since(statuses: tuple[str, ...]) -> Query:
    """``listSucceededSince`` / ``listFailedSince``: newest first by ``completedAt``, at most the limit."""

    def query(table: JobTable, owner: str | None, args: dict[str, Any], budget: ReadBudget) -> Any:
        _validate(args, LIST_ARGS)
        if owner is None:
            return []
        docs = table.newest_since(owner, statuses, float(args["since"]), _take_count(args.get("limit")), budget)
        return [_response(doc, args.get("includeLogs") is True) for doc in docs]

    return query


def _get_by_job_id(table: JobTable, owner: str | None, args: dict[str, Any], budget: ReadBudget) -> Any:
    """``getByJobId``: the viewer's job or null; its logs always come along (it has no ``includeLogs``)."""
    _validate(args, {"jobId": STRING})
    doc = table.get(owner, args["jobId"], budget)
    return None if doc is None else _response(doc, True)


def _list_succeeded_page(table: JobTable, owner: str | None, args: dict[str, Any], budget: ReadBudget) -> Any:
    """The ``page-query`` extension: a gap-free page of succeeded jobs, oldest first (not on the real backend)."""
    _validate(
        args,
        {
            "since": _optional(NUMBER),
            "includeLogs": _optional(BOOLEAN),
            "paginationOpts": {
                "numItems": NUMBER,
                "cursor": STRING_OR_NULL,
                "id": _optional(NUMBER),
                "endCursor": _optional(STRING_OR_NULL),
                "maximumRowsRead": _optional(NUMBER),
                "maximumBytesRead": _optional(NUMBER),
            },
        },
    )
    opts = args["paginationOpts"]
    num_items = _take_count(opts["numItems"])
    since = float(args.get("since", 0.0))
    if owner is None:
        return {"page": [], "isDone": True, "continueCursor": opts["cursor"] or ""}
    try:
        page, is_done, cursor = table.page_succeeded(owner, since, num_items, opts["cursor"], budget)
    except PageCursorError as exc:
        raise FunctionError(f"Uncaught Error: {exc}") from None
    include_logs = args.get("includeLogs") is True
    return {"page": [_response(doc, include_logs) for doc in page], "isDone": is_done, "continueCursor": cursor}


QUERIES: dict[str, Query] = {
    "media_jobs:getByJobId": _get_by_job_id,
    "media_jobs:listSucceededSince": _list_since(("succeeded",)),
    "media_jobs:listFailedSince": _list_since(FAILED_STATUSES),
}

#: Switchable additions (``--extension NAME``): functions the real backend does not have.
EXTENSION_FUNCTIONS: dict[str, dict[str, Query]] = {
    "page-query": {"media_jobs:listSucceededPage": _list_succeeded_page},
}


def canonical_udf_path(udf_path: str) -> str:
    """The path as Convex names it back (``UdfPath`` canonicalized then ``strip()``ped).

    ``media_jobs.js:f`` and ``media_jobs:f`` are one function; a module
    alone names its ``default`` export, which is then left unnamed.
    """
    module, sep, function = udf_path.rpartition(":")
    if not sep:
        module, function = udf_path, "default"
    if module.endswith(".js"):
        module = module[: -len(".js")]
    return module if function == "default" else f"{module}:{function}"


class Functions:
    """The deployment's public queries: the real ones plus any extensions switched on."""

    def __init__(self, extensions: Iterable[str] = (), *, max_read_bytes: int = MAX_READ_BYTES) -> None:
        self.max_read_bytes = max_read_bytes
        self._queries = dict(QUERIES)
        for name in extensions:  # extensions that add no function (e.g. bearer-session) add nothing here
            self._queries.update(EXTENSION_FUNCTIONS.get(name, {}))

    def run(self, table: JobTable, owner: str | None, udf_path: str, args: Any) -> Any:
        """Run a public query as ``owner`` (None when unauthenticated); raises :class:`FunctionError`."""
        path = canonical_udf_path(udf_path)
        function = self._queries.get(path)
        if function is None:
            # crates/udf/src/validation.rs missing_or_internal_error (UDF_404_ON_BAD_PATH is off by default).
            raise FunctionError(f"Could not find public function for '{path}'.")
        if not isinstance(args, dict):
            raise FunctionError("ArgumentValidationError: arguments must be an object")
        try:
            return function(table, owner, args, ReadBudget(self.max_read_bytes))
        except TooManyBytesRead as exc:
            raise FunctionError(f"Too many bytes read in a single function execution (limit: {exc.limit} bytes). "
                                f"{OVER_LIMIT_HELP}") from None
