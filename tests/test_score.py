"""``thermokfac score``: the AlgoPerf-style score and the pilot's target against hand
computations (a miss included), and the harness end to end on real sweeps."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from thermokfac.cli import main
from thermokfac.experiments.score import pilot_target, score, step_table, table
from thermokfac.plots import profile_curve


def _arm(name, median_s, family=None, baseline=False, trials=3):
    return {"name": name, "family": family or name, "baseline": baseline,
            "median_s": median_s, "trials": trials, "load_average_1min_max": 0.1}


def _sweep(data, arms, target=0.9):
    return {"target": target, "metric": "val_accuracy", "seeds": [0, 1, 2],
            "base": {"model": "mlp", "data": data}, "arms": arms}


# Workload a: adamw 10 s, muon 8 s, kfac 4 s. Workload b: adamw 6 s, muon misses, kfac's
# two arms 12 s and 9 s (its family takes 9 s).
SWEEPS = [
    _sweep("a", [_arm("adamw", 10.0, baseline=True), _arm("muon", 8.0, baseline=True),
                 _arm("kfac", 4.0)]),
    _sweep("b", [_arm("adamw", 6.0, baseline=True), _arm("muon", None, baseline=True),
                 _arm("kfac-10", 12.0, family="kfac", trials=2),
                 _arm("kfac-5", 9.0, family="kfac", trials=1)]),
]


def test_the_score_is_the_hand_computed_profile_area_with_a_miss():
    result = score(SWEEPS, tau_max=4.0)
    a, b = result["workloads"]
    # ratios to the best baseline (8 s on a, 6 s on b)
    assert a["families"]["kfac"]["ratio_to_best_baseline"] == pytest.approx(0.5)
    assert a["families"]["adamw"]["ratio_to_best_baseline"] == pytest.approx(1.25)
    assert b["families"]["kfac"]["ratio_to_best_baseline"] == pytest.approx(1.5)
    assert b["families"]["kfac"]["arm"] == "kfac-5"
    assert b["families"]["muon"]["ratio_to_best_baseline"] is None  # a miss
    # performance ratios r = t / fastest (4 s on a, 6 s on b); muon's miss counts as 4
    fams = result["families"]
    assert fams["adamw"]["ratios"] == pytest.approx([2.5, 1.0])
    assert fams["muon"]["ratios"] == pytest.approx([2.0, 4.0])
    assert fams["kfac"]["ratios"] == pytest.approx([1.0, 1.5])
    # B = mean over workloads of (τ_max − r) / (τ_max − 1)
    assert fams["adamw"]["score"] == pytest.approx((1.5 + 3.0) / 2 / 3)
    assert fams["muon"]["score"] == pytest.approx((2.0 + 0.0) / 2 / 3)
    assert fams["kfac"]["score"] == pytest.approx((3.0 + 2.5) / 2 / 3)
    # geometric mean of the ratio to the best baseline, the miss as τ_max
    assert fams["kfac"]["geomean_ratio_to_best_baseline"] == pytest.approx(math.sqrt(0.75))
    assert fams["muon"]["geomean_ratio_to_best_baseline"] == pytest.approx(2.0)
    assert fams["adamw"]["geomean_ratio_to_best_baseline"] == pytest.approx(math.sqrt(1.25))
    assert a["equal_trials"] and b["equal_trials"]  # kfac's two arms: 2 + 1 trials
    lines = table(result).splitlines()
    assert lines[2].startswith("| kfac | 0.50× | 1.50× | 0.917 | 0.87× |")
    assert "| muon | 1.00× | miss |" in table(result)


def test_the_profile_is_the_share_of_workloads_within_tau():
    taus, rhos = profile_curve([1.0, 2.5, 4.0, 1.5], 4.0)
    for tau, expected in [(1.0, 0.25), (1.4, 0.25), (1.5, 0.5), (2.0, 0.5), (2.5, 0.75),
                          (3.9, 0.75)]:
        # the step function's value at tau: the last point at or before it
        value = [r for t, r in zip(taus, rhos) if t <= tau][-1]
        assert value == expected, tau
    assert taus[-1] == 4.0


def test_score_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match=r"tau_max=1\.0 is out of range"):
        score(SWEEPS, tau_max=1.0)
    with pytest.raises(ValueError, match="no arm is marked"):
        score([_sweep("c", [_arm("adamw", 1.0)])])
    with pytest.raises(ValueError, match="is a pilot"):
        score([_sweep("c", [_arm("adamw", 1.0, baseline=True)], target=None)])
    unequal = score([_sweep("c", [_arm("adamw", 1.0, baseline=True, trials=3),
                                  _arm("kfac", 1.0, trials=5)])])
    assert not unequal["workloads"][0]["equal_trials"]


def _run(lr, seed, values, budget=100, batch=128):
    steps = [0, 25, 50, 75, 100][:len(values)]
    return {"lr": lr, "seed": seed, "batch_size": batch, "steps_budget": budget,
            "curve": [{"step": s, "val_accuracy": v} for s, v in zip(steps, values)]}


def test_the_pilot_target_is_the_best_baselines_median_at_half_budget():
    summary = {"target": None, "metric": "val_accuracy",
               "arms": [{"name": "adamw"}, {"name": "muon"}],
               "runs": {"adamw": [_run(1e-3, 0, [0.1, 0.5, 0.70, 0.8, 0.9]),
                                  _run(1e-3, 1, [0.1, 0.5, 0.74, 0.8, 0.9]),
                                  _run(1e-3, 2, [0.1, 0.5, 0.72, 0.8, 0.9]),
                                  _run(3e-3, 0, [0.1, 0.6, 0.80, 0.9, 0.9]),
                                  _run(3e-3, 1, [0.1, 0.6]),  # diverged before half
                                  _run(3e-3, 2, [0.1, 0.6])],
                        "muon": [_run(0.02, s, [0.1, 0.5, v]) for s, v in
                                 enumerate([0.75, 0.71, 0.77])]}}
    found = pilot_target(summary)
    # adamw lr 1e-3: median(0.70, 0.74, 0.72) = 0.72; lr 3e-3: median(0.80, −∞, −∞) = −∞;
    # muon: median(0.75, 0.71, 0.77) = 0.75 → the target
    assert found["target"] == pytest.approx(0.75)
    assert (found["arm"], found["lr"]) == ("muon", 0.02)
    assert found["arms"]["adamw"]["value"] == pytest.approx(0.72)
    assert found["arms"]["adamw"]["lr"] == 1e-3
    rmse = {**summary, "metric": "val_rmse",
            "runs": {"adamw": [_run(1e-3, 0, [3, 2, 1.5])], "muon": [_run(0.02, 0, [3, 2, 1.2])]}}
    for runs in rmse["runs"].values():
        for r in runs:
            for p in r["curve"]:
                p["val_rmse"] = p.pop("val_accuracy")
    assert pilot_target(rmse)["target"] == pytest.approx(1.2)  # lower is better
    with pytest.raises(ValueError, match="target null"):
        pilot_target({**summary, "target": 0.8})


def test_pilot_then_timed_sweeps_then_score_end_to_end(tmp_path, capsys):
    base = {"model": "mlp", "data": "digits", "width": 32, "steps": 40, "eval_every": 10,
            "batch_size": 64, "schedule": "warmup-cosine", "warmup_fraction": 0.1}
    arms = [{"name": "adamw", "lrs": [3e-3], "set": {"optimizer": "adamw"},
             "baseline": True},
            {"name": "muon", "lrs": [3e-3], "set": {"optimizer": "muon"}, "baseline": True}]
    pilot = tmp_path / "pilot.json"
    pilot.write_text(json.dumps({"target": None, "seeds": [0, 1], "base": base,
                                 "arms": arms}))
    assert main(["sweep", str(pilot), "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    log = (tmp_path / "p" / "runs" / "adamw" / "lr0.003_seed0" / "metrics.csv").read_text()
    assert log.splitlines()[0].startswith("step,train_s,val_loss,val_accuracy")
    assert len(log.splitlines()) == 1 + 5  # steps 0, 10, ..., 40: the whole budget
    assert main(["score", str(tmp_path / "p"), "--pilot", "--out", str(tmp_path / "t")]) == 0
    target = json.loads((tmp_path / "t" / "target.json").read_text())
    pilot_summary = json.loads((tmp_path / "p" / "sweep.json").read_text())
    at_half = [p["val_accuracy"] for r in pilot_summary["runs"][target["arm"]]
               for p in r["curve"] if p["step"] == 20]
    assert target["target"] == pytest.approx(statistics.median(at_half))
    timed = tmp_path / "timed.json"
    timed.write_text(json.dumps({"target": target["target"], "seeds": [0, 1], "base": base,
                                 "arms": [*arms, {"name": "kfac", "lrs": [3e-3],
                                                  "set": {"optimizer": "adamw",
                                                          "kfac": True}}]}))
    assert main(["sweep", str(timed), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["score", str(tmp_path / "s"), "--out", str(tmp_path / "score")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "score" / "score.json").read_text())
    assert set(result["families"]) == {"adamw", "muon", "kfac"}
    assert (tmp_path / "score" / "score.png").stat().st_size > 0
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    times = {a["name"]: a["median_s"] for a in sweep["arms"]}
    best = min(t for n, t in times.items() if n != "kfac" and t is not None)
    if times["kfac"] is not None:
        assert result["workloads"][0]["families"]["kfac"]["ratio_to_best_baseline"] == \
            pytest.approx(times["kfac"] / best)
    assert "| optimizer | mlp/digits |" in printed
    # where each step goes: K-FAC's curvature and inversion are its own, AdamW has none
    parts = {a["name"]: a["mean_step_parts_ms"] for a in sweep["arms"]}
    assert parts["kfac"]["curvature"] > 0 and parts["kfac"]["inversion"] > 0
    assert parts["adamw"]["curvature"] == parts["adamw"]["inversion"] == 0
    assert parts["kfac"]["gradient"] > 0
    if times["kfac"] is not None:
        assert "| mlp/digits | kfac |" in (tmp_path / "score" / "score.md").read_text()


def test_the_step_table_shows_where_each_step_goes_even_for_a_miss():
    parts = {"gradient": 5.0, "curvature": 3.0, "inversion": 2.0, "update": 1.0}
    arms = [{**_arm("adamw", 10.0, baseline=True), "median_step_ms": 8.0,
             "mean_step_parts_ms": {**parts, "curvature": 0.0, "inversion": 0.0}},
            {**_arm("kfac-a", None, family="kfac"), "median_step_ms": 21.0,
             "mean_step_parts_ms": parts},
            {**_arm("kfac-b", None, family="kfac"), "median_step_ms": 30.0,
             "mean_step_parts_ms": parts}]
    text = step_table(score([_sweep("a", arms)]))
    assert "| mlp/a | kfac | 21.0 | 5.0 | 3.0 | 2.0 | 1.0 |" in text  # its first trial
    assert "| mlp/a | adamw | 8.0 | 5.0 | 0.0 | 0.0 | 1.0 |" in text
