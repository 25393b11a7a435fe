"""The Convex query functions of the ``media_jobs`` module, with Convex-style argument validation.

A function that throws becomes ``QueryFailed`` on the sync protocol and HTTP
560 on ``/api/query``; both carry the message built here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from materializer.devbackend.db import JobTable, PageCursorError

__all__ = ["FunctionError", "normalize_udf_path", "run_query"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


class FunctionError(Exception):
    """The function threw; the message is what Convex clients see."""


# -- validators -----------------------------------------------------------------


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


def _optional(validator: _V) -> _V:
    return _V(f"v.optional({validator.name})", validator.check, optional=True)


def _validate(args: dict[str, Any], fields: dict[str, _V | dict[str, _V]], path: str = "") -> None:
    for key in args:
        if key not in fields:
            raise FunctionError(
                f"ArgumentValidationError: Object contains extra field `{key}` that is not in the validator.\n"
                f"Object path: {path or '(root)'}"
            )
    for key, validator in fields.items():
        where = f"{path}.{key}"
        if key not in args:
            if isinstance(validator, _V) and validator.optional:
                continue
            raise FunctionError(
                f"ArgumentValidationError: Object is missing the required field `{key}`. Consider wrapping "
                f"the field validator in `v.optional(...)` if this is expected.\nObject path: {path or '(root)'}"
            )
        value = args[key]
        if isinstance(validator, dict):
            if not isinstance(value, dict):
                raise FunctionError(f"ArgumentValidationError: Value does not match validator.\nPath: {where}\nValidator: v.object({{...}})")
            _validate(value, validator, where)
        elif not validator.check(value):
            raise FunctionError(
                f"ArgumentValidationError: Value does not match validator.\nPath: {where}\n"
                f"Value: {value!r}\nValidator: {validator.name}"
            )


# -- functions ---------------------------------------------------------------------


def _clamp_limit(limit: Any) -> int:
    if limit is None or not math.isfinite(limit):
        return DEFAULT_LIMIT
    return max(1, min(MAX_LIMIT, int(limit)))


def _public(doc: dict[str, Any], include_logs: bool) -> dict[str, Any]:
    if include_logs or "logs" not in doc:
        return doc
    return {key: value for key, value in doc.items() if key != "logs"}


def _list_since(status: str) -> Callable[[JobTable, str | None, dict[str, Any]], Any]:
    def query(table: JobTable, owner: str | None, args: dict[str, Any]) -> Any:
        _validate(args, {"since": NUMBER, "limit": _optional(NUMBER), "includeLogs": _optional(BOOLEAN)})
        if owner is None:
            return []
        docs = table.newest_since(owner, status, float(args["since"]), _clamp_limit(args.get("limit")))
        return [_public(doc, bool(args.get("includeLogs"))) for doc in docs]

    return query


def _get_by_job_id(table: JobTable, owner: str | None, args: dict[str, Any]) -> Any:
    _validate(args, {"jobId": STRING, "includeLogs": _optional(BOOLEAN)})
    doc = table.get(owner, args["jobId"])
    return None if doc is None else _public(doc, bool(args.get("includeLogs")))


def _list_succeeded_page(table: JobTable, owner: str | None, args: dict[str, Any]) -> Any:
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
    num_items = _clamp_limit(opts["numItems"])
    since = float(args.get("since", 0.0))
    if owner is None:
        return {"page": [], "isDone": True, "continueCursor": opts["cursor"] or ""}
    try:
        page, is_done, cursor = table.page_succeeded(owner, since, num_items, opts["cursor"])
    except PageCursorError as exc:
        raise FunctionError(f"Uncaught Error: {exc}") from None
    include_logs = bool(args.get("includeLogs"))
    return {"page": [_public(doc, include_logs) for doc in page], "isDone": is_done, "continueCursor": cursor}


_FUNCTIONS: dict[str, Callable[[JobTable, str | None, dict[str, Any]], Any]] = {
    "media_jobs:listSucceededSince": _list_since("succeeded"),
    "media_jobs:listFailedSince": _list_since("failed"),
    "media_jobs:getByJobId": _get_by_job_id,
    "media_jobs:listSucceededPage": _list_succeeded_page,
}


def normalize_udf_path(udf_path: str) -> str:
    """``media_jobs.js:f`` and ``media_jobs:f`` name the same function, as in Convex."""
    module, sep, function = udf_path.partition(":")
    if module.endswith(".js"):
        module = module[: -len(".js")]
    return f"{module}{sep}{function or 'default'}" if sep else f"{module}:default"


def run_query(table: JobTable, owner: str | None, udf_path: str, args: Any) -> Any:
    """Run a public query as ``owner`` (None when unauthenticated); raises :class:`FunctionError`."""
    function = _FUNCTIONS.get(normalize_udf_path(udf_path))
    if function is None:
        raise FunctionError(
            f"Could not find public function for '{udf_path}'. Did you forget to run "
            "`npx convex dev` or `npx convex deploy`?"
        )
    if not isinstance(args, dict):
        raise FunctionError("ArgumentValidationError: arguments must be an object")
    return function(table, owner, args)
