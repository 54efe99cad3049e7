"""``thermokfac score``: one number per optimizer over several workloads, as AlgoPerf
scores its submissions, and the targets those workloads are timed to.

**Targets** (:func:`pilot_target`) come from a pilot sweep of the baselines alone
(``"target": null``: every run takes its whole budget): for each baseline arm and
setting, the median over seeds of the validation metric at the first evaluation at or
after ``fraction`` (½) of the step budget; the target is the best of those medians (the
highest accuracy, the lowest RMSE or loss).

**Score** (:func:`score`) reads one timed sweep per workload (:mod:`.sweep`, its target
from the pilot). An optimizer *family* (the arms sharing a ``"family"``: its
hyperparameter grid) takes the time of its fastest arm, each arm already tuned over its
settings by the median time to target over seeds. Per workload w and family f:

- the ratio to the best baseline, t_f / min over baseline families of t_b;
- AlgoPerf's performance ratio r_f,w = t_f / min over all families of t, with a miss
  (no time) or a ratio above τ_max counted as τ_max.

The performance profile ρ_f(τ) = |{w : r_f,w ≤ τ}| / |W| and the score
B_f = ∫₁^τmax ρ_f(τ) dτ / (τ_max − 1) = mean over w of (τ_max − r_f,w)/(τ_max − 1)
(Dahl et al. 2023, *Benchmarking Neural Network Training Algorithms*, Sec. 4.5; τ_max = 4
there); beside it the geometric mean over workloads of the ratio to the best baseline
(a miss counted as τ_max).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (``val_rmse``, ``val_loss``) is better."""
    return metric.endswith(("rmse", "loss"))


def _value_at(run: dict[str, Any], metric: str, fraction: float, worst: float) -> float:
    """The run's ``metric`` at its first evaluation at or after ``fraction`` of its step
    budget; ``worst`` when it stopped (diverged) before it."""
    due = fraction * run["steps_budget"]
    for point in run["curve"]:
        if point["step"] >= due:
            value = point.get(metric)
            return worst if value is None or not math.isfinite(value) else float(value)
    return worst


