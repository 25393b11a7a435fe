"""The one test for a usable number in a document from the backend: finite, and not a bool.

Convex carries infinities and NaN, which no time, cursor or duration can take, and
Python counts ``True`` as the integer 1, which JSON does not.
"""

from __future__ import annotations

import math
from typing import TypeGuard

__all__ = ["finite_number", "is_finite_number"]


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a finite JSON number (an int or float, not a bool, not NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_number(value: object) -> float | None:
    """``value`` as a float if it :func:`is_finite_number`, else None."""
    return float(value) if is_finite_number(value) else None
