"""On a CUDA device the preconditioner matches its CPU result (skipped without one)."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["comm-opt", "mem-opt"])
@pytest.mark.parametrize("method", ["inverse", "solve"])
def test_nccl_rank_matches_one_process(tmp_path, strategy, method):
    """The NCCL code path (one rank per GPU; NCCL refuses two ranks on one GPU, so with
    one GPU this is a single rank): the distributed preconditioner on CUDA reproduces
    the plain one on the CPU."""
    import tests.dist_workers as w
    from thermokfac.distributed import run_workers

    nproc = torch.cuda.device_count()
    out = tmp_path / "run"
    run_workers("tests.dist_workers:cuda_equivalence", nproc, [str(out), strategy, method],
                timeout=240, backend="nccl", extra_path=str(Path(__file__).resolve().parents[1]))
    model, _ = w.single(method)
    reference = dict(model.named_parameters())
    for rank in range(nproc):
        result = torch.load(f"{out}.{rank}")
        assert result["backend"] == "nccl"
        assert result["collectives"] > 0
        for name, value in result["params"].items():
            torch.testing.assert_close(value, reference[name].detach(), rtol=1e-9, atol=1e-11)


def test_plain_cuda_device_gets_an_index():
    """``--device cuda`` names the current GPU by index (what set_device needs)."""
    from thermokfac.experiments.processes import resolve_device

    device = resolve_device("cuda")
    assert device.type == "cuda" and device.index == torch.cuda.current_device()
