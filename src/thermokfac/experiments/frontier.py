"""``thermokfac frontier``: how good must the device be? The accuracy–device-time frontier
of Thermodynamic K-FAC.

Training does not need 10⁻³-accurate solves. A frontier trains Thermodynamic K-FAC on one
workload across device schedules — one knob at a time around a default schedule, plus
one 2-D grid — each for its whole step budget and several seeds, and records per run the
simulated device time per step (the ``target_error`` settle clock, t₀ + T per solve: the
x-axis; the ``rc`` and ``rc_over_alpha_min`` clocks, which do not depend on t₀ and T, as
annotations), the measured solve error (``measure_solve_error_every``), the time to
target on the estimated clock and the final validation metric. Digital K-FAC and a
first-order optimizer run beside them as reference lines.

The spec (JSON, committed under ``configs/``)::

    {"description": "...", "target": 0.88, "seeds": [0, 1, 2],
     "base": {...TrainConfig fields: kfac, solver thermodynamic, lr, steps, ...},
     "default": {"target_error": 1e-3},               # the schedule the knobs vary around
     "knobs": {"target_error": [0.3, 0.1, 1e-4],      # one knob at a time
               "schedule": [{"t0_rc": 1.0, "window_rc": 1e-3}],  # several fields at once
               "warm_start": [true]},
     "grid": {"target_error": [0.3, 0.01], "method": ["solve", "inverse"]},  # every pair
     "references": {"digital": {"solver": "cholesky"},
                    "adam": {"kfac": false, "optimizer": "adam", "lr": 0.001}},
     "paper_point": {"t0_rc": 1.0, "window_rc": 1e-3},  # marked (the RC convention)
     "tolerance": 0.01}                               # "within 1 point" of digital K-FAC

Every schedule is an arm of a :mod:`.sweep` (``"target": null``: every run takes its
whole budget, ``sweep --resume`` semantics), so a frontier resumes over several sittings;
:func:`frontier` then reads the sweep's runs and writes ``frontier.json``: per schedule
the mean metric over seeds with its range, the median time and steps to target, the
device time per step under each settle model and the median measured (and predicted)
solve error; per method the Pareto front of device time per step against the metric
and against the time to target; how far each knob moves the metric; and the cheapest
schedule whose mean metric is within ``tolerance`` of digital K-FAC's and whose steps to
target are within 5% of its.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import _THERMO, read_input_text
from .score import lower_is_better
from .sweep import _median, check_spec, sweep
from .train import TrainConfig

#: The spec's keys.
SPEC_KEYS = {"description", "target", "seeds", "base", "default", "knobs", "grid",
             "references", "paper_point", "tolerance"}
#: The settle clock the frontier's x-axis reads (App. E: t₀ + T of each solve).
AXIS_CLOCK = "target_error"
#: Steps to target may exceed digital K-FAC's by this fraction for the cheapest schedule.
STEPS_SLACK = 0.05
#: Settings a frontier's schedules may not vary: the sweep sets them per run.
RUN_SETTINGS = {"lr", "batch_size", "seed", "stop_at"}


def _name(settings: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items()) or "default"


def schedules(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The device schedules of ``spec``: the default, each knob value (one knob at a time,
    the others at the default; the ``schedule`` knob's values are sets of fields), then
    each point of the 2-D grid — settings that come out the same over ``base`` once only.

    Returns:
        ``[{"name", "set", "knob", "value", "grid"}]``, ``set`` the TrainConfig fields
        over ``base`` (the default's included).
    """
    default = dict(spec.get("default", {}))
    found: list[dict[str, Any]] = [
        {"name": "default", "set": default, "knob": None, "value": None, "grid": False}]
    for knob, values in spec.get("knobs", {}).items():
        for value in values:
            change = dict(value) if knob == "schedule" else {knob: value}
            found.append({"name": _name(change), "set": {**default, **change}, "knob": knob,
                          "value": value, "grid": False})
    grid = spec.get("grid", {})
    for combo in itertools.product(*grid.values()):
        change = dict(zip(grid, combo))
        found.append({"name": "grid:" + _name(change), "set": {**default, **change},
                      "knob": None, "value": change, "grid": True})
    base = spec.get("base", {})
    unique: list[dict[str, Any]] = []
    for entry in found:  # the same effective settings run once
        if not any({**base, **u["set"]} == {**base, **entry["set"]} for u in unique):
            unique.append(entry)
    return unique


