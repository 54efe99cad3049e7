"""The ``mc`` and ``type2`` Fisher types' own backward: the preconditioner's vectors
back-propagated from the model outputs to the layer outputs the capture kept, into G."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .._invariants import required
from ..enums import LossReduction
from .capture import CurvatureCapture
from .config import KFACConfig
from .fisher import backward_vectors, check_class_dim, num_loss_terms
from .tracing import grad_or_explain


def curvature(capture: CurvatureCapture, outputs: Tensor, cfg: KFACConfig,
              generator: torch.Generator | None, window: tuple[int, int] | None = None
              ) -> None:
    """The ``mc``/``type2`` backward of one output: the vectors of the *summed* loss
    (a mean divides G by all loss terms of the step, ``capture.step_record.loss_terms``).

    Raises:
        ValueError: If ``outputs`` need a ``class_dim`` or came before in this step.
    """
    class_dim = check_class_dim(outputs, cfg.class_dim)
    if any(o is outputs for o in capture.step_record.curvature_outputs):
        raise ValueError(
            "these outputs were already given to curvature_backward in this step (by "
            "curvature_backward or step(outputs=...)): pass each output once")
    capture.step_record.curvature_outputs.append(outputs)
    capture.step_record.curvature_done = True
    if not capture.enabled:
        return
    capture.step_record.loss_terms += num_loss_terms(outputs, cfg.loss_type, class_dim)
    vectors = backward_vectors(outputs, cfg.fisher_type, cfg.loss_type, LossReduction.SUM,
                               generator, cfg.mc_samples, window=window,
                               class_dim=class_dim)
    backward_through(capture, outputs, vectors,
                     shared_ok=cfg.loss_reduction is LossReduction.SUM)

def backward_through(capture: CurvatureCapture, outputs: Tensor,
                 vectors: Iterable[tuple[Tensor, float]], shared_ok: bool = False) -> None:
    """Back-propagate each ``(v, w)`` from ``outputs`` to the kept layer outputs and
    accumulate w·Σ ggᵀ into G (the ``mc``/``type2`` Fisher types); ``.grad`` is not
    touched and the graph is kept for the user's own backward.

    Calls of earlier forwards stay available (micro-batches back-propagated after
    all their forwards). A call reached by two ``curvature_backward`` calls (two
    heads or two losses on one forward) raises: the mean-loss normalisation by all
    loss terms of the step would be wrong for it; with ``shared_ok`` (summed losses)
    their curvatures add up, which is right.

    Raises:
        ValueError: If a layer call was already reached by an earlier call and not
            ``shared_ok``.
    """
    pairs = [(r, call) for r in capture.records for call in r.outputs]
    if not pairs:
        return
    index = capture.step_record.curvature_calls
    capture.step_record.curvature_calls += 1
    for i, (v, weight) in enumerate(vectors):
        start = capture.clock()
        edges = [required(call.edge, "a captured output's gradient edge") for _, call in pairs]
        grads = grad_or_explain(outputs, edges, v)
        capture.step_record.elapsed_s += capture.clock() - start  # add_gradient times its own part
        for (record, call), grad in zip(pairs, grads):
            if grad is None:
                continue
            if call.reached_by not in (-1, index) and not shared_ok:
                raise ValueError(
                    f"curvature_backward reached layer {record.name!r} through outputs "
                    "of a forward pass it already covered (two heads or two losses on "
                    "one forward) with loss_reduction='mean', whose division by all loss terms "
                    "of the step assumes disjoint examples: use loss_reduction='sum' "
                    "(the curvatures then add; scale each loss's terms yourself)")
            call.reached_by = index
            capture.add_gradient(record, grad, math.sqrt(weight), call.groups, call,
                                 key=(index, i))
