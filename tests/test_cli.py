"""The command line end to end, CI-sized: outputs, plots, resume, and bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from thermokfac.cli import main
from thermokfac.experiments.train import Run, TrainConfig
from thermokfac.solvers import HardwareModel

TINY = ["--data", "digits", "--width", "32", "--steps", "12", "--eval-every", "6",
        "--batch-size", "64", "--no-progress"]


def test_train_writes_results_and_plot(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--kfac", "--optimizer", "sgd", "--lr", "0.05",
                 "--out", str(out)]) == 0
    for name in ("config.json", "steps.csv", "metrics.csv", "results.json", "checkpoint.pt",
                 "training.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 12 and 0 <= results["final"]["val_accuracy"] <= 1
    assert results["preconditioner"]["layers"] == ["net.1", "net.3", "net.5"]
    header = (out / "steps.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "loss", "wall_s", "gradient_s", "curvature_s"]


@pytest.mark.parametrize("solver", ["cholesky", "thermodynamic"])
def test_resume_continues_exactly(tmp_path, solver):
    cfg = TrainConfig(data="digits", width=32, steps=10, eval_every=5, batch_size=64,
                      kfac=True, optimizer="sgd", lr=0.05, solver=solver, seed=3)
    whole = Run(cfg, tmp_path / "whole")
    whole.train(progress=False)
    half = Run(TrainConfig(**{**cfg.__dict__, "steps": 5}), tmp_path / "half")
    half.train(progress=False)
    resumed = Run.resume(tmp_path / "half", steps=10)
    resumed.train(progress=False)
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert [m["val_loss"] for m in whole.metrics] == [m["val_loss"] for m in resumed.metrics]


def test_compare_writes_curves_and_plot(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--optimizer", "sgd", "--lr", "0.05", "--damping", "0.01",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    labels = [c["label"] for c in summary["curves"]]
    # baseline, K-FAC, then each method's estimated clock under the three settle models
    assert len(labels) == 8 and labels[2].startswith("Thermodynamic K-FAC, Method 2")
    settles = [c["settle_model"] for c in summary["curves"][2:5]]
    assert settles == ["rc", "rc_over_alpha_min", "target_error"]
    finals = [c["points"][-1]["clock_s"] for c in summary["curves"][2:5]]
    assert finals[0] < finals[1] < finals[2]  # the paper's RC is the most optimistic
    assert all(len(c["points"]) == 3 for c in summary["curves"])
    # The digital run used the solver's default (Method 1): only its share is measured.
    assert "(cholesky, inverse)" in labels[1]
    assert list(summary["share_removed"]) == ["method_1 (inversion)"]
    assert 0 < summary["share_removed"]["method_1 (inversion)"] < 1
    spectra = _read_csv(out / "thermo-m2" / "spectra.csv")  # per prepare and factor
    assert spectra
    for r in spectra:
        kappa = float(r["alpha_max"]) / float(r["alpha_min"])
        assert float(r["kappa"]) == pytest.approx(kappa) and kappa >= 1
    assert (out / "spectra.png").exists()
    assert (out / "compare.png").stat().st_size > 10_000
    (out / "compare.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "compare.png").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--data", "nope"], "argument --data: invalid choice: 'nope'"),
    (["train", "--model", "lstm"], "argument --model: invalid choice: 'lstm'"),
    (["train", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["train", "--data", "digits", "--kfac", "--solver", "thermodynamic", "--input-bits",
      "40", "--steps", "1"], "input_bits=40 must be an integer in [2, 32]"),
    (["train", "--data", "cifar10"], "cifar10 needs --data-dir"),
    (["train", "--model", "gpt", "--data", "digits"], "model 'gpt' does not fit digits"),
    (["plot", "/nonexistent/folder"], "is not a run folder"),
    (["train", "--data", "digits", "--device", "tpu9"], "device='tpu9' is not valid"),
    (["train", "--data", "digits", "--batch-size", "33", "--steps", "1", "--device", "cpu",
      "--dist-strategy", "fastest"], "invalid choice: 'fastest'"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "-m", "thermokfac.cli", *argv],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_command_has_help():
    for command in ("train", "compare", "sweep", "profile", "scaling", "quantize", "plan", "plot"):
        proc = subprocess.run([sys.executable, "-m", "thermokfac.cli", command, "--help"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage: thermokfac" in proc.stdout


def test_profile_writes_four_parts_and_plot(tmp_path):
    out = tmp_path / "prof"
    assert main(["profile", "--widths", "16", "32", "--depth", "2", "--mlp-batch", "8",
                 "--embds", "8", "--vocabs", "20", "40", "--gpt-batch", "2", "--context", "4",
                 "--n-layer", "1", "--vocab", "20", "--n-embd", "8", "--repeats", "1",
                 "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "profile.json").read_text())
    assert [r["width"] for r in result["mlp_width"]] == [16, 32]
    assert [r["vocab"] for r in result["gpt_vocab"]] == [20, 40]
    for row in result["mlp_width"] + result["gpt_embd"] + result["gpt_vocab"]:
        assert all(row[p] > 0 for p in ("gradient", "curvature", "inversion", "update"))
    assert (out / "profile.png").stat().st_size > 10_000


def test_scaling_fits_exponents_and_measures_memory(tmp_path):
    out = tmp_path / "scal"
    assert main(["scaling", "--ns", "16", "32", "64", "--repeats", "1", "--batch", "4",
                 "--out", str(out)]) == 0
    result = json.loads((out / "scaling.json").read_text())
    assert [r["n"] for r in result["rows"]] == [16, 32, 64]
    row = result["rows"][-1]
    assert row["held_bytes_rows"] < row["held_bytes_matrix"]
    assert row["model_s"]["rc_over_alpha_min"] > row["model_s"]["rc"]
    assert set(result["exponents"]) >= {"cholesky_inverse_s", "cg_solve_s", "model_rc"}
    assert (out / "scaling.png").stat().st_size > 10_000


def test_quantize_sweep_writes_mean_and_std(tmp_path):
    out = tmp_path / "quant"
    assert main(["quantize", "--model", "mlp", "--data", "digits", "--width", "16",
                 "--steps", "4", "--eval-every", "2", "--batch-size", "32", "--bits", "6",
                 "8", "--seeds", "0", "1", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "quantize.json").read_text())
    assert set(result["curves"]) == {"fp32", "input-6", "input-8", "output-6", "output-8",
                                     "adam"}
    curve = result["curves"]["input-6"]
    assert curve["step"] == [0, 2, 4] and len(curve["std"]) == 3
    finals = [float(_read_csv(out / "runs" / f"input-6-seed{s}" / "metrics.csv")[-1][
        "val_accuracy"]) for s in (0, 1)]
    assert curve["mean"][-1] == pytest.approx(sum(finals) / 2)
    assert curve["std"][-1] == pytest.approx(abs(finals[0] - finals[1]) / 2)
    assert (out / "quantize.png").stat().st_size > 10_000
    assert main(["quantize", "--bits", "40", "--out", str(out)]) == 2


def test_plan_lists_factors_and_speedups(tmp_path):
    out = tmp_path / "plan"
    assert main(["plan", "--model", "mlp", "--data", "digits", "--width", "32", "--bits", "8",
                 "16", "--rcs-us", "1", "10", "--out", str(out)]) == 0
    result = json.loads((out / "plan.json").read_text())
    assert [layer["g_dim"] for layer in result["layers"]] == [32, 32, 10]
    assert result["spus_needed"] == 6 and result["largest_factor"] == 65
    speed = {(g["bits"], g["rc_us"]): g["speedup"] for g in result["grid"]}
    assert speed[(8, 1.0)] > speed[(16, 1.0)] > speed[(16, 10.0)] > 0
    assert (out / "plan.png").stat().st_size > 5_000
    # Every settle model is priced from the recorded run's banks: settling for α_min
    # and t₀ + T costs more than 1 RC, so those columns are slower, by the hand count.
    banks = result["recorded_banks"]
    assert len(banks) == 6 and all(b["alpha_min"] < 1 for b in banks)
    for g in result["grid"]:
        by = g["speedup_by_settle"]
        assert by["rc"] == g["speedup"] > by["rc_over_alpha_min"] > 0
        assert by["rc"] > by["target_error"] > 0
    hw = HardwareModel(n_spus=6, shared_link=False, input_bits=16, output_bits=16,
                       settle_model="target_error")
    row = next(g for g in result["grid"] if (g["bits"], g["rc_us"]) == (16, 1.0))
    jobs = [hw.time_program(b["n"]).scaled(1 / 10) + hw.time_solve(
        b["n"], b["k"], alpha_min=b["alpha_min"], t0_rc=b["t0_rc"],
        window_rc=b["window_rc"]) for b in banks]
    assert row["device_s_by_settle"]["target_error"] == pytest.approx(hw.step_time(jobs))


def test_plan_without_recording_says_why(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "--model", "mlp", "--data", "digits", "--width", "16", "--bits", "8",
                 "--rcs-us", "1", "--record-steps", "0", "--out", str(out)]) == 0
    row = json.loads((out / "plan.json").read_text())["grid"][0]
    assert row["speedup_by_settle"]["target_error"] is None
    assert row["speedup_by_settle"]["rc"] > 0
    assert "n/a: needs the factors" in capsys.readouterr().out


def _read_csv(path):
    import csv
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sweep_tunes_lr_and_times_target(tmp_path):
    spec = {"target": 0.8, "seeds": [0, 1],
            "base": {"data": "digits", "width": 32, "batch_size": 64, "steps": 60,
                     "eval_every": 5},
            "arms": [{"name": "adam", "lrs": [1e-5, 1e-2], "set": {"optimizer": "adam"}},
                     {"name": "thermo", "lrs": [0.05], "clock": "thermo-m2",
                      "set": {"optimizer": "sgd", "kfac": True, "solver": "thermodynamic",
                              "damping": 0.01}}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    adam, thermo = summary["arms"]
    assert adam["best_lr"] == 1e-2 and adam["by_lr"]["1e-05"]["reached"] == 0
    assert (out / "sweep.png").exists() and (out / "sweep.csv").exists()
    for arm in (adam, thermo):
        for r in summary["runs"][arm["name"]]:
            folder = out / "runs" / arm["name"] / f"lr{r['lr']:g}_seed{r['seed']}"
            metrics = _read_csv(folder / "metrics.csv")
            hits = [m for m in metrics[1:] if float(m["val_accuracy"]) >= 0.8]
            if not hits:  # never reached: ran the whole budget
                assert r["step"] is None and r["steps_run"] == 60
                continue
            first = hits[0]  # the run stopped at its first evaluation over the target
            assert r["step"] == int(first["step"]) == r["steps_run"] == len(
                _read_csv(folder / "steps.csv"))
            assert r["seconds"] == pytest.approx(float(first["train_s"]))
            if arm["clock"] == "thermo-m2":  # measured − (prepare + solves) + device model
                steps = _read_csv(folder / "steps.csv")[: r["step"]]
                expect = sum(float(s["wall_s"]) - float(s["inversion_s"])
                             - float(s["solve_s"]) + float(s["modeled_s"]) for s in steps)
                assert r["estimated_s"] == pytest.approx(expect)
                assert r["estimated_s"] < r["seconds"]
    assert thermo["median_estimated_s_vs_adam"] == pytest.approx(
        thermo["median_estimated_s"] / adam["median_s"])


def test_sweep_counts_a_diverging_rate_as_never(tmp_path):
    spec = {"target": 0.8, "seeds": [0],
            "base": {"data": "digits", "width": 32, "batch_size": 64, "steps": 60,
                     "eval_every": 5},
            "arms": [{"name": "adam", "lrs": [1e30, 1e-2], "set": {"optimizer": "adam"}}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    arm = json.loads((out / "sweep.json").read_text())["arms"][0]
    assert arm["by_lr"]["1e+30"] == {"median_s": None, "reached": 0, "diverged": 1}
    assert arm["best_lr"] == 0.01 and arm["reached"] == 1


def test_sweep_rejects_a_bad_spec(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"target": 0.8, "seeds": [0], "base": {},
                                "arms": [{"name": "a", "lrs": [0.1], "clock": "quantum"}]}))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 2


def test_compare_rc_timed_runs_the_device_only_as_long_as_charged(tmp_path):
    out = tmp_path / "rc"
    assert main(["compare", *TINY, "--optimizer", "sgd", "--lr", "0.05", "--damping", "0.01",
                 "--methods", "m2", "--rc-timed", "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    timed = [c for c in summary["curves"] if "only as long as RC charges" in c["label"]]
    assert len(timed) == 1 and timed[0]["settle_model"] == "rc"
    config = json.loads((out / "thermo-m2-rc-timed" / "config.json").read_text())
    assert config["t0_rc"] == 1.0 and config["window_rc"] == 1e-3