def _method(base: dict[str, Any], settings: dict[str, Any]) -> str:
    return str(settings.get("method", base.get("method")) or "solve")


def to_sweep(spec: dict[str, Any]) -> dict[str, Any]:
    """The sweep that runs ``spec``: one arm per schedule (timed on the estimated clock
    of its method, ``thermo-m2`` or ``thermo-m1``) and one per reference (measured
    clock), each at one learning rate, with no target (every run takes its budget)."""
    base = dict(spec["base"])
    lr = base.pop("lr", TrainConfig.lr)
    arms = [{"name": s["name"], "lrs": [lr], "set": s["set"],
             "clock": "thermo-m1" if _method(base, s["set"]) == "inverse" else "thermo-m2"}
            for s in schedules(spec)]
    for name, settings in spec.get("references", {}).items():
        settings = dict(settings)
        arms.append({"name": f"reference:{name}", "lrs": [settings.pop("lr", lr)],
                     "set": settings})
    return {"description": spec.get("description", ""), "target": None,
            "seeds": spec["seeds"], "base": base, "arms": arms}


def load_frontier_spec(path: Path) -> dict[str, Any]:
    """Read and check a frontier spec (see the module docstring).

    Raises:
        ValueError: Naming the spec and the bad entry: not JSON, a missing or unknown
            key, a knob or grid that is not a list of values, a non-thermodynamic base,
            a ``tolerance`` that is not positive, or a sweep the spec expands to that
            the sweep's own checks refuse (an unknown setting, say).
    """
    try:
        spec = json.loads(read_input_text(path, "frontier spec"))
    except json.JSONDecodeError as err:
        raise ValueError(f"frontier spec {path} is not JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"frontier spec {path} must be a JSON object")
    for key in ("target", "seeds", "base"):
        if key not in spec:
            raise ValueError(f"frontier spec {path} lacks {key!r}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"frontier spec {path} has unknown keys {unknown}; valid: "
                         f"{sorted(SPEC_KEYS)}")
    target = spec["target"]
    if target is None:
        raise ValueError(f"frontier spec {path}: target is null; a frontier needs the "
                         "workload's target (time to target is one of its axes)")
    if isinstance(target, bool) or not isinstance(target, int | float) \
            or not math.isfinite(target):
        raise ValueError(f"frontier spec {path}: target={target!r} must be a finite number")
    settings = {f.name for f in fields(TrainConfig)}
    for key in ("knobs", "grid", "default", "paper_point"):
        if not isinstance(spec.get(key, {}), dict):
            raise ValueError(f"frontier spec {path}: {key} must be an object "
                             f"{{setting: ...}}, got {spec[key]!r}")
    for key, table in (("default", spec.get("default", {})),
                       ("paper_point", spec.get("paper_point", {}))):
        unknown_settings = sorted(set(table) - settings)
        if unknown_settings:
            raise ValueError(f"frontier spec {path}: {key} names unknown settings "
                             f"{unknown_settings}")
    for value in spec.get("knobs", {}).get("schedule", []):
        if not isinstance(value, dict) or not value:
            raise ValueError(f"frontier spec {path}: every value of the schedule knob must "
                             f"be an object of settings, got {value!r}")
    for key in ("knobs", "grid", "default"):
        table = spec.get(key, {})
        varied = set(table) | {k for v in table.get("schedule", []) if isinstance(v, dict)
                               for k in v} if key == "knobs" else set(table)
        fixed = sorted(varied & RUN_SETTINGS)
        if fixed:
            raise ValueError(f"frontier spec {path}: {key} sets {fixed}, which every run "
                             "of a frontier shares (set them in base; the learning rate "
                             "with base.lr)")
    base = spec["base"]
    if not (base.get("kfac") and base.get("solver") == "thermodynamic"):
        raise ValueError(f"frontier spec {path}: base must train Thermodynamic K-FAC "
                         '("kfac": true, "solver": "thermodynamic")')
    for key in ("knobs", "grid"):
        for knob, values in spec.get(key, {}).items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"frontier spec {path}: {key}.{knob} must be a non-empty "
                                 f"list of values, got {values!r}")
    tolerance = spec.get("tolerance", 0.01)
    if not isinstance(tolerance, int | float) or not tolerance > 0:
        raise ValueError(f"frontier spec {path}: tolerance={tolerance!r} must be a "
                         "positive number (metric units)")
    check_spec(to_sweep(spec), path)  # the sweep's own checks: settings, lrs, names
    return spec