def pilot_target(summary: dict[str, Any], fraction: float = 0.5) -> dict[str, Any]:
    """The target a pilot sweep sets (see the module docstring).

    Args:
        summary: A pilot's ``sweep.json`` (``"target": null``).
        fraction: The share of the budget the metric is read at, in (0, 1].

    Returns:
        ``{"metric", "target", "fraction", "arm", "family", "batch_size", "lr",
        "arms": {arm: {"value", "batch_size", "lr"}}}``.

    Raises:
        ValueError: ``fraction`` outside (0, 1], the sweep is not a pilot, or it holds no
            baseline runs.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} is out of range; valid: (0, 1]")
    if summary.get("target") is not None:
        raise ValueError(f"a pilot runs every run to its budget (target null), this "
                         f"sweep stopped at target {summary['target']!r}")
    metric = summary["metric"]
    lower = lower_is_better(metric)
    worst = math.inf if lower else -math.inf
    marked = [a for a in summary["arms"] if a.get("baseline")]
    arms = marked or summary["arms"]  # a pilot's arms are all baselines
    found: dict[str, dict[str, Any]] = {}
    for arm in arms:
        settings: dict[tuple[int, float], list[float]] = {}
        for run in summary["runs"].get(arm["name"], []):
            settings.setdefault((run["batch_size"], run["lr"]), []).append(
                _value_at(run, metric, fraction, worst))
        if not settings:
            continue
        medians = {k: statistics.median(v) for k, v in settings.items()}
        (batch, lr), value = (min if lower else max)(medians.items(), key=lambda kv: kv[1])
        found[arm["name"]] = {"value": value, "batch_size": batch, "lr": lr,
                              "family": arm.get("family", arm["name"])}
    reached = {k: v for k, v in found.items() if math.isfinite(v["value"])}
    if not reached:
        raise ValueError("the pilot holds no baseline run that reached "
                         f"{fraction:g} of its budget")
    name = (min if lower else max)(reached, key=lambda k: reached[k]["value"])
    best = reached[name]
    return {"metric": metric, "target": best["value"], "fraction": fraction, "arm": name,
            "family": best["family"], "batch_size": best["batch_size"], "lr": best["lr"],
            "arms": found}


def _workload(summary: dict[str, Any], tau_max: float) -> dict[str, Any]:
    base = summary["base"]
    families: dict[str, dict[str, Any]] = {}
    for arm in summary["arms"]:
        name = arm.get("family", arm["name"])
        fam = families.setdefault(name, {"baseline": arm.get("baseline", False),
                                         "arm": None, "time_s": None, "trials": 0,
                                         "step_ms": None, "step_parts_ms": None})
        if fam["baseline"] != arm.get("baseline", False):
            raise ValueError(f"{base['model']}/{base['data']}: the arms of family {name!r} "
                             "disagree on 'baseline'")
        fam["trials"] += arm.get("trials", len(arm.get("by_setting", [])) or 1)
        if fam["step_ms"] is None:  # a family that misses: its first arm's step
            fam["step_ms"] = arm.get("median_step_ms")
            fam["step_parts_ms"] = arm.get("mean_step_parts_ms")
        time = arm["median_s"]
        if time is not None and (fam["time_s"] is None or time < fam["time_s"]):
            fam["time_s"], fam["arm"] = time, arm["name"]
            fam["step_ms"] = arm.get("median_step_ms")
            fam["step_parts_ms"] = arm.get("mean_step_parts_ms")
    if not any(f["baseline"] for f in families.values()):
        raise ValueError(f"{base['model']}/{base['data']}: no arm is marked "
                         "\"baseline\": true")
    times = [f["time_s"] for f in families.values() if f["time_s"] is not None]
    baseline_times = [f["time_s"] for f in families.values()
                      if f["baseline"] and f["time_s"] is not None]
    best_all = min(times) if times else None
    best_baseline = min(baseline_times) if baseline_times else None
    for fam in families.values():
        t = fam["time_s"]
        fam["ratio_to_best_baseline"] = (t / best_baseline if t is not None and best_baseline
                                         else None)
        r = t / best_all if t is not None and best_all else tau_max
        fam["performance_ratio"] = min(r, tau_max)
    trials = {f["trials"] for f in families.values()}
    return {"name": f"{base['model']}/{base['data']}", "target": summary["target"],
            "metric": summary["metric"], "best_baseline_s": best_baseline,
            "best_s": best_all, "equal_trials": len(trials) == 1,
            "seeds": summary.get("seeds"),
            "load_average_max": max((a.get("load_average_1min_max", math.nan)
                                     for a in summary["arms"]), default=math.nan),
            "families": families}


def score(summaries: list[dict[str, Any]], tau_max: float = 4.0) -> dict[str, Any]:
    """Each family's performance-profile score and geometric-mean ratio to the best
    baseline over the workloads of ``summaries`` (see the module docstring).

    Args:
        summaries: One timed ``sweep.json`` per workload (a target, arms with
            ``family``/``baseline``).
        tau_max: The largest performance ratio counted, > 1.

    Returns:
        ``{"tau_max", "workloads": [...], "families": {family: {"score",
        "geomean_ratio_to_best_baseline", "ratios", "missing"}}}``; a family absent
        from a workload counts as a miss there (listed in ``missing``).

    Raises:
        ValueError: ``tau_max`` ≤ 1, no summaries, a pilot among them, or a workload
            without a baseline.
    """
    if not (math.isfinite(tau_max) and tau_max > 1):
        raise ValueError(f"tau_max={tau_max!r} is out of range; valid: (1, inf)")
    if not summaries:
        raise ValueError("score needs at least one sweep")
    for s in summaries:
        if s.get("target") is None:
            raise ValueError(f"{s['base']['model']}/{s['base']['data']} is a pilot (no "
                             "target): score timed sweeps, and take targets from pilots")
    workloads = [_workload(s, tau_max) for s in summaries]
    names = sorted({f for w in workloads for f in w["families"]})
    families: dict[str, dict[str, Any]] = {}
    for name in names:
        ratios, to_baseline, missing = [], [], []
        for w in workloads:
            fam = w["families"].get(name)
            if fam is None:
                missing.append(w["name"])
            ratios.append(tau_max if fam is None else fam["performance_ratio"])
            b = None if fam is None else fam["ratio_to_best_baseline"]
            if fam is None or fam["time_s"] is None:
                b = tau_max
            if b is not None:
                to_baseline.append(min(b, tau_max))
        area = sum(tau_max - r for r in ratios) / len(ratios)
        geomean = (math.exp(sum(map(math.log, to_baseline)) / len(to_baseline))
                   if to_baseline else None)
        families[name] = {"score": area / (tau_max - 1), "ratios": ratios,
                          "geomean_ratio_to_best_baseline": geomean, "missing": missing}
    return {"tau_max": tau_max, "workloads": workloads, "families": families}


def step_table(result: dict[str, Any]) -> str:
    """Markdown: where each family's step goes on each workload (its fastest trial's
    median step, and its parts as means over steps, ms — its first trial's when it
    missed: gradient = forward + backward, curvature, inversion = prepare, update), which
    explains a workload lost or won."""
    rows = ["| workload | optimizer | step ms | gradient | curvature | inversion | update |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for w in result["workloads"]:
        for name, f in sorted(w["families"].items()):
            if f.get("step_ms") is None:
                continue
            parts = f.get("step_parts_ms") or {}
            cells = [f"{parts[k]:.1f}" if k in parts else "—"
                     for k in ("gradient", "curvature", "inversion", "update")]
            rows.append(f"| {w['name']} | {name} | {f['step_ms']:.1f} | " + " | ".join(cells)
                        + " |")
    return "\n".join(rows)


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per family — its time-to-target ratio to the best baseline on
    each workload (— where it missed), the score and the geometric mean."""
    workloads = result["workloads"]
    head = " | ".join(w["name"] for w in workloads)
    rows = [f"| optimizer | {head} | score (τ_max = {result['tau_max']:g}) | "
            "geometric mean × best baseline |",
            "|---|" + "---:|" * (len(workloads) + 2)]
    for name, fam in sorted(result["families"].items(), key=lambda kv: -kv[1]["score"]):
        cells = []
        for w in workloads:
            f = w["families"].get(name)
            ratio = None if f is None else f["ratio_to_best_baseline"]
            cells.append("miss" if f is None or f["time_s"] is None else
                         "—" if ratio is None else f"{ratio:.2f}×")
        geo = fam["geomean_ratio_to_best_baseline"]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {fam['score']:.3f} | "
                    + ("—" if geo is None else f"{geo:.2f}×") + " |")
    return "\n".join(rows)


def read_sweep(folder: Path) -> dict[str, Any]:
    """A sweep folder's ``sweep.json``.

    Raises:
        FileNotFoundError: ``folder`` holds no ``sweep.json``.
        ValueError: It is not JSON.
    """
    path = Path(folder) / "sweep.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no sweep.json (run thermokfac sweep first)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None


def score_folders(folders: list[Path], out: Path, tau_max: float = 4.0) -> dict[str, Any]:
    """:func:`score` of the sweeps in ``folders``, written to ``out/score.json`` and
    ``out/score.md``."""
    result = score([read_sweep(f) for f in folders], tau_max)
    result["sweeps"] = [str(f) for f in folders]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "score.json").write_text(json.dumps(result, indent=2))
    (out / "score.md").write_text(table(result) + "\n\n" + step_table(result) + "\n")
    return result


def target_folder(folder: Path, out: Path, fraction: float = 0.5) -> dict[str, Any]:
    """:func:`pilot_target` of the pilot in ``folder``, written to ``out/target.json``."""
    result = {**pilot_target(read_sweep(folder), fraction), "pilot": str(folder)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "target.json").write_text(json.dumps(result, indent=2))
    return result
