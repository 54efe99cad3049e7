"""What a thermodynamic solver was given to settle: the spectrum of each device matrix.

At every prepare a thermodynamic solver scales the damped factor into the device's
range and reports the extreme eigenvalues of the matrix it programs: α_min (the one its
burn-in, averaging window and timing use — the exact spectrum's or the damping bound,
as ``alpha_min_source`` says) and α_max. Their ratio κ = α_max/α_min is the condition
number the device sees (the κ² of the paper's Table 1 is its square); it is kept per
prepare, layer and factor so that its course over training, and how damping sets it,
can be read and plotted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .blocks import KroneckerBlock



class SpectrumLog:
    """The spectra reported by the prepares of a run, newest last.

    Attributes:
        history: Rows ``{"step", "layer", "factor" ("a"/"g"), "alpha_min", "alpha_max",
            "kappa", "true_alpha_min", "scale"}`` (at most ``maxlen``).
    """

    def __init__(self, maxlen: int) -> None:
        self.history: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._seen: dict[str, dict] = {}

    def record(self, step: int, blocks: Mapping[str, KroneckerBlock]) -> None:
        """Append what the prepares of ``step`` reported (each prepare once)."""
        for name, block in blocks.items():
            if not block.spectra or self._seen.get(name) is block.spectra:
                continue
            self._seen[name] = block.spectra
            for which, found in block.spectra.items():
                self.history.append({"step": step, "layer": name, "factor": which, **found,
                                     "kappa": found["alpha_max"] / found["alpha_min"]})