def device_only_set(settings: dict[str, Any]) -> bool:
    """Whether a schedule's settings change only the device (a Method 2 schedule's
    explicit ``method`` included): one a break-even map can price."""
    return all(k in _THERMO or (k == "method" and v == "solve") for k, v in settings.items())


def _first_reaching(curve: list[dict[str, Any]], metric: str, target: float,
                    key: str) -> tuple[int | None, float | None]:
    lower = lower_is_better(metric)
    for point in curve:
        value = point.get(metric)
        if point["step"] and value is not None and (
                value <= target if lower else value >= target):
            return int(point["step"]), point[key]
    return None, None


def _point(name: str, runs: list[dict[str, Any]], metric: str, target: float,
           estimated: bool) -> dict[str, Any]:
    """One schedule or reference over its seeds."""
    key = "estimated_s" if estimated else "seconds"
    finals = [r["final"][metric] for r in runs]
    reached = [_first_reaching(r["curve"], metric, target, key) for r in runs]
    device = [r.get("device_ms_per_step", {}) for r in runs]
    errors = [r.get("solve_rel_error", {}) for r in runs]
    return {
        "name": name, "seeds": len(runs),
        "metric_mean": statistics.fmean(finals), "metric_min": min(finals),
        "metric_max": max(finals),
        "reached": sum(step is not None for step, _ in reached),
        "steps_to_target": _median([step for step, _ in reached]),
        "time_to_target_s": _median([t for _, t in reached]),
        "clock": "estimated" if estimated else "measured",
        "device_ms_per_step": {m: statistics.fmean(d[m] for d in device)
                               for m in device[0]} if all(device) else {},
        "solve_rel_error": _median([e.get("median") for e in errors])
        if all(errors) else None,
        "predicted_rel_error": _median([e.get("predicted_median") for e in errors])
        if all(errors) and all(e.get("predicted_median") is not None for e in errors)
        else None,
        "diverged": sum(r["diverged"] for r in runs)}


def pareto(points: list[dict[str, Any]], value: str, lower_better: bool) -> list[str]:
    """Names of the points on the front of device time per step (the ``target_error``
    clock, less is better) against ``value`` (a point key; ``None`` values, such as a
    missed target, and points with a diverged seed are never on it): each is strictly
    better in ``value`` than every point at most as costly."""
    usable = [p for p in points if p["device_ms_per_step"] and p[value] is not None
              and not p.get("diverged")]
    usable.sort(key=lambda p: (p["device_ms_per_step"][AXIS_CLOCK],
                               p[value] if lower_better else -p[value]))
    front, best = [], math.inf
    for p in usable:
        score = p[value] if lower_better else -p[value]
        if score < best:
            front.append(p["name"])
            best = score
    return front


