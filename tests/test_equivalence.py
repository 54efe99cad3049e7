"""One step, every setting: one process, one gloo rank and two gloo ranks end equal.

Each case of :mod:`tests.equivalence` varies one factor from the base case; the same
``KFACPreconditioner.step`` function trains it in one process on the whole batch, on
one gloo rank and on two (each rank its contiguous half, a ``DistributedDataParallel``
model). The parameters must agree to float64 round-off (1e-10), or 1e-6 for the
thermodynamic solver, whose noise is drawn from generators seeded by (seed, step,
block, factor) on whichever rank does the work. One spawned group per world size runs
every case.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thermokfac import KFACPreconditioner
from thermokfac.distributed import run_workers

from . import equivalence as eq

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[int, list[dict]]:
    """Every case on 1 and on 2 gloo ranks (one group each)."""
    out = {}
    for world in (1, 2):
        path = tmp_path_factory.mktemp(f"world{world}") / "run"
        run_workers("tests.equivalence:worker", world, [str(path)], timeout=300,
                    extra_path=ROOT)
        out[world] = [torch.load(f"{path}.{r}", weights_only=False) for r in range(world)]
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(eq.CASES))
def test_one_process_one_rank_and_two_ranks_train_alike(ranks, name):
    reference = eq.one_process(name)
    tol = 1e-6 if name == "solver_thermodynamic" else 1e-10
    start = dict(eq.build(name).named_parameters())
    for world, saved in ranks.items():
        for rank, result in enumerate(saved):
            run = result["results"][name]
            assert run["same_step"], "the distributed class overrides step()"
            for key, value in run["params"].items():
                torch.testing.assert_close(value, reference["params"][key], rtol=tol,
                                           atol=tol, msg=f"{name}: {key} on rank {rank} "
                                                         f"of {world}")
            assert run["events"] == reference["events"], (world, rank)
    for key, value in reference["params"].items():  # every parameter trained
        assert float((value - start[key].detach()).abs().max()) > 1e-4, (name, key)
    # the case exercised what it names
    stats, events = reference["stats"], reference["events"]
    expected = {"solver_error": stats["solver_errors"] >= 1,
                "trainable_layout_change": stats["trainable_changes"] == 1,
                "skipped_step": events["discarded"] == 1 and stats["discarded_curvature"] == 1,
                "call_order_misuse": events["refused"] == 1}
    assert expected.get(name, True), (stats, events)
    assert reference["same_step"]


@pytest.mark.distributed
def test_invalid_combinations_are_refused(ranks):
    model = eq.build("base")
    for kw, message in eq.INVALID:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            KFACPreconditioner(model, **{**eq.BASE, **kw})
    for world, saved in ranks.items():
        for result in saved:
            for (kw, message), got in zip(eq.INVALID_DISTRIBUTED, result["refused"]):
                assert message in got, (world, kw, got)


def test_the_distributed_preconditioner_defines_no_step_method():
    from thermokfac.distributed import DistributedKFACPreconditioner

    own = set(vars(DistributedKFACPreconditioner))
    assert "step" not in own
    assert not {n for n in own if n.startswith("_") and not n.startswith("__")}, own


def test_no_module_outside_the_core_reads_a_private_attribute_of_the_preconditioner():
    """Outside ``thermokfac.kfac`` the preconditioner is used through its public API:
    no ``pre._x`` (``run.pre._x``, ``opt.preconditioner._x``...), and no ``self._x`` in
    the distributed subclass."""
    import ast

    import thermokfac

    src = Path(thermokfac.__file__).parent
    found = []
    for path in sorted(src.rglob("*.py")):
        if path.is_relative_to(src / "kfac"):
            continue
        subclass = path == src / "distributed" / "preconditioner.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                continue
            base = ast.unparse(node.value)
            if base.split(".")[-1] in ("pre", "preconditioner") or (subclass and base == "self"):
                found.append(f"{path.relative_to(src)}:{node.lineno}: {base}.{node.attr}")
    assert not found, found
