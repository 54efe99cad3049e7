"""Hyperparameters that may be a constant or a function of the step.

``damping``, ``factor_decay``, ``factor_update_steps``, ``inv_update_steps`` and ``lr``
accept either a number or a callable ``step -> number`` (a schedule). Each value is
checked against its valid range whenever it is read, so a schedule that wanders out of
range fails loudly at the step where it does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Schedule = float | int | Callable[[int], float]


@dataclass(frozen=True)
class Range:
    """A closed/open numeric interval with a readable description."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True
    integer: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value) and value != self.high:
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below and (not self.integer or float(value).is_integer())

    def describe(self) -> str:
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        kind = "an integer in " if self.integer else ""
        return f"{kind}{left}{self.low:g}, {self.high:g}{right}"


NON_NEGATIVE = Range(0.0)
POSITIVE = Range(0.0, low_open=True)
DECAY = Range(0.0, 1.0)
INTERVAL = Range(1.0, integer=True)


def check_value(name: str, value: float, valid: Range) -> float:
    """Return ``value`` if it lies in ``valid``.

    Raises:
        ValueError: Naming the value and the valid range.

    >>> check_value("damping", 1e-3, NON_NEGATIVE)
    0.001
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number in {valid.describe()}")
    if not valid.contains(float(value)):
        raise ValueError(f"{name}={value!r} is out of range; valid: {valid.describe()}")
    return value


def check_schedule(name: str, value: Schedule, valid: Range) -> Schedule:
    """Validate a constant now; a callable is validated each time it is read."""
    if callable(value):
        return value
    return check_value(name, value, valid)


def resolve(name: str, value: Schedule, step: int, valid: Range) -> float:
    """Read a schedule at ``step`` and validate the result."""
    current = value(step) if callable(value) else value
    return check_value(name, current, valid)