def frontier(spec: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The frontier of a finished frontier sweep (see the module docstring).

    Args:
        spec: The frontier spec.
        summary: What :func:`.sweep.sweep` returned for :func:`to_sweep` (``sweep.json``).

    Returns:
        ``{"target", "metric", "points", "references", "fronts", "knobs", "cheapest",
        "cheapest_by_method", "cheapest_device_by_method", "prediction", "paper_point",
        ...}`` (``frontier.json``); ``prediction`` compares each schedule's median
        measured solve error with its median OU prediction wherever the error exceeds
        10× the digital reference's (float32 round-off): the ratios, and the schedules
        outside 2×.
    """
    metric, target = summary["metric"], spec["target"]
    lower = lower_is_better(metric)
    base = spec["base"]
    points = []
    for s in schedules(spec):
        point = _point(s["name"], summary["runs"][s["name"]], metric, target, True)
        points.append({**point, "knob": s["knob"], "value": s["value"], "grid": s["grid"],
                       "set": s["set"], "method": _method(base, s["set"])})
    references = {name: _point(name, summary["runs"][f"reference:{name}"], metric, target,
                               False) for name in spec.get("references", {})}
    methods = sorted({p["method"] for p in points})
    fronts = {m: {"metric": pareto([p for p in points if p["method"] == m], "metric_mean",
                                   lower),
                  "time_to_target": pareto([p for p in points if p["method"] == m],
                                           "time_to_target_s", True)} for m in methods}
    by_name = {p["name"]: p for p in points}
    knobs = {}
    for knob in spec.get("knobs", {}):
        members = [by_name["default"]] + [p for p in points if p["knob"] == knob]
        means = [p["metric_mean"] for p in members]
        costs = [p["device_ms_per_step"].get(AXIS_CLOCK) for p in members
                 if p["device_ms_per_step"]]
        knobs[knob] = {"metric_range": max(means) - min(means),
                       "device_ms_range": [min(costs), max(costs)] if costs else None,
                       "points": [p["name"] for p in members]}
    tolerance = float(spec.get("tolerance", 0.01))
    digital = references.get("digital")
    fit: list[dict[str, Any]] = []
    if digital is not None:
        def close(p: dict[str, Any]) -> bool:  # within the tolerance, or better
            gap = p["metric_mean"] - digital["metric_mean"]
            return abs(gap) <= tolerance or (gap < 0 if lower else gap > 0)

        fit = [p for p in points if p["device_ms_per_step"] and not p["diverged"]
               and close(p)]
        if digital["steps_to_target"] is not None:
            limit = digital["steps_to_target"] * (1 + STEPS_SLACK)
            fit = [p for p in fit if p["steps_to_target"] is not None
                   and p["steps_to_target"] <= limit]

    def cheapest_of(candidates: list[dict[str, Any]]) -> str | None:
        return min(candidates, key=lambda p: p["device_ms_per_step"][AXIS_CLOCK])["name"] \
            if candidates else None

    cheapest = cheapest_of(fit)
    by_method = {m: cheapest_of([p for p in fit if p["method"] == m]) for m in methods}
    device_only = {m: cheapest_of([p for p in fit if p["method"] == m and device_only_set(
        p["set"])]) for m in methods}
    # the OU prediction against the measured error, wherever the error is 10× above the
    # digital solver's (float32 round-off on the same factors)
    floor = 10 * digital["solve_rel_error"] if digital is not None \
        and digital["solve_rel_error"] is not None else None
    judged = [p for p in points if floor is not None and p["solve_rel_error"] is not None
              and p["predicted_rel_error"] and p["solve_rel_error"] > floor]
    prediction = {"floor": floor, "judged": len(judged),
                  "ratios": {p["name"]: p["solve_rel_error"] / p["predicted_rel_error"]
                             for p in judged},
                  "outside_2x": [p["name"] for p in judged
                                 if not 0.5 <= p["solve_rel_error"] / p["predicted_rel_error"]
                                 <= 2.0]}
    paper = spec.get("paper_point")
    marked = next((p["name"] for p in points if paper is not None
                   and all(p["set"].get(k) == v for k, v in paper.items())), None)
    return {"description": spec.get("description", ""), "target": target, "metric": metric,
            "lower_is_better": lower, "axis_clock": AXIS_CLOCK, "tolerance": tolerance,
            "steps_slack": STEPS_SLACK, "points": points, "references": references,
            "fronts": fronts, "knobs": knobs,
            "moves_most": max(knobs, key=lambda k: knobs[k]["metric_range"]) if knobs
            else None,
            "cheapest": cheapest, "cheapest_by_method": by_method,
            "cheapest_device_by_method": device_only, "tolerated": [p["name"] for p in fit],
            "prediction": prediction,
            "has_digital": digital is not None, "paper_point": marked,
            "base_device": {k: v for k, v in base.items() if k in _THERMO},
            "load_average_before": summary.get("load_average_before"),
            "load_average_after": summary.get("load_average_after")}


def run_frontier(spec: dict[str, Any], out: Path, progress: bool = True,
                 resume: bool = False) -> dict[str, Any]:
    """Run (or, with ``resume``, finish) the frontier sweep of ``spec`` in ``out`` and
    write ``frontier.json`` beside its ``sweep.json``.

    Raises:
        ValueError: With ``resume``, if ``out`` holds no sweep or another spec.
    """
    out = Path(out)
    summary = sweep(to_sweep(spec), out, progress=progress, resume=resume)
    result = frontier(spec, summary)
    (out / "frontier_spec.json").write_text(json.dumps(spec, indent=2))
    (out / "frontier.json").write_text(json.dumps(result, indent=2))
    return result


def table(result: dict[str, Any]) -> str:
    """A Markdown table of the frontier's points and references."""
    metric = result["metric"]
    lines = [f"| schedule | method | device ms/step (t₀+T) | {metric} mean (range) | "
             "steps to target | time to target s | solve error (predicted) |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def f(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    fronts = {n for m in result["fronts"].values() for n in m["metric"]}
    for p in result["points"]:
        mark = " *" if p["name"] in fronts else ""
        err = f(p["solve_rel_error"], ".2g")
        if p["predicted_rel_error"] is not None:
            err += f" ({p['predicted_rel_error']:.2g})"
        lines.append(
            f"| {p['name']}{mark} | {p['method']} | "
            f"{f(p['device_ms_per_step'].get(AXIS_CLOCK), '.3g')} | "
            f"{p['metric_mean']:.4f} ({p['metric_min']:.4f}–{p['metric_max']:.4f}) | "
            f"{f(p['steps_to_target'], '.0f')} | {f(p['time_to_target_s'], '.1f')} | {err} |")
    for name, p in result["references"].items():
        lines.append(
            f"| reference: {name} | — | — | {p['metric_mean']:.4f} ({p['metric_min']:.4f}–"
            f"{p['metric_max']:.4f}) | {f(p['steps_to_target'], '.0f')} | "
            f"{f(p['time_to_target_s'], '.1f')} | — |")
    lines.append(f"\n(* on a Pareto front; cheapest within {result['tolerance']:g} of "
                 f"digital K-FAC: {result['cheapest']}; knob that moves the metric most: "
                 f"{result['moves_most']}; OU prediction within 2× of the measured error on "
                 f"{result['prediction']['judged'] - len(result['prediction']['outside_2x'])}"
                 f" of {result['prediction']['judged']} schedules above 10× round-off)")
    return "\n".join(lines)


def tolerated_schedule(path: Path, method: str = "solve") -> dict[str, Any]:
    """The cheapest schedule of a finished frontier for ``method`` (``frontier.json``)
    among those that change only the device (:func:`device_only_set`): the device that
    training tolerates, for ``breakeven --schedule-from``; its settings over the
    frontier's base device settings.

    Returns:
        ``{"source", "name", "set", "device_ms_per_step", "metric_mean"}``.

    Raises:
        FileNotFoundError: ``path`` (or ``path``/frontier.json) does not exist.
        ValueError: It is not a frontier's result, or no ``method`` schedule came within
            its tolerance of digital K-FAC.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "frontier.json"
    try:
        result = json.loads(read_input_text(path, "frontier result"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    if not isinstance(result, dict) or "cheapest_device_by_method" not in result:
        raise ValueError(f"{path} is not a frontier's result (no cheapest_device_by_method; "
                         "written by thermokfac frontier)")
    if not result.get("has_digital", True):
        raise ValueError(f"{path}: the frontier ran no 'digital' reference, so no schedule "
                         "can be compared with digital K-FAC")
    name = result["cheapest_device_by_method"].get(method)
    if name is None:
        raise ValueError(f"{path}: no Method {'1' if method == 'inverse' else '2'} schedule "
                         f"that changes only the device came within "
                         f"{result['tolerance']:g} of digital K-FAC's {result['metric']} "
                         f"(with its steps to target within "
                         f"{100 * result['steps_slack']:g}%)")
    point = next(p for p in result["points"] if p["name"] == name)
    return {"source": str(path), "name": name,
            "set": {**result.get("base_device", {}), **point["set"]},
            "device_ms_per_step": point["device_ms_per_step"],
            "metric_mean": point["metric_mean"]}
