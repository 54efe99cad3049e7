"""``thermokfac frontier``: the schedules a spec expands to, the Pareto front and the
cheapest schedule (against hand-worked cases), and one small frontier run end to end —
a looser device costs less device time per step and measures a larger solve error."""

from __future__ import annotations

import json

import pytest

from thermokfac.cli import main
from thermokfac.experiments.frontier import frontier, load_frontier_spec, pareto, schedules


def _spec(**extra):
    spec = {"target": 0.5, "seeds": [0],
            "base": {"model": "mlp", "data": "digits", "width": 16, "depth": 1,
                     "batch_size": 64, "steps": 30, "eval_every": 10, "lr": 0.1,
                     "optimizer": "sgd", "kfac": True, "solver": "thermodynamic",
                     "method": "solve", "damping": 0.1, "settle_model": "target_error",
                     "measure_solve_error_every": 5},
            "default": {"target_error": 0.001},
            "knobs": {"target_error": [0.3],
                      "schedule": [{"t0_rc": 1.0, "window_rc": 0.001}]},
            "grid": {"target_error": [0.3], "method": ["solve", "inverse"]},
            "references": {"digital": {"solver": "cholesky"},
                           "adam": {"kfac": False, "optimizer": "adam", "lr": 0.003}},
            "paper_point": {"t0_rc": 1.0, "window_rc": 0.001}}
    spec.update(extra)
    return spec


def test_a_spec_expands_to_one_knob_at_a_time_then_the_grid():
    names = [s["name"] for s in schedules(_spec())]
    # the grid's (0.3, solve) point is the target_error knob's: it runs once
    assert names == ["default", "target_error=0.3", "t0_rc=1.0,window_rc=0.001",
                     "grid:target_error=0.3,method=inverse"]
    found = {s["name"]: s["set"] for s in schedules(_spec())}
    assert found["t0_rc=1.0,window_rc=0.001"] == {"target_error": 0.001, "t0_rc": 1.0,
                                                  "window_rc": 0.001}


def _point(name, ms, metric, seconds=None, method="solve"):
    return {"name": name, "device_ms_per_step": {"target_error": ms}, "metric_mean": metric,
            "time_to_target_s": seconds, "method": method}


def test_the_pareto_front_keeps_each_point_better_than_every_cheaper_one():
    points = [_point("a", 1.0, 0.80), _point("b", 2.0, 0.85), _point("c", 3.0, 0.84),
              _point("d", 4.0, 0.90), _point("e", 4.0, 0.70), _point("f", 0.5, 0.60)]
    assert pareto(points, "metric_mean", lower_better=False) == ["f", "a", "b", "d"]
    # lower is better (an RMSE): the cheapest point is best at once
    assert pareto(points, "metric_mean", lower_better=True) == ["f"]
    timed = [_point("a", 1.0, 0.8, None), _point("b", 2.0, 0.8, 9.0),
             _point("c", 3.0, 0.8, 5.0), _point("d", 4.0, 0.8, 7.0)]
    assert pareto(timed, "time_to_target_s", lower_better=True) == ["b", "c"]  # a missed


def _run(final, curve_steps, device_ms, error=None):
    curve = [{"step": s, "seconds": s * 0.1, "estimated_s": s * 0.2, "val_accuracy": v}
             for s, v in curve_steps]
    run = {"final": {"val_accuracy": final}, "curve": curve, "diverged": False,
           "device_ms_per_step": {"rc": 0.01, "rc_over_alpha_min": 0.1,
                                  "target_error": device_ms}}
    if error is not None:
        run["solve_rel_error"] = {"median": error, "predicted_median": error}
    return run


def test_the_cheapest_schedule_is_within_the_tolerance_and_the_step_slack():
    spec = _spec(knobs={"target_error": [0.3, 0.1],
                        "schedule": [{"t0_rc": 1.0, "window_rc": 0.001}]},
                 grid={}, tolerance=0.01)
    summary = {"metric": "val_accuracy", "runs": {
        "default": [_run(0.90, [(10, 0.4), (20, 0.6)], 50.0, 1e-4)],
        "target_error=0.3": [_run(0.85, [(10, 0.6)], 1.0, 0.1)],  # cheap, 5 points worse
        "target_error=0.1": [_run(0.895, [(10, 0.3), (20, 0.55)], 5.0, 0.03)],
        "t0_rc=1.0,window_rc=0.001": [_run(0.70, [(10, 0.2)], 0.5, 0.6)],
        "reference:digital": [_run(0.90, [(10, 0.45), (20, 0.7)], 0.0)],
        "reference:adam": [_run(0.88, [(10, 0.1), (20, 0.6)], 0.0)]}}
    result = frontier(spec, summary)
    by = {p["name"]: p for p in result["points"]}
    assert by["target_error=0.3"]["steps_to_target"] == 10
    assert by["target_error=0.3"]["time_to_target_s"] == pytest.approx(2.0)  # estimated
    assert result["references"]["digital"]["time_to_target_s"] == pytest.approx(2.0)
    # within 0.01 of 0.90 and at most 20·1.05 steps: 0.1 (5 ms) beats the default (50 ms)
    assert result["cheapest"] == "target_error=0.1"
    assert result["paper_point"] == "t0_rc=1.0,window_rc=0.001"
    assert result["fronts"]["solve"]["metric"] == [
        "t0_rc=1.0,window_rc=0.001", "target_error=0.3", "target_error=0.1", "default"]
    assert result["knobs"]["target_error"]["metric_range"] == pytest.approx(0.05)
    assert result["knobs"]["schedule"]["metric_range"] == pytest.approx(0.20)
    assert result["moves_most"] == "schedule"


