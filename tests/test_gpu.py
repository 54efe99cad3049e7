"""On a CUDA device the preconditioner matches its CPU result (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner

from .cases import classification_batch, grad_matrix, mlp, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("method", ["inverse", "solve"])
@pytest.mark.parametrize("solver", ["cholesky", "eigh", "cg"])
def test_cuda_matches_cpu(method, solver):
    results = {}
    for device in ("cpu", "cuda"):
        model = mlp(dtype=torch.float64).to(device)
        x, y = (t.to(device) for t in classification_batch())
        pre = KFACPreconditioner(model, solver=solver, method=method, kl_clip=None)
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        assert pre.last_timings.update_s > 0
        results[device] = {n: grad_matrix(model.get_submodule(n)).cpu() for n in pre.layer_names}
    for name, cpu in results["cpu"].items():
        assert rel_err(results["cuda"][name], cpu) < 1e-8
