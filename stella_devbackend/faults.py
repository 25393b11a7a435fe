"""Fault injection for the local backend. Off by default; set through ``POST /_dev/faults``.

A fault configuration is a list of rules. Each rule names a ``kind``, and
may limit itself to paths containing ``match``, to ``times`` applications,
and to a ``probability`` (drawn from a seeded generator, so chaos runs
replay). The kinds, and their parameters:

HTTP responses (``match`` defaults to ``/files/``):
  ``http_error``    ``status`` (e.g. 500, 503, 429), ``retry_after`` (seconds or an HTTP date)
  ``truncate``      ``fraction`` of the body sent before the connection is cut (default 0.5)
  ``stall``         ``fraction`` sent, then the body stops without closing (default 0.5)
  ``content_type``  ``value`` served instead of the real type
  ``corrupt``       flips bytes in the middle of the body, keeping its length
  ``oversize``      ``bytes`` of junk appended to the body (Content-Length grows to match)
  ``huge_length``   declares ``length`` in Content-Length, sends the real body, then closes
  ``redirect``      ``location`` to answer 302 with (any URL, including private or non-http)
  ``html``          an HTML page served as the image's type
  ``empty``         a 200 with an empty body

Sync protocol:
  ``delay_transitions``     ``ms`` to hold each transition before sending it
  ``withhold_transitions``  transitions are not sent while the rule is active
  ``refuse_sync``           new sockets are closed at once with ``reason`` (e.g. an overload name)

Jobs:
  ``fail_jobs``     new jobs end with ``status`` ``failed`` (the default; with ``message`` and ``code``
                    as its error) or ``unknown`` (no error)

Besides the rules, ``output_mode`` is a fault of its own. ``url`` (the
default) stores image outputs as the real backend does: URLs, through its
sanitizer (``sanitizeJsonValue`` in ruuxi/stella-v2
``backend/convex/media_jobs.ts``, which turns any ``data:...;base64,``
string into ``[data-uri omitted]``). ``data_uri`` delivers every image as a
``data:`` URI and bypasses the sanitizer, for clients that must cope with
the rare job that carries one. ``--data-uri-outputs`` starts the backend
with it. ``POST /_dev/drop-connections`` drops every sync socket at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FaultRule", "Faults", "HTTP_KINDS", "KINDS"]

HTTP_KINDS = {"http_error", "truncate", "stall", "content_type", "corrupt", "oversize", "huge_length", "redirect",
              "html", "empty"}
SYNC_KINDS = {"delay_transitions", "withhold_transitions", "refuse_sync"}
JOB_KINDS = {"fail_jobs"}
KINDS = HTTP_KINDS | SYNC_KINDS | JOB_KINDS


@dataclass
class FaultRule:
    kind: str
    match: str | None = None
    times: int | None = None
    probability: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: Any) -> FaultRule:
        if not isinstance(spec, dict):
            raise ValueError("a fault rule must be an object")
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(sorted(KINDS))}")
        match = spec.pop("match", "/files/" if kind in HTTP_KINDS else None)
        times = spec.pop("times", None)
        probability = spec.pop("probability", 1.0)
        if times is not None and (not isinstance(times, int) or times < 0):
            raise ValueError("times must be a non-negative integer")
        if not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
            raise ValueError("probability must be between 0 and 1")
        if match is not None and not isinstance(match, str):
            raise ValueError("match must be a string")
        if kind == "fail_jobs" and spec.get("status", "failed") not in ("failed", "unknown"):
            raise ValueError("fail_jobs status must be 'failed' or 'unknown'")
        return cls(kind=kind, match=match, times=times, probability=float(probability), params=spec)


class Faults:
    """The active fault rules; consulted by every handler."""

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []
        self.output_mode = "url"
        self._random = random.Random(0)

    def configure(self, spec: Any) -> None:
        """Replace the configuration; raises ValueError (and changes nothing) if it is invalid."""
        if not isinstance(spec, dict):
            raise ValueError("fault configuration must be an object")
        unknown = set(spec) - {"rules", "seed", "output_mode"}
        if unknown:
            raise ValueError(f"unknown fault configuration keys: {sorted(unknown)}")
        rules = [FaultRule.parse(rule) for rule in spec.get("rules", [])]
        output_mode = spec.get("output_mode", "url")
        if output_mode not in ("url", "data_uri"):
            raise ValueError("output_mode must be 'url' or 'data_uri'")
        self.rules, self.output_mode = rules, output_mode
        self._random = random.Random(spec.get("seed", 0))

    def describe(self) -> dict[str, Any]:
        return {
            "output_mode": self.output_mode,
            "rules": [
                {"kind": r.kind, "match": r.match, "times": r.times, "probability": r.probability, **r.params}
                for r in self.rules
            ],
        }

    def take(self, kinds: set[str], path: str = "") -> FaultRule | None:
        """The first rule of one of ``kinds`` that applies now, counting one application."""
        for rule in self.rules:
            if rule.kind not in kinds or rule.times == 0:
                continue
            if rule.match is not None and rule.match not in path:
                continue
            if rule.probability < 1.0 and self._random.random() >= rule.probability:
                continue
            if rule.times is not None:
                rule.times -= 1
            return rule
        return None

    def active(self, kind: str) -> FaultRule | None:
        """A standing rule of ``kind`` (not counted), e.g. withheld transitions."""
        return next((r for r in self.rules if r.kind == kind and r.times != 0), None)