@pytest.mark.parametrize(("change", "match"), [
    ({"target": None}, "target is null"),
    ({"base": {"model": "mlp", "kfac": True, "solver": "cholesky"}}, "Thermodynamic"),
    ({"knobs": {"target_error": 0.3}}, "knobs.target_error"),
    ({"tolerance": 0}, "tolerance=0"),
    ({"colour": "red"}, "unknown keys"),
    ({"knobs": {"target_error": [2.0]}}, "target_error"),  # the sweep's own checks
    ({"target": "0.88"}, "target='0.88'"),
    ({"target": True}, "target=True"),
    ({"paper_point": [1.0, 0.001]}, "paper_point must be an object"),
    ({"paper_point": {"t0": 1.0}}, "unknown settings"),
    ({"knobs": {"schedule": [0.3]}}, "schedule knob"),
    ({"knobs": {"batch_size": [32]}}, "batch_size"),  # a run setting: base only
    ({"grid": {"lr": [0.1, 0.3]}}, "lr"),
    ({"knobs": {"schedule": [{"seed": 3}]}}, "seed"),
])
def test_a_bad_spec_is_refused_naming_the_entry(tmp_path, change, match):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_spec(**change)))
    with pytest.raises(ValueError, match=match):
        load_frontier_spec(path)


def test_a_schedule_with_a_diverged_seed_is_neither_on_a_front_nor_the_cheapest():
    spec = _spec(knobs={"target_error": [0.3]}, grid={})
    diverged = _run(0.90, [(10, 0.6)], 1.0, 0.1)
    diverged["diverged"] = True  # its last evaluation before the NaN looked fine
    summary = {"metric": "val_accuracy", "runs": {
        "default": [_run(0.90, [(10, 0.6)], 50.0, 1e-4)],
        "target_error=0.3": [diverged],
        "reference:digital": [_run(0.90, [(10, 0.6)], 0.0)],
        "reference:adam": [_run(0.80, [(20, 0.6)], 0.0)]}}
    result = frontier(spec, summary)
    assert result["cheapest"] == "default"
    assert "target_error=0.3" not in result["fronts"]["solve"]["metric"]


def test_the_tolerated_device_changes_only_the_device(tmp_path):
    from thermokfac.experiments.frontier import tolerated_schedule

    spec = _spec(knobs={"target_error": [0.3], "inv_update_steps": [20]}, grid={})
    summary = {"metric": "val_accuracy", "runs": {
        "default": [_run(0.90, [(10, 0.6)], 50.0, 1e-4)],
        "target_error=0.3": [_run(0.90, [(10, 0.6)], 5.0, 0.1)],
        "inv_update_steps=20": [_run(0.90, [(10, 0.6)], 1.0, 0.1)],  # cheaper, not a device
        "reference:digital": [_run(0.90, [(10, 0.6)], 0.0)],
        "reference:adam": [_run(0.80, [(20, 0.6)], 0.0)]}}
    result = frontier(spec, summary)
    assert result["cheapest"] == "inv_update_steps=20"
    assert result["cheapest_device_by_method"]["solve"] == "target_error=0.3"
    (tmp_path / "frontier.json").write_text(json.dumps(result))
    found = tolerated_schedule(tmp_path)
    assert found["name"] == "target_error=0.3"
    # over the base's device settings (its settle model here)
    assert found["set"] == {"settle_model": "target_error", "target_error": 0.3}
    (tmp_path / "frontier.json").write_text(json.dumps({**result, "has_digital": False}))
    with pytest.raises(ValueError, match="no 'digital' reference"):
        tolerated_schedule(tmp_path)


