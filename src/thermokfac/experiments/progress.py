"""Progress of long work: a tqdm bar on a terminal, one plain line per event otherwise.

A bar redrawn into a log file (CI, ``nohup``, a pipe) is unreadable; when stderr is not a
terminal, :class:`Progress` prints one line per evaluation instead, naming what runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def interactive() -> bool:
    """Whether stderr is a terminal (bars), or a file or pipe (lines)."""
    return sys.stderr.isatty()


class Progress:
    """Progress of one run of ``total`` steps named ``label`` (``enabled=False``: silent).

    Example:
        >>> report = Progress("adam lr 0.001 seed 0", total=3, start=0, enabled=False)
        >>> [s for s in report.steps()]
        [0, 1, 2]
    """

    def __init__(self, label: str, total: int, start: int = 0, enabled: bool = True) -> None:
        self.label, self.total, self.start = label, total, start
        self.lines = enabled and not interactive()
        self.bar = tqdm(total=total, initial=start, desc=label, leave=False,
                        disable=not enabled or self.lines)

    def steps(self) -> Iterator[int]:
        """The step indices from ``start`` to ``total``, advancing the bar."""
        for step in range(self.start, self.total):
            yield step
            self.bar.update(1)

    def evaluated(self, step: int, loss: float, metrics: dict[str, Any]) -> None:
        """Report an evaluation at ``step`` (training ``loss``; validation ``metrics``)."""
        values = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if k.startswith("val_") and isinstance(v, (int, float)))
        if self.lines:
            print(f"{self.label}: step {step}/{self.total} loss {loss:.4g} {values}",
                  file=sys.stderr, flush=True)
        else:
            self.bar.set_postfix_str(f"loss {loss:.3f} {values}")

    def close(self) -> None:
        self.bar.close()


def each(items: Iterable[T], label: str, enabled: bool = True,
         describe=None) -> Iterator[T]:
    """Iterate ``items`` under a bar named ``label``; ``describe(item)`` names the item
    running (the bar's text, or one line per item when stderr is not a terminal)."""
    items = list(items)
    lines = enabled and not interactive()
    bar = tqdm(items, desc=label, disable=not enabled or lines)
    for i, item in enumerate(bar):
        text = describe(item) if describe else ""
        if lines:
            print(f"{label} {i + 1}/{len(items)}: {text}", file=sys.stderr, flush=True)
        elif text:
            bar.set_description(f"{label}: {text}")
        yield item
    bar.close()
