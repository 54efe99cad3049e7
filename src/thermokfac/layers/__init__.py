"""Registry {module type → helper} for the layers K-FAC preconditions."""

from __future__ import annotations

from torch import nn

from .base import LayerHelper
from .conv import Conv2dHelper
from .embedding import EmbeddingHelper
from .linear import LinearHelper

LAYER_HELPERS: dict[type[nn.Module], type[LayerHelper]] = {}


def register_layer_helper(helper: type[LayerHelper]) -> type[LayerHelper]:
    """Class decorator registering ``helper`` for each of its ``module_types``."""
    for module_type in helper.module_types:
        LAYER_HELPERS[module_type] = helper
    return helper


for _helper in (LinearHelper, Conv2dHelper, EmbeddingHelper):
    register_layer_helper(_helper)


def helper_for(module: nn.Module) -> type[LayerHelper] | None:
    """The helper class for ``module``: exact type first, then the nearest base class."""
    for cls in type(module).__mro__:
        if cls in LAYER_HELPERS:
            return LAYER_HELPERS[cls]
    return None


__all__ = ["LAYER_HELPERS", "Conv2dHelper", "EmbeddingHelper", "LayerHelper", "LinearHelper",
           "helper_for", "register_layer_helper"]
