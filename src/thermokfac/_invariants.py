"""Values an invariant of the caller guarantees, checked where the type allows None."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def required(value: T | None, what: str) -> T:
    """``value``, which the caller's invariant says is set.

    Args:
        value: The value to check.
        what: What it is, for the message.

    Raises:
        RuntimeError: ``value`` is None: a broken invariant of thermokfac, named, instead
            of an ``AttributeError`` further on.
    """
    if value is None:
        raise RuntimeError(f"internal error: {what} is missing where it must be set; "
                           "please report it")
    return value
