"""Backward vectors for the ``mc`` and ``type2`` Fisher types.

Both replace the user's loss gradient by vectors whose outer products average to the
Hessian H of the loss w.r.t. the model outputs (per prediction, for the *summed* loss):

* ``type2``: the C columns of a square root S (SSᵀ = H) — exact, C backward passes.
  Cross-entropy: H = diag(p) − ppᵀ, S[:, c] = √p_c (e_c − p). MSE (Σ (f − y)²): H = 2I,
  S = √2·I. Binary cross-entropy on logits (``BCEWithLogitsLoss``, each output its own
  Bernoulli with p = σ(f)): H = diag(p(1 − p)), S = diag(√(p(1 − p))).
* ``mc``: ∇ of the loss at labels sampled from the model, E[vvᵀ] = H. Cross-entropy:
  y ~ Categorical(p), v = p − e_y. MSE: y ~ N(f, ½I), v = 2(f − y). BCE: y ~ Bernoulli(p)
  per output, v = p − y.

Each vector comes with a weight w; the preconditioner accumulates w·Σ ggᵀ of the layer
output gradients obtained by back-propagating it. The classes lie along ``class_dim``
(the last dimension by default; ``nn.CrossEntropyLoss`` takes ``[N, C, T]``, i.e.
``class_dim=1``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..enums import FisherType, LossReduction, LossType


def num_loss_terms(outputs: Tensor, loss_type: LossType, class_dim: int = -1) -> int:
    """How many terms a ``reduction='mean'`` loss averages over for these outputs.

    Cross-entropy averages over predictions (every dimension but ``class_dim``); MSE and
    BCE average over every element.
    """
    if loss_type is LossType.CROSS_ENTROPY:
        return outputs.numel() // max(outputs.shape[class_dim], 1)
    return outputs.numel()


def check_class_dim(outputs: Tensor, class_dim: int | None) -> int:
    """The class dimension of ``outputs``, required when they have more than 2 dims.

    Raises:
        ValueError: If ``outputs`` have more than 2 dimensions and ``class_dim`` is None,
            or ``class_dim`` is outside ``[-ndim, ndim)``.
    """
    if class_dim is None:
        if outputs.ndim > 2:
            raise ValueError(
                f"outputs of shape {tuple(outputs.shape)} have more than 2 dimensions: say "
                "where the classes are with class_dim= (class_dim=1 for [N, C, T], the "
                "layout nn.CrossEntropyLoss takes; class_dim=-1 for [N, T, C], what GPT-style "
                "models return)")
        return -1
    if not -outputs.ndim <= class_dim < max(outputs.ndim, 1):
        raise ValueError(f"class_dim={class_dim} is out of range for outputs of shape "
                         f"{tuple(outputs.shape)} (valid: {-outputs.ndim} to "
                         f"{outputs.ndim - 1})")
    return class_dim


def backward_vectors(outputs: Tensor, fisher_type: FisherType, loss_type: LossType,
                     reduction: LossReduction, generator: torch.Generator | None,
                     mc_samples: int = 1, window: tuple[int, int] | None = None,
                     class_dim: int = -1) -> Iterator[tuple[Tensor, float]]:
    """Yield ``(v, w)``: a vector shaped like ``outputs`` to back-propagate and its weight.

    Args:
        outputs: Model outputs with the classes along ``class_dim`` (logits for
            cross-entropy and BCE).
        fisher_type: ``mc`` or ``type2``.
        loss_type: The likelihood behind the loss.
        reduction: ``mean`` divides the weight by :func:`num_loss_terms`.
        generator: Random source of the ``mc`` labels.
        mc_samples: Number of sampled labels per prediction (``mc``).
        window: ``(offset, total)``: these outputs are rows ``offset…`` of a global batch
            of ``total`` rows split over processes. The ``mc`` draws are made for the
            whole global batch and sliced, so each label depends on its global index
            only (a split run samples what one process on the whole batch samples).
        class_dim: The dimension of the classes (outputs of a prediction).
    """
    scale = (1.0 / num_loss_terms(outputs, loss_type, class_dim)
             if reduction is LossReduction.MEAN else 1.0)
    last = class_dim in (-1, outputs.ndim - 1)
    f = outputs.detach() if last else outputs.detach().movedim(class_dim, -1)

    def back(v: Tensor) -> Tensor:
        return v if last else v.movedim(-1, class_dim)

    if fisher_type is FisherType.TYPE2:
        yield from ((back(v), scale) for v in _hessian_sqrt_columns(f, loss_type))
    elif fisher_type is FisherType.MC:
        for _ in range(mc_samples):
            yield back(_sampled_gradient(f, loss_type, generator, window)), scale / mc_samples
    else:
        raise ValueError(f"fisher_type={fisher_type.value!r} uses the user's own backward")


def _hessian_sqrt_columns(f: Tensor, loss_type: LossType) -> Iterator[Tensor]:
    num_classes = f.shape[-1]
    if loss_type is LossType.CROSS_ENTROPY:
        p = _probabilities(f).to(f.dtype)
        for c in range(num_classes):
            column = -p * p[..., c : c + 1].sqrt()
            column[..., c] += p[..., c].sqrt()
            yield column
    elif loss_type is LossType.BCE:
        root = _bernoulli_variance(f).sqrt().to(f.dtype)
        for c in range(num_classes):
            column = torch.zeros_like(f)
            column[..., c] = root[..., c]
            yield column
    else:
        for c in range(num_classes):
            column = torch.zeros_like(f)
            column[..., c] = 2.0**0.5
            yield column


def _sampled_gradient(f: Tensor, loss_type: LossType, generator: torch.Generator | None,
                      window: tuple[int, int] | None = None) -> Tensor:
    """∇ of the loss at a label sampled from the model: by inverse transform of uniform
    draws, one per row of the (global) batch, so a row's label depends on its index."""
    rows = f.numel() // f.shape[-1]
    offset, total = window if window is not None else (0, rows)
    if loss_type is LossType.CROSS_ENTROPY:
        p = _probabilities(f)
        flat = p.reshape(-1, p.shape[-1])
        u = torch.rand(total, generator=generator, dtype=flat.dtype, device=f.device)
        u = u[offset:offset + rows, None] * flat.sum(-1, keepdim=True)
        labels = (flat.cumsum(-1) <= u).sum(-1).clamp_max(flat.shape[-1] - 1)
        v = flat.clone()
        v[torch.arange(flat.shape[0], device=f.device), labels] -= 1.0
        return v.reshape(f.shape).to(f.dtype)
    if loss_type is LossType.BCE:
        p = torch.sigmoid(f.to(torch.float64 if f.dtype == torch.float64 else torch.float32))
        flat = p.reshape(-1, p.shape[-1])
        u = torch.rand((total, flat.shape[-1]), generator=generator, dtype=flat.dtype,
                       device=f.device)[offset:offset + rows]
        return (flat - (u < flat).to(flat.dtype)).reshape(f.shape).to(f.dtype)
    noise = torch.randn((total, f.shape[-1]), generator=generator, dtype=f.dtype,
                        device=f.device)[offset:offset + rows]
    return -2.0 * (0.5**0.5) * noise.reshape(f.shape)


def _bernoulli_variance(logits: Tensor) -> Tensor:
    """p(1 − p) with p = σ(f), in at least float32."""
    p = torch.sigmoid(logits.to(logits.dtype if logits.dtype == torch.float64
                                else torch.float32))
    return p * (1.0 - p)


def _probabilities(logits: Tensor) -> Tensor:
    """Softmax in at least float32 (half-precision logits are upcast)."""
    dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits.to(dtype), dim=-1)
