"""The estimated device clock removes exactly the work the device takes over."""

from __future__ import annotations

import itertools

import pytest
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.timing import TimedSolves

from .cases import classification_batch, mlp


class FakeClock:
    """Advances by one second at every read: a timed block lasts its number of reads."""

    def __init__(self) -> None:
        self.ticks = itertools.count()

    def __call__(self) -> float:
        return float(next(self.ticks))


def test_timed_solves_add_up_the_solver_calls_only():
    class Solver:
        calls = 0

        def solve(self, *args, **kwargs):
            Solver.calls += 1
            return "x"

        name = "fake"

    timed = TimedSolves(Solver(), FakeClock())
    assert [timed.solve(1), timed.solve(2)] == ["x", "x"]
    assert timed.seconds == 2.0 and Solver.calls == 2 and timed.name == "fake"


@pytest.mark.parametrize("method", ["solve", "inverse"])
def test_solve_time_is_the_time_inside_the_solves(method):
    """Method 2: two solves per layer and step, each one clock tick under a fake clock;
    Method 1 multiplies by stored inverses: nothing to take over at update time."""
    model = mlp((6, 5, 4))
    x, y = classification_batch()
    pre = KFACPreconditioner(model, method=method, kl_clip=None, inv_update_steps=1)
    pre.timing.clock = FakeClock()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    t = pre.last_timings
    layers = len(pre.layer_names)
    assert t.solve_s == (2.0 * layers if method == "solve" else 0.0)
    assert t.solve_s < t.update_s
    summary = pre.timing_summary()
    assert summary["mean_solve_s"] == t.solve_s
