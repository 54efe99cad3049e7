"""Exact K-FAC on FSDP2: owner-rank blocks end where one process on the whole batch ends.

Every case of :mod:`tests.equivalence` that an FSDP2 model can run (all but the rows
storage and the DDP strategies) trains on gloo ranks with ``fully_shard`` applied and
:class:`~thermokfac.distributed.DistributedKFACPreconditioner` built after it; the
parameters (gathered whole) must equal the one-process run's to float64 round-off
(1e-10; 1e-6 for the thermodynamic solver). Two ranks in the default suite, four in the
slow one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thermokfac.distributed import run_workers

from . import equivalence as eq

ROOT = str(Path(__file__).resolve().parents[1])
pytestmark = pytest.mark.distributed


def _run(tmp_path_factory, world: int) -> list[dict]:
    path = tmp_path_factory.mktemp(f"fsdp{world}") / "run"
    run_workers("tests.equivalence:fsdp_worker", world, [str(path)], timeout=300,
                extra_path=ROOT)
    return [torch.load(f"{path}.{r}", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict]:
    return _run(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> list[dict]:
    return _run(tmp_path_factory, 4)


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return {name: eq.one_process(name) for name in eq.FSDP_CASES}


def _check_equal(saved: list[dict], references: dict[str, dict]) -> None:
    for name, reference in references.items():
        tol = 1e-6 if name == "solver_thermodynamic" else 1e-10
        for rank, result in enumerate(saved):
            run = result["results"][name]
            assert run["same_step"], "the distributed class overrides step()"
            for key, value in run["params"].items():
                torch.testing.assert_close(value, reference["params"][key], rtol=tol,
                                           atol=tol, msg=f"{name}: {key} on rank {rank} "
                                                         f"of {len(saved)}")
            assert run["events"] == reference["events"], (name, rank)


def _check_bytes(saved: list[dict], references: dict[str, dict]) -> None:
    """K-FAC's bytes per rank ≤ (one process's) / world + the largest block, and no rank
    gathered a gradient of a block it does not own."""
    world = len(saved)
    for name, reference in references.items():
        total, largest = reference["held"], reference["largest"]
        held = [result["results"][name]["held"] for result in saved]
        assert total > 0 and sum(held) == total, (name, held, total)  # each block once
        assert max(held) <= total / world + largest, (name, held, total, largest)
    assert all(result["gathered_foreign"] == 0 for result in saved)


def test_two_ranks_equal_one_process(two, references):
    _check_equal(two, references)


def test_two_ranks_hold_their_share_of_the_state(two, references):
    _check_bytes(two, references)


def test_kfac_optimizer_over_adamw_on_two_ranks_equals_one_process(two):
    reference = eq.train_kfac_adamw(eq.build("base"), 0, 1)
    start = dict(eq.build("base").named_parameters())
    for rank, result in enumerate(two):
        for key, value in result["adamw"].items():
            torch.testing.assert_close(value, reference[key], rtol=1e-10, atol=1e-10,
                                       msg=f"{key} on rank {rank}")
    assert all(float((reference[k] - start[k].detach()).abs().max()) > 1e-3 for k in start)


def _check_small_model(two, key: str, build, train) -> None:
    """Every rank's ``key`` parameters equal one process's (1e-10), and the reference
    moved every parameter."""
    from thermokfac import KFACPreconditioner

    reference = train(build(), KFACPreconditioner, 0, 1)
    start = dict(build().named_parameters())
    for rank, result in enumerate(two):
        assert set(result[key]) == set(reference)
        for name, value in result[key].items():
            torch.testing.assert_close(value, reference[name], rtol=1e-10, atol=1e-10,
                                       msg=f"{key}: {name} on rank {rank}")
    assert all(float((reference[k] - start[k].detach()).abs().max()) > 1e-3 for k in start)


def test_a_gpt_with_attention_and_a_tied_head_on_two_ranks_equals_one_process(two):
    _check_small_model(two, "gpt", eq.TinyGPT, eq.train_gpt)


def test_fsdp2_options_train_as_one_process(two, references):
    """``reshard_after_forward=False``, CPU offload, accumulation without gradient sync
    (with ``num_examples=``) and the preconditioner built before ``fully_shard``
    (Accelerate's order: the first step switches to the owner plan) equal one process to
    1e-10; float32 compute under a
    MixedPrecisionPolicy stays within float32 round-off of the float64 run; accumulation
    without ``num_examples=`` is refused (the sharded parameters see no gradient from
    the unsynchronised micro-batch, so the examples cannot be counted)."""
    reference = references["base"]["params"]
    for rank, result in enumerate(two):
        runs = result["options"]
        assert runs["built_before_sharding_plan"] == "FullyShard"
        for name, tol in (("no_reshard", 1e-10), ("cpu_offload", 1e-10),
                          ("built_before_sharding", 1e-10),
                          ("accumulation", 1e-10), ("mixed_precision", 1e-5)):
            for key, value in runs[name].items():
                torch.testing.assert_close(value, reference[key], rtol=tol, atol=tol,
                                           msg=f"{name}: {key} on rank {rank}")
        assert "cannot count the examples" in runs["accumulation_uncounted"]


def test_a_cnn_on_two_ranks_equals_one_process(two):
    _check_small_model(two, "cnn", eq.TinyCNN, eq.train_cnn)


def test_misuse_is_refused_on_every_rank(two):
    for result in two:
        said = result["misuse"]
        assert "no zero_grad() since" in said["no_zero_grad"], said
        assert "different model or K-FAC setup" in said["mixed_settings"], said
        assert "'head' is not sharded" in said["unsharded_layer"], said


def test_a_layer_called_on_some_ranks_only_is_refused_on_every_rank(two):
    for result in two:  # a clear error on every rank, not a hang or a silent mix
        assert "set on some ranks only" in result["routed"], result["routed"]
        assert "'head'" in result["routed"] and "'other'" in result["routed"]


def _checkpoint_run(tmp_path, target: str, world: int, folder) -> list[dict]:
    out = tmp_path / f"{target.split(':')[1]}{world}"
    run_workers(target, world, [str(folder), str(out)], timeout=300, extra_path=ROOT)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two ranks: save through torch.distributed.checkpoint after 3 steps, go on to 6."""
    tmp = tmp_path_factory.mktemp("dcp")
    folder = tmp / "checkpoint"
    return tmp, folder, _checkpoint_run(tmp, "tests.fsdp_checkpoint:save_and_go_on", 2,
                                        folder)


def _check_resumed(saved, world: int, tol: float) -> None:
    tmp, folder, uninterrupted = saved
    resumed = _checkpoint_run(tmp, "tests.fsdp_checkpoint:load_and_go_on", world, folder)
    reference = uninterrupted[0]["params"]
    for rank, result in enumerate(resumed):
        for key, value in result["params"].items():
            if tol == 0:
                assert torch.equal(value, reference[key]), (world, rank, key)
            else:
                torch.testing.assert_close(value, reference[key], rtol=tol, atol=tol)
    if world > 1:  # each rank loaded only the blocks it owns: none holds them all
        held = [r["held_after_load"] for r in resumed]
        assert 0 < max(held) < sum(held), held


def test_a_checkpoint_round_trip_equals_the_uninterrupted_run_bit_for_bit(saved):
    _check_resumed(saved, 2, 0.0)


def test_a_checkpoint_resumes_on_one_rank_to_round_off(saved):
    _check_resumed(saved, 1, 1e-10)


@pytest.mark.slow
def test_a_checkpoint_resumes_on_four_ranks_to_round_off(saved):
    _check_resumed(saved, 4, 1e-10)


@pytest.mark.slow
def test_four_ranks_equal_one_process_and_hold_their_share(four, references):
    _check_equal(four, references)
    _check_bytes(four, references)
    from thermokfac import KFACPreconditioner

    models = {"gpt": eq.train_gpt(eq.TinyGPT(), KFACPreconditioner, 0, 1),
              "cnn": eq.train_cnn(eq.TinyCNN(), KFACPreconditioner, 0, 1),
              "adamw": eq.train_kfac_adamw(eq.build("base"), 0, 1)}
    for rank, result in enumerate(four):
        for model, reference in models.items():
            for key, value in result[model].items():
                torch.testing.assert_close(value, reference[key], rtol=1e-10, atol=1e-10,
                                           msg=f"{model}: {key} on rank {rank} of 4")


def _train(args: list[str], tmp_path) -> str:
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "thermokfac"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node", "2", "--no-python", str(exe), "train"]
    done = subprocess.run([*launch, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_the_command_line_trains_fsdp2_and_resumes_through_a_dcp_checkpoint(tmp_path):
    """``thermokfac train --fsdp --kfac`` under torchrun: 3 steps, a resume to 6 through
    ``checkpoint.dcp``, equal (losses and validation metrics) to 6 uninterrupted steps;
    the checkpoint folder was replaced atomically (the previous one kept)."""
    flags = ["--data", "digits", "--model", "mlp", "--width", "16", "--kfac", "--fsdp",
             "--threads", "1", "--eval-every", "3", "--batch-size", "32", "--no-progress"]
    _train([*flags, "--steps", "6", "--out", "full"], tmp_path)
    _train([*flags, "--steps", "3", "--out", "part"], tmp_path)
    _train(["--out", "part", "--resume", "--steps", "6", "--no-progress"], tmp_path)
    part, full = tmp_path / "part", tmp_path / "full"
    assert (part / "checkpoint.dcp" / ".metadata").is_file()
    assert (part / "checkpoint.dcp.prev" / ".metadata").is_file()
    assert not (part / "checkpoint.pt").exists()
    import csv

    for name, columns in (("steps.csv", ("step", "loss")),
                          ("metrics.csv", ("step", "val_loss", "val_accuracy"))):
        rows = []
        for folder in (full, part):
            with open(folder / name) as fh:
                rows.append([{c: r[c] for c in columns} for r in csv.DictReader(fh)])
        assert rows[0] == rows[1] and len(rows[0]) >= 3, (name, rows)


@pytest.mark.slow
def test_an_fsdp_resume_falls_back_to_the_newest_complete_dcp_folder(tmp_path):
    """``checkpoint.dcp`` without its ``.metadata`` (a damaged save): ``--resume`` under
    torchrun continues from ``checkpoint.dcp.prev``, says so, and ends where an
    uninterrupted run ends."""
    flags = ["--data", "digits", "--model", "mlp", "--width", "16", "--kfac", "--fsdp",
             "--threads", "1", "--eval-every", "2", "--checkpoint-every", "2",
             "--batch-size", "32", "--no-progress"]
    _train([*flags, "--steps", "6", "--out", "full"], tmp_path)
    _train([*flags, "--steps", "4", "--out", "part"], tmp_path)
    part = tmp_path / "part"
    (part / "checkpoint.dcp" / ".metadata").unlink()
    err = _train(["--out", "part", "--resume", "--steps", "6", "--no-progress"], tmp_path)
    assert f"from {Path('part') / 'checkpoint.dcp.prev'} (step" in err
    assert "checkpoint.dcp has no .metadata" in err
    import csv

    rows = []
    for folder in (tmp_path / "full", part):
        with open(folder / "metrics.csv") as fh:
            rows.append([(r["step"], r["val_loss"]) for r in csv.DictReader(fh)])
    assert rows[0][-1] == rows[1][-1], rows


def test_fsdp_without_several_processes_is_refused(tmp_path):
    from thermokfac.experiments.config import TrainConfig
    from thermokfac.experiments.train import Run

    with pytest.raises(ValueError, match="--fsdp shards the model over torchrun processes"):
        Run(TrainConfig(data="digits", fsdp=True, kfac=True, threads=1), tmp_path / "run")
