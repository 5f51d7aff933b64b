"""Figures that may be undefined. A NaN or infinity (a step that computed nothing, a broken reward)
becomes None, which metrics JSON writes as null (JSON has no NaN), and means are taken over the
defined figures only."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional


def finite(value: Any) -> Optional[float]:
    """`value` as a float when it is a finite number (or a string of one), else None (None, NaN, inf, "")."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def finite_mean(values: Iterable[Any]) -> Optional[float]:
    """The mean of the values that are finite numbers (`finite`); None when there is none."""
    kept = [v for v in map(finite, values) if v is not None]
    return sum(kept) / len(kept) if kept else None
