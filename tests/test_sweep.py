"""``thermokfac sweep``: the batch-size grid, the epoch budget and ``--resume``."""

from __future__ import annotations

import json
import math

import pytest

from thermokfac.cli import main
from thermokfac.experiments import sweep as sweep_mod
from thermokfac.experiments.tasks import load_task

SPEC = {"target": 0.8, "seeds": [0, 1], "budget_epochs": 1.5,
        "base": {"data": "digits", "width": 32, "batch_size": 64, "steps": 999, "threads": 2,
                 "eval_every": 5},
        "arms": [{"name": "adam", "lrs": [1e-3, 1e-2], "batch_sizes": [32, 128],
                  "set": {"optimizer": "adam"}},
                 {"name": "sgd", "lrs": [0.1], "set": {"optimizer": "sgd"}}]}


def _write(tmp_path, spec):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_batch_grid_picks_the_fastest_setting_at_an_equal_epoch_budget(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", str(_write(tmp_path, SPEC)), "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    n_train = len(load_task("digits").train[0])
    adam, sgd = summary["arms"]
    runs = summary["runs"]["adam"]
    assert {(r["batch_size"], r["lr"]) for r in runs} == {
        (b, lr) for b in (32, 128) for lr in (1e-3, 1e-2)} and len(runs) == 8
    for r in runs + summary["runs"]["sgd"]:
        assert r["steps_budget"] == math.ceil(1.5 * n_train / r["batch_size"])
        assert r["steps_run"] <= r["steps_budget"]
        assert r["load_average_1min_before"] >= 0.0
        if r["step"] is not None:  # epochs counted at the run's own batch size
            assert r["epochs"] == pytest.approx(r["step"] * r["batch_size"] / n_train)
        folder = out / "runs" / ("adam" if r in runs else "sgd")
        name = (f"b{r['batch_size']}_" if r in runs else "") + f"lr{r['lr']:g}_seed{r['seed']}"
        assert json.loads((folder / name / "result.json").read_text())["step"] == r["step"]

    def median_time(b, lr):  # a seed that misses counts as never
        times = sorted(math.inf if r["seconds"] is None else r["seconds"]
                       for r in runs if (r["batch_size"], r["lr"]) == (b, lr))
        return (times[0] + times[1]) / 2
    best = min(((b, lr) for b in (32, 128) for lr in (1e-3, 1e-2)),
               key=lambda s: median_time(*s))
    assert (adam["batch_size"], adam["best_lr"]) == best
    assert adam["median_s"] == pytest.approx(median_time(*best))
    assert len(adam["by_setting"]) == 4 and set(adam["by_lr"]) == {"0.001", "0.01"}
    assert sgd["batch_size"] == 64 and sgd["batch_sizes"] == [64]
    table = sweep_mod.table(summary)
    assert f"| adam | {best[0]} (32, 128) |" in table and "| sgd | 64 |" in table


def test_resume_reads_finished_runs_and_refuses_another_spec(tmp_path, monkeypatch):
    spec = {**SPEC, "seeds": [0], "arms": SPEC["arms"][1:]}
    path, out = _write(tmp_path, spec), tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    first = json.loads((out / "sweep.json").read_text())
    calls = []
    original = sweep_mod._one
    monkeypatch.setattr(sweep_mod, "_one", lambda *a: calls.append(a) or original(*a))
    assert main(["sweep", str(path), "--out", str(out), "--no-progress", "--resume"]) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert calls == [] and again["runs"] == first["runs"]  # nothing rerun
    (out / "runs" / "sgd" / "lr0.1_seed0" / "result.json").unlink()
    assert main(["sweep", str(path), "--out", str(out), "--no-progress", "--resume"]) == 0
    assert len(calls) == 1  # only the run without a result
    # without --resume a non-empty --out is refused; with it, a changed spec is refused
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 2
    changed = _write(tmp_path, {**spec, "target": 0.5})
    with pytest.raises(ValueError, match=r"differs .* in target;"):
        sweep_mod.sweep(sweep_mod.load_spec(changed), out, progress=False, resume=True)
    with pytest.raises(ValueError, match="holds no sweep"):
        sweep_mod.sweep(spec, tmp_path / "empty", progress=False, resume=True)


@pytest.mark.parametrize("bad, match", [
    ({"budget_epochs": -1}, "budget_epochs=-1"),
    ({"arms": [{"name": "a", "lrs": [0.1], "batch_sizes": [0]}]}, r"batch_sizes=\[0\]"),
    ({"arms": [{"name": "a", "lrs": []}]}, r"lrs=\[\]"),
    ({"arms": [{"lrs": [0.1]}]}, "unique 'name'"),
    ({"budget_epoch": 3}, r"the spec has unknown keys \['budget_epoch'\]"),
    ({"base": {"widht": 3}}, r"base has unknown keys \['widht'\]"),
    ({"arms": [{"name": "a", "lrs": [0.1], "set": {"optimiser": "sgd"}}]},
     r"arm 'a' 'set' has unknown keys \['optimiser'\]"),
    ({"arms": [{"name": "a", "lr": [0.1]}]}, r"arm 'a' has unknown keys \['lr'\]"),
])
def test_bad_spec_names_the_entry(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        sweep_mod.load_spec(_write(tmp_path, {**SPEC, **bad}))
    assert main(["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "o")]) == 2


def test_spec_that_is_not_json_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text("{not json")
    assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not JSON" in err[0]