def test_a_small_frontier_runs_end_to_end_and_resumes(tmp_path, capsys):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(_spec()))
    out = tmp_path / "out"
    assert main(["frontier", str(spec_path), "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    result = json.loads((out / "frontier.json").read_text())
    assert (out / "frontier.png").stat().st_size > 0
    assert "| default" in (out / "frontier.md").read_text()
    by = {p["name"]: p for p in result["points"]}
    loose, tight = by["target_error=0.3"], by["default"]
    # a looser device: less device time per step, a larger measured solve error, which
    # its own OU prediction tracks
    assert loose["device_ms_per_step"]["target_error"] < \
        tight["device_ms_per_step"]["target_error"]
    assert loose["solve_rel_error"] > tight["solve_rel_error"]
    assert 0.5 < loose["solve_rel_error"] / loose["predicted_rel_error"] < 2.0
    assert by["grid:target_error=0.3,method=inverse"]["method"] == "inverse"
    assert set(result["references"]) == {"digital", "adam"}
    # the prediction judged where the error is 10× the digital solver's round-off
    floor = result["prediction"]["floor"]
    assert floor == pytest.approx(10 * result["references"]["digital"]["solve_rel_error"])
    assert "target_error=0.3" in result["prediction"]["ratios"]
    assert result["prediction"]["outside_2x"] == []
    assert result["paper_point"] == "t0_rc=1.0,window_rc=0.001"
    mtimes = {p: p.stat().st_mtime for p in out.rglob("result.json")}
    assert len(mtimes) == 6  # 4 schedules + 2 references, one seed
    assert main(["frontier", str(spec_path), "--out", str(out), "--no-progress",
                 "--threads", "1", "--resume"]) == 0
    assert {p: p.stat().st_mtime for p in out.rglob("result.json")} == mtimes


# ------------------------------------------------ the break-even map at that device
def _frontier_file(tmp_path, cheapest, **extra):
    result = {"metric": "val_accuracy", "tolerance": 0.01, "steps_slack": 0.05,
              "cheapest_device_by_method": {"solve": cheapest, "inverse": None},
              "points": [{"name": "target_error=0.3", "set": {"target_error": 0.3},
                          "device_ms_per_step": {"target_error": 0.4},
                          "metric_mean": 0.5}], **extra}
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps(result))
    return path


def test_the_tolerated_schedule_is_read_from_a_frontier(tmp_path):
    from thermokfac.experiments.frontier import tolerated_schedule

    path = _frontier_file(tmp_path, "target_error=0.3")
    found = tolerated_schedule(tmp_path)  # the folder finds its frontier.json
    assert found["name"] == "target_error=0.3" and found["set"] == {"target_error": 0.3}
    assert found["source"] == str(path)
    with pytest.raises(ValueError, match="no Method 1 schedule that changes only the device"):
        tolerated_schedule(path, method="inverse")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a frontier's result"):
        tolerated_schedule(tmp_path / "other.json")


def test_breakeven_refuses_a_schedule_that_changes_more_than_the_device():
    from thermokfac.experiments.breakeven import device_settings

    assert device_settings({"name": "x", "set": {"target_error": 0.3, "method": "solve",
                                                 "warm_start": True}}) == \
        {"target_error": 0.3, "warm_start": True}
    with pytest.raises(ValueError, match="inv_update_steps=5"):
        device_settings({"name": "x", "set": {"inv_update_steps": 5}})
    with pytest.raises(ValueError, match="method='inverse'"):
        device_settings({"name": "x", "set": {"method": "inverse"}})


def test_breakeven_maps_the_tolerated_device_beside_the_default_one(tmp_path):
    _frontier_file(tmp_path, "target_error=0.3")
    out = tmp_path / "be"
    assert main(["breakeven", "--data", "digits", "--width", "32", "--depth", "1",
                 "--batch-size", "64", "--steps", "6", "--inv-update-steps", "5",
                 "--out", str(out), "--no-progress", "--schedule-from",
                 str(tmp_path / "frontier.json")]) == 0
    result = json.loads((out / "breakeven.json").read_text())
    scheduled = result["schedule"]
    assert scheduled["name"] == "target_error=0.3"
    # a 0.3 target error needs a shorter burn-in and window than the default 1e-3 ...
    for loose, tight in zip(scheduled["banks"], result["banks"]):
        assert (loose["layer"], loose["factor"]) == (tight["layer"], tight["factor"])
        assert loose["t0_rc"] + loose["window_rc"] < tight["t0_rc"] + tight["window_rc"]
    # ... so its target_error clock is faster; the RC clocks do not read t₀ and T
    at, tolerated = result["speedup_at_paper_point"], scheduled["speedup_at_paper_point"]
    assert tolerated["target_error"] > at["target_error"]
    assert tolerated["rc"] == pytest.approx(at["rc"])
    extra = [p for p in result["panels"] if "tolerated" in p["settle_model"]]
    assert [p["bits"] for p in extra] == [8, 16]
    assert (out / "breakeven.png").exists()
