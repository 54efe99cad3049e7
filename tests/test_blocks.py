"""Kronecker blocks on their own: estimates, caches and Eq. 15 against dense float64
references, and the round trips (checkpoint, another rank's copy) of their state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac.enums import DampingSplit, Method
from thermokfac.kfac.blocks import KroneckerBlock, split_damping
from thermokfac.kfac.caches import receive_cache
from thermokfac.kfac.curvature import CurvatureSums
from thermokfac.kfac.layers import helper_for
from thermokfac.kfac.parallel import LocalAssignment, Update, clip_sum
from thermokfac.solvers import get_solver

GEN = torch.Generator().manual_seed(0)


def _rows(k: int, n: int) -> torch.Tensor:
    return torch.randn(k, n, generator=GEN, dtype=torch.float64)


def _block(module: nn.Module, rows: bool = False) -> KroneckerBlock:
    return KroneckerBlock("layer", 0, helper_for(module)(module), rows=rows)


def _sums(a_rows: torch.Tensor, g_rows: torch.Tensor, c: float, rows: bool
          ) -> CurvatureSums:
    if rows:
        return CurvatureSums(a_rows=float(len(a_rows)), g_rows=float(len(g_rows)),
                             a_parts=a_rows.clone(), g_parts=g_rows.clone(), g_scale=c)
    return CurvatureSums(a=torch.tril(a_rows.mT @ a_rows), a_rows=float(len(a_rows)),
                         g=torch.tril(c * g_rows.mT @ g_rows), g_rows=float(len(g_rows)))


def _dense_update(a: torch.Tensor, g: torch.Tensor, lam: float, d: torch.Tensor
                  ) -> torch.Tensor:
    """vec(U) = ((A+λI) ⊗ (G+λI))⁻¹ vec(DΘ), one unbatched float64 solve (column-major
    vec: vec(G⁻¹ D A⁻¹) = (A⁻¹ ⊗ G⁻¹) vec(D) for symmetric A, G)."""
    eye_a, eye_g = torch.eye(len(a), dtype=a.dtype), torch.eye(len(g), dtype=g.dtype)
    big = torch.kron(a + lam * eye_a, g + lam * eye_g)
    return torch.linalg.solve(big, d.mT.reshape(-1)).reshape(d.shape[1], d.shape[0]).mT


@pytest.mark.parametrize(("method", "solver", "rows"), [
    ("inverse", "cholesky", False), ("solve", "cholesky", False), ("solve", "eigh", False),
    ("solve", "cg", False), ("solve", "cholesky", True), ("inverse", "eigh", False)])
def test_apply_equals_the_dense_kronecker_solve(method, solver, rows):
    layer = nn.Linear(5, 3).double()
    block = _block(layer, rows=rows)
    a_rows = torch.cat([_rows(40, 5), torch.ones(40, 1, dtype=torch.float64)], dim=1)
    g_rows = _rows(40, 3)
    assert block.update_estimate(_sums(a_rows, g_rows, 2.0, rows), decay=0.0)
    a, g = a_rows.mT @ a_rows / 40, 2.0 * g_rows.mT @ g_rows
    solver = get_solver(solver)
    block.update_cache(solver, Method(method), 0.1, DampingSplit.EQUAL, ("a", "g"),
                       lambda part: None)
    block.settle_cache()
    assert block.ready and block.damping == (0.1, 0.1)
    d = _rows(3, 6)
    u, _ = block.apply(d.clone(), solver, None)
    torch.testing.assert_close(u, _dense_update(a, g, 0.1, d), rtol=1e-7, atol=1e-9)


def test_diagonal_a_of_an_embedding_is_inverted_elementwise():
    emb = nn.Embedding(6, 3).double()
    block = _block(emb)
    counts = torch.tensor([3.0, 0.0, 1.0, 2.0, 0.0, 2.0], dtype=torch.float64)
    g_rows = _rows(8, 3)
    sums = CurvatureSums(a=counts.clone(), a_rows=8.0, g=torch.tril(g_rows.mT @ g_rows),
                         g_rows=8.0)
    assert block.update_estimate(sums, 0.0)
    solver = get_solver("cholesky")
    block.update_cache(solver, Method.SOLVE, 0.05, DampingSplit.EQUAL, ("a", "g"),
                       lambda part: None)
    block.settle_cache()
    d = _rows(3, 6)
    u, _ = block.apply(d.clone(), solver, None)
    expected = _dense_update(torch.diag(counts / 8), g_rows.mT @ g_rows, 0.05, d)
    torch.testing.assert_close(u, expected, rtol=1e-9, atol=1e-11)


def test_moving_average_follows_eqs_16_and_17():
    block = _block(nn.Linear(4, 2, bias=False).double())
    first, second = (_rows(10, 4), _rows(10, 2)), (_rows(10, 4), _rows(10, 2))
    block.update_estimate(_sums(*first, 1.0, False), decay=0.3)
    block.update_estimate(_sums(*second, 1.0, False), decay=0.3)
    a, g = block.factors()
    a1, a2 = first[0].mT @ first[0] / 10, second[0].mT @ second[0] / 10
    g1, g2 = first[1].mT @ first[1], second[1].mT @ second[1]
    torch.testing.assert_close(a, 0.3 * a1 + 0.7 * a2)
    torch.testing.assert_close(g, 0.3 * g1 + 0.7 * g2)


def test_non_finite_fresh_factors_leave_the_estimates_alone():
    block = _block(nn.Linear(4, 2, bias=False).double())
    block.update_estimate(_sums(_rows(10, 4), _rows(10, 2), 1.0, False), decay=0.5)
    before = block.factors()
    bad = _rows(10, 2)
    bad[3, 1] = float("nan")
    assert not block.update_estimate(_sums(_rows(10, 4), bad, 1.0, False), decay=0.5)
    after = block.factors()
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("method", ["inverse", "solve"])
def test_a_cache_rebuilt_from_its_metadata_and_tensors_applies_alike(method):
    """What another rank receives (``comm-opt``): metadata, then the tensors."""
    block = _block(nn.Linear(5, 3).double())
    rows = torch.cat([_rows(30, 5), torch.ones(30, 1, dtype=torch.float64)], dim=1)
    block.update_estimate(_sums(rows, _rows(30, 3), 1.0, False), 0.0)
    solver = get_solver("cholesky")
    block.update_cache(solver, Method(method), 0.1, DampingSplit.EQUAL, ("a", "g"),
                       lambda part: None)
    block.settle_cache()
    twin = _block(nn.Linear(5, 3).double())
    for which, cache in block.caches.items():
        copy, tensors = receive_cache(cache.meta(), torch.device("cpu"))
        for key, value in cache.tensors().items():
            tensors[key].copy_(value)
        twin.caches[which] = copy
    twin.settle_cache()
    d = _rows(3, 6)
    assert torch.equal(block.apply(d.clone(), solver, None)[0],
                       twin.apply(d.clone(), solver, None)[0])
    assert twin.damping == block.damping


def test_state_dict_round_trip_restores_every_part():
    block = _block(nn.Linear(5, 3).double())
    rows = torch.cat([_rows(30, 5), torch.ones(30, 1, dtype=torch.float64)], dim=1)
    block.update_estimate(_sums(rows, _rows(30, 3), 1.0, False), 0.0)
    solver = get_solver("eigh")
    block.update_cache(solver, Method.SOLVE, 0.1, DampingSplit.PI, ("a", "g"),
                       lambda part: None)
    block.settle_cache()
    twin = _block(nn.Linear(5, 3).double())
    twin.load_state_dict(block.state_dict())
    d = _rows(3, 6)
    assert torch.equal(block.apply(d.clone(), solver, None)[0],
                       twin.apply(d.clone(), solver, None)[0])
    assert (twin.damping, twin.prepared, twin.failed) == (block.damping, True, False)
    assert all(torch.equal(x, y) for x, y in zip(block.factors(), twin.factors()))


def test_a_failed_prepare_passes_through_and_remembers_the_damping():
    block = _block(nn.Linear(3, 2, bias=False).double())
    zero = CurvatureSums(a=torch.zeros(3, 3, dtype=torch.float64), a_rows=4.0,
                         g=torch.zeros(2, 2, dtype=torch.float64), g_rows=4.0)
    block.update_estimate(zero, 0.0)
    solver = get_solver("cholesky", max_damping_increases=0)
    block.update_cache(solver, Method.SOLVE, 0.0, DampingSplit.EQUAL, ("a", "g"),
                       lambda part: None)
    block.settle_cache()
    assert block.failed and not block.ready and block.prepared
    assert block.stats["failed"] == 2.0 and block.caches == {}


def test_pi_split_and_the_local_assignment():
    assert split_damping(4.0, 1.0, 1e-2, DampingSplit.PI) == pytest.approx((0.2, 0.05))
    assert split_damping(0.0, 1.0, 1e-2, DampingSplit.PI) == pytest.approx((0.1, 0.1))
    local = LocalAssignment()
    assert local.prepares("x") == ("a", "g") and local.holds_cache("x")
    assert local.computes_update("x") and not local.broadcasts_updates
    ones = torch.ones(1)
    assert clip_sum({"x": Update(2.0, 0.5, ones), "y": Update(4.0, 1.0)}) == 4.5
    assert clip_sum({"x": Update(2.0, None)}) is None


def test_method_1_inverts_only_after_every_prepare_succeeded_and_stops_at_a_failure():
    """As the one-process code always did: one solver error per block, and G is not
    inverted once A's inversion failed (no work, no modelled device time wasted)."""
    from thermokfac.solvers import CholeskySolver, SolverError

    calls = []

    class NoInverse(CholeskySolver):
        def inverse(self, prepared, generator=None, lower_only=False):
            calls.append(prepared.n)
            raise SolverError("inverse did not converge")

    block = _block(nn.Linear(5, 3).double())
    rows = torch.cat([_rows(30, 5), torch.ones(30, 1, dtype=torch.float64)], dim=1)
    block.update_estimate(_sums(rows, _rows(30, 3), 1.0, False), 0.0)
    jobs = block.update_cache(NoInverse(), Method.INVERSE, 0.1, DampingSplit.EQUAL,
                              ("a", "g"), lambda part: None)
    block.settle_cache()
    assert calls == [6] and len(jobs) == 2  # A's inverse only; two prepares
    assert block.failed and block.stats["solver_errors"] == 1.0
