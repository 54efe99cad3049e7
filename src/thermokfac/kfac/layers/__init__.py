"""Registry {module type → helper} for the layers K-FAC preconditions."""

from __future__ import annotations

from torch import nn

from .attention import AttentionHelper, untapped
from .base import LayerHelper
from .conv import ConvHelper, ConvTransposeHelper
from .embedding import EmbeddingHelper
from .linear import LinearHelper

LAYER_HELPERS: dict[type[nn.Module], type[LayerHelper]] = {}


def register_layer_helper(helper: type[LayerHelper]) -> type[LayerHelper]:
    """Class decorator registering ``helper`` for each of its ``module_types``."""
    for module_type in helper.module_types:
        LAYER_HELPERS[module_type] = helper
    return helper


for _helper in (LinearHelper, ConvHelper, ConvTransposeHelper, EmbeddingHelper,
                AttentionHelper):
    register_layer_helper(_helper)


def helper_for(module: nn.Module) -> type[LayerHelper] | None:
    """The helper class for ``module``: exact type first, then the nearest base class.

    A subclass inherits its base's helper (e.g. ``NonDynamicallyQuantizableLinear``);
    whether the subclass's own ``forward`` keeps the base's maths is checked by
    :func:`subclass_problem`.
    """
    for cls in type(module).__mro__:
        if cls in LAYER_HELPERS:
            return LAYER_HELPERS[cls]
    return None


def subclass_problem(module: nn.Module) -> str | None:
    """Why a subclass of a registered module kind cannot use its base's helper: it
    defines its own ``forward`` (e.g. a LoRA adapter adds a low-rank path), so the
    layer's output is no longer W̄ā and the captured factors would not be its curvature.
    None for registered types and for subclasses that keep the base's ``forward``."""
    kind = untapped(type(module))
    if kind in LAYER_HELPERS:
        return None
    base = next(cls for cls in kind.__mro__ if cls in LAYER_HELPERS)
    if kind.forward is not base.forward:
        return (f"subclass of {base.__name__} with its own forward (register a helper "
                "for it with register_layer_helper if its maths is the base's)")
    return None


__all__ = ["LAYER_HELPERS", "AttentionHelper", "ConvHelper", "ConvTransposeHelper",
           "EmbeddingHelper", "LayerHelper", "LinearHelper", "helper_for",
           "register_layer_helper", "subclass_problem", "untapped"]
