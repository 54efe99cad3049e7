"""Distributed K-FAC: the work assignment (pure) and multi-process runs on gloo.

The multi-process tests start real ranks with ``run_workers`` (separate processes,
one thread each) and compare against the single-process preconditioner on the whole
batch: with equal shares per rank, averaged factors and DDP-averaged gradients are the
full-batch ones, so the trained parameters must agree to float64 round-off.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from thermokfac.distributed import (
    Assignment,
    Strategy,
    WorkItem,
    cubic_cost,
    hardware_cost,
    run_workers,
    work_items,
)
from thermokfac.distributed.comm import _buckets
from thermokfac.solvers import HardwareModel

ROOT = str(Path(__file__).resolve().parents[1])


def _best_makespan(costs: list[float], world: int) -> float:
    best = float("inf")
    for owners in itertools.product(range(world), repeat=len(costs)):
        loads = [0.0] * world
        for c, o in zip(costs, owners):
            loads[o] += c
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("world", [2, 3])
def test_greedy_assignment_is_within_lpt_bound_of_optimum(world):
    gen = torch.Generator().manual_seed(world)
    for _ in range(20):
        costs = (torch.randint(1, 50, (7,), generator=gen) ** 3).tolist()
        items = [WorkItem(f"l{i}", "g", float(c)) for i, c in enumerate(costs)]
        a = Assignment.greedy(items, world)
        assert sorted(a.owners) == sorted((f"l{i}", "g") for i in range(7))
        loads = [sum(c for i, c in enumerate(costs) if a.owner(f"l{i}", "g") == r)
                 for r in range(world)]
        assert loads == pytest.approx(list(a.loads))
        best = _best_makespan(costs, world)
        assert best <= a.makespan <= (4 / 3 - 1 / (3 * world)) * best + 1e-9


def test_assignment_is_deterministic_and_ties_keep_model_order():
    items = [WorkItem(f"l{i}", "layer", 1.0) for i in range(5)]
    a = Assignment.greedy(items, 2)
    assert [a.owner(f"l{i}") for i in range(5)] == [0, 1, 0, 1, 0]
    assert a == Assignment.greedy(list(items), 2) and a.imbalance == pytest.approx(3 / 2.5)
    with pytest.raises(ValueError, match="world_size=0"):
        Assignment.greedy(items, 0)


def test_work_items_per_strategy_and_costs():
    layers = [("embed", None, 6), ("fc", 19, 10)]
    comm = work_items(layers, "comm-opt", cubic_cost)
    assert [(w.layer, w.factor, w.cost) for w in comm] == [
        ("embed", "g", 216.0), ("fc", "g", 1000.0), ("fc", "a", 6859.0)]
    mem = work_items(layers, Strategy.MEM_OPT, cubic_cost)
    assert [(w.layer, w.factor, w.cost) for w in mem] == [("embed", "layer", 216.0),
                                                         ("fc", "layer", 7859.0)]
    hw = HardwareModel()
    cost = hardware_cost(hw)
    # program n² values, load and read n² values, settle one RC
    assert cost(64) == pytest.approx(64 * 64 * 16 * 3 / 50e9 + 1e-6)
    with pytest.raises(ValueError, match="strategy"):
        work_items(layers, "fastest", cubic_cost)


def test_buckets_respect_size_and_dtype():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(100), torch.zeros(5, dtype=torch.float64),
          torch.zeros(3)]
    groups = _buckets(ts, bucket_bytes=100)
    assert sorted(i for g in groups for i in g) == list(range(5))
    for g in groups:
        assert len({ts[i].dtype for i in g}) == 1
        assert len(g) == 1 or sum(ts[i].numel() * ts[i].element_size() for i in g) <= 100


def _load(out: Path, world: int) -> list[dict]:
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


CASES = [("comm-opt", "solve", "empirical", "matrix", "token"),
         ("comm-opt", "inverse", "empirical", "matrix", "token"),
         ("mem-opt", "solve", "empirical", "matrix", "token"),
         ("mem-opt", "inverse", "empirical", "matrix", "token"),
         ("comm-opt", "solve", "mc", "matrix", "token"),
         ("mem-opt", "solve", "empirical", "rows", "token"),
         ("comm-opt", "solve", "empirical", "rows", "token"),
         ("comm-opt", "solve", "type2", "matrix", "layers"),
         ("mem-opt", "inverse", "empirical", "matrix", "layers")]


@pytest.mark.distributed
@pytest.mark.parametrize(("strategy", "method", "fisher", "storage", "net"), CASES)
def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path, strategy, method, fisher,
                                                        storage, net):
    """Digital solvers; MC labels drawn by global example index; the resistor-array
    mode's rows all-gathered (scaled per rank) to whoever prepares the factor; the
    multi-block layers (attention, grouped and transposed convolutions) as well."""
    import tests.dist_workers as w

    out = tmp_path / "run"
    run_workers("tests.dist_workers:equivalence", 2,
                [str(out), strategy, method, "cholesky", fisher, storage, net],
                timeout=180, extra_path=ROOT)
    ranks = _load(out, 2)
    model, pre = w.single(method, "cholesky", fisher, storage, net)
    reference = dict(model.named_parameters())
    for result in ranks:
        for name, value in result["params"].items():
            torch.testing.assert_close(value, reference[name].detach(), rtol=1e-10,
                                       atol=1e-12)
        if storage == "matrix":
            for name, (a, g) in result["factors"].items():
                a_ref, g_ref = pre.factors()[name]
                torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-13)
                torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)
        assert result["kl"] == pytest.approx(pre.stats["kl_clip_scale"], rel=1e-9)
    # the work is split: both ranks own something, and they agree on who owns what
    assert ranks[0]["owners"] == ranks[1]["owners"]
    assert set(ranks[0]["owners"].values()) == {0, 1}
    assert ranks[0]["collectives"] == ranks[1]["collectives"]


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["comm-opt", "mem-opt"])
def test_thermodynamic_two_ranks_match_one_process(tmp_path, strategy):
    """The noise is seeded by (seed, step, layer, factor) and coloured basis-free, in
    the plain preconditioner as in the distributed one, so one process, one rank and two
    ranks draw the same: float64 parameters agree to 1e-6 (no quantizers)."""
    import tests.dist_workers as w

    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((one, 1), (two, 2)):
        run_workers("tests.dist_workers:equivalence", nproc,
                    [str(out), strategy, "solve", "thermodynamic"], timeout=180,
                    extra_path=ROOT)
    model, _ = w.single("solve", "thermodynamic")
    reference = {n: p.detach() for n, p in model.named_parameters()}
    torch.manual_seed(0)  # the workers' initialisation
    start = dict(w.MODELS["token"]().double().named_parameters())
    for result in (_load(one, 1)[0], *_load(two, 2)):
        for name, value in result["params"].items():
            torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-6)
            moved = float((value - start[name].detach()).abs().max())
            assert moved > 1e-3, name  # trained, not left at the initialisation


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_the_others(tmp_path, how, monkeypatch):
    import time

    monkeypatch.setenv("THERMOKFAC_DIST_TIMEOUT", "30")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        run_workers("tests.dist_workers:failing", 2, [str(tmp_path / "x"), how],
                    timeout=120, extra_path=ROOT)
    assert time.perf_counter() - start < 100
    message = str(info.value)
    assert "rank 1 exited" in message and "rank 0 exited 1" in message
    assert "distributed K-FAC step 2 failed on rank 0 of 2" in message


def test_assignment_matches_a_literal_table():
    """784-512-512-10 MLP (bias columns), comm-opt over 2 ranks, cost n³."""
    layers = [("fc1", 785, 512), ("fc2", 513, 512), ("fc3", 513, 10)]
    a = Assignment.greedy(work_items(layers, "comm-opt", cubic_cost), 2)
    assert a.owners == {("fc1", "a"): 0, ("fc2", "a"): 1, ("fc3", "a"): 1,
                        ("fc1", "g"): 1, ("fc2", "g"): 1, ("fc3", "g"): 0}
    assert a.loads == (785**3 + 10**3, 2 * 513**3 + 2 * 512**3)
    m = Assignment.greedy(work_items(layers, "mem-opt", cubic_cost), 2)
    assert m.owners == {("fc1", "layer"): 0, ("fc2", "layer"): 1, ("fc3", "layer"): 1}


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["comm-opt", "mem-opt"])
def test_thermodynamic_ranks_agree_and_time_is_the_busiest(tmp_path, strategy):
    out = tmp_path / "run"
    run_workers("tests.dist_workers:thermodynamic", 2, [str(out), strategy, "solve"],
                timeout=180, extra_path=ROOT)
    r0, r1 = _load(out, 2)
    for name, value in r0["params"].items():  # same noise on every rank: same model
        assert torch.equal(value, r1["params"][name]), name
    for (local0, step0), (local1, step1) in zip(r0["modeled"], r1["modeled"]):
        assert step0 == step1 == pytest.approx(max(local0, local1))
        assert step0 > 0


def test_needs_an_initialised_process_group():
    from tests.dist_workers import TokenNet
    from thermokfac.distributed import DistributedKFACPreconditioner

    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedKFACPreconditioner(TokenNet())


@pytest.mark.distributed
@pytest.mark.parametrize(("strategy", "solver"), [("comm-opt", "cholesky"),
                                                  ("mem-opt", "thermodynamic")])
def test_distributed_run_resumes_exactly(tmp_path, strategy, solver):
    """rank 0 writes the run folder; every rank resumes from it and continues exactly."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out, steps, resume in ((whole, 10, "0"), (split, 6, "0"), (split, 10, "1")):
        run_workers("tests.dist_workers:train_run", 2,
                    [str(out), str(steps), strategy, solver, resume], timeout=240,
                    extra_path=ROOT)
    results = __import__("json").loads((split / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 10
    for rank in (0, 1):
        a = torch.load(whole / f"params.{rank}")
        b = torch.load(split / f"params.{rank}")
        for name in a:
            assert torch.equal(a[name], b[name]), (rank, name)
    first = torch.load(whole / "params.0")
    second = torch.load(whole / "params.1")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.distributed
def test_torchrun_train_on_two_processes(tmp_path):
    """The CLI under torchrun: DDP + distributed K-FAC, one run folder written by rank 0."""
    import subprocess
    import sys

    out = tmp_path / "run"
    exe = Path(sys.executable).parent / "thermokfac"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--no-python", str(exe), "train", "--data", "digits", "--width", "16", "--steps", "6",
         "--eval-every", "3", "--batch-size", "32", "--kfac", "--optimizer", "sgd",
         "--lr", "0.05", "--threads", "1", "--dist-strategy", "mem-opt", "--no-progress",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = __import__("json").loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6
    assert (out / "checkpoint.pt").exists() and (out / "training.png").exists()
    assert proc.stdout.count("results in") == 1  # only rank 0 reports


@pytest.mark.distributed
def test_profile_nproc_writes_both_process_counts(tmp_path):
    from thermokfac.cli import main

    out = tmp_path / "prof"
    assert main(["profile", "--nproc", "2", "--widths", "8", "--depth", "2", "--mlp-batch",
                 "8", "--repeats", "1", "--vocab", "50", "--n-embd", "16", "--context", "8",
                 "--n-layer", "1", "--gpt-batch", "4", "--no-progress", "--out",
                 str(out)]) == 0
    rows = __import__("json").loads((out / "profile_nproc.json").read_text())["rows"]
    assert [(r["model"], r["nproc"]) for r in rows] == [
        ("mlp-8", 1), ("mlp-8", 2), ("gpt-16-v50", 1), ("gpt-16-v50", 2)]
    for r in rows:
        parts = r["gradient"] + r["curvature"] + r["inversion"] + r["update"]
        assert r["inversion"] > 0 and parts <= r["step"] * 1.05
        assert r["inversion_share"] == pytest.approx(r["inversion"] / r["step"])
    assert (out / "profile_nproc.png").stat().st_size > 10_000


@pytest.mark.distributed
def test_kfac_optimizer_on_ddp_matches_one_process(tmp_path):
    """``KFACOptimizer`` given a DDP model on two ranks uses the distributed
    preconditioner, and matches one process on the whole batch."""
    import tests.dist_workers as w

    out = tmp_path / "run"
    run_workers("tests.dist_workers:kfac_optimizer_ddp", 2, [str(out)], timeout=180,
                extra_path=ROOT)
    model, _ = w.single("inverse")
    reference = dict(model.named_parameters())
    for result in _load(out, 2):
        assert result["kind"] == "DistributedKFACPreconditioner"
        for name, value in result["params"].items():
            torch.testing.assert_close(value, reference[name].detach(), rtol=1e-10,
                                       atol=1e-12)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_ctrl_c_saves_on_every_rank_and_resumes(tmp_path):
    """SIGINT to torchrun mid-run: the ranks agree on the step, save one checkpoint and
    the run's files, leave without a traceback, and a torchrun --resume continues."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    exe = Path(sys.executable).parent / "thermokfac"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node", "2", "--no-python", str(exe), "train"]
    flags = ["--data", "digits", "--width", "16", "--eval-every", "5", "--batch-size", "32",
             "--kfac", "--optimizer", "sgd", "--lr", "0.05", "--threads", "1",
             "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*launch, "--steps", "100000", *flags], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "checkpoint.pt").exists(), proc.stderr.read() if proc.poll() else ""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "KeyboardInterrupt" not in err, err[-3000:]  # no rank died by the default handler
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and 5 <= results["steps"] < 100000
    steps = results["steps"]
    done = subprocess.run([*launch, "--steps", str(steps + 3), "--resume", *flags], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["steps"] == steps + 3


@pytest.mark.distributed
def test_ranks_with_different_models_get_a_clear_error(tmp_path):
    out = tmp_path / "err"
    run_workers("tests.dist_workers:mismatched", 2, [str(out)], timeout=120, extra_path=ROOT)
    for rank in (0, 1):
        message = (tmp_path / f"err.{rank}").read_text()
        assert message.startswith("ranks [1] built a different model"), message
        assert "'0: A 5, G 6'" in message and "'0: A 5, G 7'" in message


@pytest.mark.distributed
def test_ranks_with_different_settings_get_a_clear_error(tmp_path):
    """Settings, not only shapes, are compared across ranks: a damping and a factor
    interval that differ (which trained a silent mix, or hung) are refused on every rank,
    naming both."""
    out = tmp_path / "err"
    run_workers("tests.dist_workers:mismatched_setting", 2, [str(out)], timeout=120,
                extra_path=ROOT)
    for rank in (0, 1):
        message = (tmp_path / f"err.{rank}").read_text()
        assert message.startswith("ranks [1] built a different model"), message
        assert "damping=0.05" in message and "damping=0.1" in message, message
        assert "factor_update_steps=1" in message and "factor_update_steps=2" in message

