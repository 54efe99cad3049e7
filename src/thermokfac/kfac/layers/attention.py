"""``nn.MultiheadAttention``: four Kronecker blocks, one per projection.

The query, key, value and output projections are each a Linear layer shared over the
sequence (the weight-sharing setting of Eqs. 18–21), with their own input and output:
Q = x_q W_qᵀ + b_q over the L target positions, K and V over the S source positions,
and the output projection over the L positions of the mixed heads. Each gets its own
Kronecker factors A and G and its own preconditioned block of the gradient; with a
packed ``in_proj_weight`` ``[3E, E]`` the three blocks are its row blocks (and those of
``in_proj_bias``), with ``kdim``/``vdim`` they are ``q/k/v_proj_weight``. The result
equals that of an attention block written with four ``nn.Linear`` modules holding the
same weights (``tests/test_attention.py``). ``bias_k``/``bias_v`` (``add_bias_kv``) are
not weights of a projection: they are left to the base optimizer and listed.

Under K-FAC-reduce (Eqs. 20–21) the key projection's G is zero up to round-off: softmax
is shift-invariant, so the gradients of one query's scores, and hence the key gradients,
sum to zero over the key positions. Its block is then preconditioned by the damping
alone; K-FAC-expand has no such degeneracy and is the better choice for attention.

The projections are reached by :mod:`.attention_forward`: while a preconditioner watches
the module its class is :class:`TappedMultiheadAttention`, whose training forward is
bitwise PyTorch's with the projections in view.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import ClassVar, cast

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from .attention_forward import BLOCKS, AttentionTap, tapped_forward
from .base import LayerHelper

#: The tap of each module K-FAC watches (weak: a collected module drops its tap).
_TAPS: weakref.WeakKeyDictionary[nn.Module, AttentionTap] = weakref.WeakKeyDictionary()


class TappedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose training forward lets K-FAC see its projections.

    A watched module's class is switched to this one (and back when the preconditioner
    is removed): same parameters, buffers, ``state_dict`` and results; the model still
    pickles. A copy of the module (``copy.deepcopy``) has no tap and runs PyTorch's
    forward.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        tap = _TAPS.get(self)
        if self.training and tap is not None:
            return tapped_forward(self, tap, query, key, value, *args, **kwargs)
        return nn.MultiheadAttention.forward(self, query, key, value, *args, **kwargs)


_TAPPED: dict[type, type] = {nn.MultiheadAttention: TappedMultiheadAttention}


def _tapped_class(kind: type) -> type:
    """The tapped version of an attention class (a subclass that keeps the base's
    ``forward`` gets one made for it; only the built-in one pickles by name)."""
    if kind not in _TAPPED:
        _TAPPED[kind] = type(f"Tapped{kind.__name__}", (kind,),
                             {"forward": TappedMultiheadAttention.forward})
    return _TAPPED[kind]


def untapped(kind: type[nn.Module]) -> type[nn.Module]:
    """The class a tapped attention module had before K-FAC watched it (else ``kind``)."""
    return next((k for k, v in _TAPPED.items() if v is kind), kind)


class _TapHandle:
    """Removes one block's probes (and the tap, with the last of them)."""

    def __init__(self, module: nn.Module, block: str, probes: tuple) -> None:
        self.module, self.block, self.probes = weakref.ref(module), block, probes

    def remove(self) -> None:
        module = self.module()
        tap = None if module is None else _TAPS.get(module)
        if module is None or tap is None:
            return
        entries = tap.probes[self.block]
        if self.probes in entries:
            entries.remove(self.probes)
        if tap.empty():
            del _TAPS[module]
            module.__class__ = untapped(type(module))


def _tap(module: nn.Module) -> AttentionTap:
    """The module's tap, switching its class the first time."""
    tap = _TAPS.get(module)
    if tap is None:
        tap = _TAPS[module] = AttentionTap()
        if type(module) not in _TAPPED.values():
            module.__class__ = _tapped_class(type(module))
    return tap


class AttentionHelper(LayerHelper):
    """One projection block of ``nn.MultiheadAttention`` (``block`` in
    ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

    Shapes: inputs reach the helper sequence-first ``[L or S, N, d_in]`` (the module's
    internal layout for either ``batch_first``; an unbatched call is one example,
    ``N = 1``); :meth:`shared_inputs` and :meth:`shared_grad_outputs` return
    ``[N, L or S, d]``.
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.MultiheadAttention,)
    module: nn.MultiheadAttention

    def __init__(self, module: nn.MultiheadAttention, block: str = "q_proj") -> None:
        super().__init__(module)
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        self.block = block
        self.index = BLOCKS.index(block)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if "forward" in module.__dict__:
            return "a forward set on the instance (K-FAC needs to tap its projections)"
        if parametrize.is_parametrized(module):
            return ("a parametrization (weight_norm, spectral_norm, ...) on its projections: "
                    "their gradients land on the parametrization's parameters")
        return None

    @property
    def submodule(self) -> nn.Module | None:
        return self.module.out_proj if self.block == "out_proj" else None

    @classmethod
    def blocks(cls, module: nn.Module) -> list[tuple[str, LayerHelper]]:
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"{cls.__name__} handles nn.MultiheadAttention, "
                            f"got {type(module).__name__}")
        return [(f".{block}", cls(module, block)) for block in BLOCKS]

    def attach(self, pre_hook: Callable, post_hook: Callable) -> list[RemovableHandle]:
        probes = (pre_hook, post_hook)
        _tap(self.module).probes[self.block].append(probes)
        return [_TapHandle(self.module, self.block, probes)]  # type: ignore[list-item]

    @property
    def _packed(self) -> bool:
        return self.block != "out_proj" and self.module._qkv_same_embed_dim

    @property
    def weight_param(self) -> nn.Parameter:
        m = self.module
        if self.block == "out_proj":
            return cast(nn.Parameter, m.out_proj.weight)  # a leaf: see leaf_problem
        return m.in_proj_weight if self._packed else getattr(m, f"{self.block}_weight")

    @property
    def bias_param(self) -> nn.Parameter | None:
        m = self.module
        return m.out_proj.bias if self.block == "out_proj" else m.in_proj_bias

    def _rows(self, t: Tensor) -> Tensor:
        e = self.module.embed_dim
        return t[self.index * e:(self.index + 1) * e]

    def weight_view(self, t: Tensor) -> Tensor:
        return self._rows(t) if self._packed else t

    def bias_view(self, t: Tensor) -> Tensor:
        return t if self.block == "out_proj" else self._rows(t)

    def leaf_problem(self) -> str | None:
        for param in self.parameters:
            owner = self.module.out_proj if self.block == "out_proj" else self.module
            if not any(p is param for p in owner.parameters(recurse=False)):
                return "a projection weight that is not its own parameter"
        return None

    @property
    def d_in(self) -> int:
        m = self.module
        return {"k_proj": m.kdim, "v_proj": m.vdim}.get(self.block, m.embed_dim)

    @property
    def d_out(self) -> int:
        return self.module.embed_dim

    def batch_size(self, x: Tensor) -> int | None:
        return int(x.shape[1])  # internal layout [L or S, N, d]; 1 for an unbatched call

    def shared_inputs(self, x: Tensor) -> Tensor:
        return x.transpose(0, 1)  # [L, N, d] → [N, L, d]

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        return g.transpose(0, 1)

    def weight_grad_matrix(self, grad: Tensor) -> Tensor:
        return grad

    def weight_grad_from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix
