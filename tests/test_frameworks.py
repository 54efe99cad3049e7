"""``KFACOptimizer`` inside training frameworks: each applied update equals a plain loop
with ``KFACPreconditioner`` on the same data, in the framework's own order of
accumulation, clipping and stepping; a framework resume equals the uninterrupted run.

Needs the ``frameworks`` extra (Accelerate); skipped where it is absent.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACOptimizer, KFACPreconditioner

BATCHES = [(torch.randn(16, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64),
            torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(90 + i)))
           for i in range(4)]
OPTIONS = {"damping": 1e-2, "inv_update_steps": 2, "kl_clip": 1e-3}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _plain(batches, clip: float | None = None):
    """The reference: backward, (clip), precondition, step."""
    model = _net()
    opt = _sgd(model.parameters())
    pre = KFACPreconditioner(model, optimizer=opt, **OPTIONS)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        pre.step()
        opt.step()
    return model


def _close(a: nn.Module, b: nn.Module, tol: float = 1e-12) -> bool:
    return all(torch.allclose(p, q, rtol=tol, atol=tol)
               for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ Accelerate
def test_accelerate_accumulate_preconditions_once_per_optimizer_step():
    """Two micro-batches of 8 per optimizer step under ``accelerator.accumulate``: the
    wrapped optimizer steps (and preconditions) on the sync step only, with the factors
    of both micro-batches: the plain loop on the full batches of 16."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = _net()
    opt = KFACOptimizer(model, _sgd(model.parameters()), **OPTIONS)
    model, wrapped = accelerator.prepare(model, opt)
    for x, y in BATCHES:
        for half in (slice(0, 8), slice(8, 16)):
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x[half]), y[half])
                accelerator.backward(loss)
                wrapped.step()
                wrapped.zero_grad()
    assert opt.preconditioner.steps == len(BATCHES)
    assert _close(model, _plain(BATCHES), tol=1e-10)
