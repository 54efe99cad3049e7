"""``thermokfac sweep``: time to a target metric, per optimizer, tuned over a learning-rate grid.

A sweep is described by a JSON spec (committed under ``configs/``)::

    {"target": 0.88, "seeds": [0, 1, 2, 3, 4],
     "base": {...TrainConfig fields shared by every arm...},
     "budget_epochs": 12,                       # optional: the step budget in epochs
     "arms": [{"name": "adam", "lrs": [3e-4, 1e-3, 3e-3], "set": {"optimizer": "adam"},
               "batch_sizes": [256, 512, 1024]},   # optional: a batch-size grid
              {"name": "thermo", "lrs": [0.1], "set": {...}, "clock": "thermo-m2"}]}

``"target": null`` makes a *pilot*: every run takes its whole budget (nothing stops at a
target), and :func:`.score.pilot_target` reads the target off it. An arm may name its
``"family"`` (the optimizer it tunes; default: its name — several arms of one family
are its grid, e.g. K-FAC's intervals or SOAP's preconditioning frequencies) and say
``"baseline": true``; :mod:`.score` compares families. Each run's folder holds its
evaluation log, ``metrics.csv`` (step, accumulated training seconds, validation
metrics; evaluation time excluded), beside its ``result.json``.

Every arm runs every (batch size ×) learning rate × seed until the validation metric
meets ``target`` (``stop_at``) or the step budget ends (``base.steps``, or
⌈``budget_epochs`` × examples per epoch / batch⌉ steps when given, so that every batch
size gets the same data budget); runs go seed by seed, every arm and setting within a
seed, so that a shared machine's speed changes fall on all arms alike. Time to target
is the training clock at the first evaluation that meets it (evaluation itself
excluded). An arm's setting (batch size and learning rate) is the one with the smallest
median time over the seeds (a seed that misses counts as never), so every arm gets the
same tuning budget. Each run's result is written to ``runs/<arm>/<setting>/result.json``
with the 1-minute load average before it; ``resume=True`` keeps the runs already
written (the spec must be the saved one).
An arm with ``"clock": "thermo-m2"`` (or ``"thermo-m1"``) is timed on the estimated
clock of :mod:`.compare` (measured step − the work the device takes over + the hardware
model's time for it) besides the measured one, under every settle model of App. E
(``estimated_by_settle``: RC, RC/α_min, and the burn-in and window the simulation used);
``estimated_s`` is the one of the arm's hardware model. The machine's load averages (1, 5 and 15
minutes) before and after the sweep are recorded with it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from .compare import ACCOUNTING, SETTLE_CLOCKS, _clock
from .config import read_input_text
from .progress import each
from .tasks import load_task
from .train import Run, TrainConfig, solve_error_summary

CLOCKS = ("measured", *ACCOUNTING)


def load_spec(path: Path) -> dict[str, Any]:
    """Read and check a sweep spec (see the module docstring).

    Raises:
        ValueError: Naming the spec and the bad entry: a missing key, a repeated arm
            name, an unknown clock, an empty or non-positive ``lrs`` or ``batch_sizes``,
            a ``budget_epochs`` that is not a positive number, or a file that is not JSON.
    """
    try:
        spec = json.loads(read_input_text(path, "sweep spec"))
    except json.JSONDecodeError as err:
        raise ValueError(f"sweep spec {path} is not JSON: {err}") from None
    return check_spec(spec, path)


def check_spec(spec: Any, path: Path | str) -> dict[str, Any]:
    """Check a sweep spec read from ``path`` (named in the errors); see :func:`load_spec`.

    Returns:
        ``spec``.

    Raises:
        ValueError: As :func:`load_spec`.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"sweep spec {path} must be a JSON object")
    for key in ("target", "seeds", "base", "arms"):
        if key not in spec:
            raise ValueError(f"sweep spec {path} lacks {key!r}")
    _known(path, "the spec", spec, SPEC_KEYS)
    settings = {f.name for f in fields(TrainConfig)}
    _known(path, "base", spec["base"], settings)
    for arm in spec["arms"]:
        _known(path, f"arm {arm.get('name')!r}", arm, ARM_KEYS)
        _known(path, f"arm {arm.get('name')!r} 'set'", arm.get("set", {}), settings)
    names = [arm.get("name") for arm in spec["arms"]]
    if len(set(names)) != len(names) or None in names:
        raise ValueError(f"sweep spec {path}: every arm needs a unique 'name', got {names}")
    budget = spec.get("budget_epochs")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"sweep spec {path}: budget_epochs={budget!r} must be a positive "
                         "number of epochs")
    for arm in spec["arms"]:
        clock = arm.get("clock", "measured")
        if clock not in CLOCKS:
            raise ValueError(f"arm {arm['name']!r}: clock={clock!r} is not one of {CLOCKS}")
        for key, kind in (("lrs", (int, float)), ("batch_sizes", int)):
            if key == "batch_sizes" and key not in arm:
                continue  # the base (or set) batch size
            values = arm.get(key)
            if not isinstance(values, list) or not values or not all(
                    isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)
                    and v > 0 for v in values):
                raise ValueError(f"arm {arm['name']!r}: {key}={values!r} must be a "
                                 "non-empty list of positive numbers")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in seeds):
        raise ValueError(f"sweep spec {path}: seeds={seeds!r} must be a non-empty list of "
                         "integers")
    target = spec["target"]
    if target is not None and (isinstance(target, bool) or not isinstance(
            target, (int, float)) or not math.isfinite(target)):
        raise ValueError(f"sweep spec {path}: target={target!r} must be a finite number "
                         "(or null: a pilot, every run to its whole budget)")
    for arm in spec["arms"]:
        if not isinstance(arm.get("family", ""), str) or not arm.get("family", "x"):
            raise ValueError(f"arm {arm['name']!r}: family={arm['family']!r} must be a "
                             "non-empty string")
        if not isinstance(arm.get("baseline", False), bool):
            raise ValueError(f"arm {arm['name']!r}: baseline={arm['baseline']!r} must be "
                             "true or false")
    for arm in spec["arms"]:  # every run's settings, checked before the first runs
        for batch in arm.get("batch_sizes", [None]):
            for lr in arm["lrs"]:
                for seed in seeds:
                    values = {**spec["base"], **arm.get("set", {}), "lr": lr, "seed": seed,
                              "stop_at": target}
                    if batch is not None:
                        values["batch_size"] = batch
                    try:
                        TrainConfig(**values)
                    except (TypeError, ValueError) as err:
                        raise ValueError(f"sweep spec {path}: arm {arm['name']!r}: "
                                         f"{err}") from None
    return spec


SPEC_KEYS = {"description", "target", "seeds", "base", "arms", "budget_epochs"}
ARM_KEYS = {"name", "lrs", "set", "clock", "batch_sizes", "family", "baseline"}


def _known(path: Path, where: str, table: Any, keys: set[str]) -> None:
    """Every key of ``table`` is one of ``keys`` (a misspelt key is an error, not a
    setting silently left at its default)."""
    if not isinstance(table, dict):
        raise ValueError(f"sweep spec {path}: {where} must be a JSON object")
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ValueError(f"sweep spec {path}: {where} has unknown keys {unknown}; valid: "
                         f"{sorted(keys)}")


def steps_per_epoch(task: Any, batch_size: int) -> float:
    """Optimizer steps in one pass over ``task``'s training data at ``batch_size``
    (a text corpus is counted in characters, ``context`` per sequence)."""
    n_train = len(task.train[0]) if task.kind == "image" else len(task.train)
    per_step = batch_size * (task.meta["context"] if task.kind == "text" else 1)
    return n_train / per_step


def time_to_target(run: Run, clock: list[float] | None = None) -> dict[str, float | None]:
    """Step, epochs and seconds (measured, and on ``clock`` if given) of the first
    evaluation that meets the run's ``stop_at``; ``None`` where it never does."""
    for m in run.metrics:
        if m["step"] and run.reached(m):
            step = int(m["step"])
            return {"step": step, "epochs": step / steps_per_epoch(run.task, run.cfg.batch_size),
                    "seconds": m["train_s"],
                    "estimated_s": clock[step - 1] if clock is not None else None}
    return {"step": None, "epochs": None, "seconds": None, "estimated_s": None}


def _median(values: list[float | None]) -> float | None:
    """Median where a missing value (a seed that missed the target) counts as +∞."""
    full = [math.inf if v is None else v for v in values]
    med = statistics.median(full)
    return None if math.isinf(med) else med


def _one(cfg: TrainConfig, out: Path, clock_name: str, task) -> dict[str, Any]:
    load = os.getloadavg()[0]
    run = Run(cfg, out, task=task)
    diverged = False
    try:
        run.train(progress=False, checkpoint=False)
    except FloatingPointError:  # a rate that diverges never reaches the target
        diverged = True
        run.write()
    clock = _clock(run.steps, ACCOUNTING[clock_name]) if clock_name != "measured" else None
    settle = {} if clock is None else {  # the same clock under every settle model
        model: _clock(run.steps, ACCOUNTING[clock_name], key)
        for model, (key, _) in SETTLE_CLOCKS.items()}
    reached = time_to_target(run, clock)
    by_settle = {m: (c[reached["step"] - 1] if reached["step"] else None)
                 for m, c in settle.items()}
    curve = [{"step": m["step"], "seconds": m["train_s"],
              "estimated_s": (clock[int(m["step"]) - 1] if m["step"] else 0.0)
              if clock is not None else None,
              **{k: v for k, v in m.items() if k.startswith("val_")}} for m in run.metrics]
    step_s = statistics.median(s["wall_s"] for s in run.steps[1:] or run.steps)
    # where a step's time goes (ms, mean over steps: work done every k steps counts at
    # its amortised cost, which a median would hide): what explains a lost workload
    parts = {key: 1e3 * statistics.fmean(s[f"{key}_s"] for s in run.steps[1:] or run.steps)
             for key in ("gradient", "curvature", "inversion", "update")}
    kfac = {} if run.pre is None else {  # what was preconditioned, and every event
        "preconditioned": run.pre.layer_names,
        "stats": {k: v for k, v in run.pre.stats.items() if v and k != "kl_clip_scale"}}
    if run.pre is not None and getattr(run.pre.solver, "hardware", None) is not None:
        kfac["device_ms_per_step"] = {  # the modelled device time, mean over steps
            model: 1e3 * statistics.fmean(s[key] for s in run.steps)
            for model, (key, _) in SETTLE_CLOCKS.items()}
    errors = solve_error_summary(run.steps)
    if errors:
        kfac["solve_rel_error"] = errors
    return {"batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, **reached,
            "estimated_by_settle": by_settle, "final": run.metrics[-1],
            "steps_run": run.step, "steps_budget": cfg.steps, "median_step_s": step_s,
            "mean_step_parts_ms": parts,
            "diverged": diverged, "load_average_1min_before": load,
            "subnormals": run.subnormals,
            **kfac, "curve": curve}


def _read_result(path: Path) -> dict[str, Any] | None:
    """A finished run's ``result.json``, or ``None`` (with a message: the run is done
    again) when it is damaged."""
    try:
        result = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        result = err
    if isinstance(result, dict) and {"lr", "seed", "steps_run"} <= set(result):
        return result
    why = result if isinstance(result, Exception) else "not a run's result"
    print(f"thermokfac sweep: {path} is damaged ({why}); running that run again",
          file=sys.stderr)
    return None


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _folder(arm: dict[str, Any], batch: int, lr: float, seed: int) -> str:
    prefix = f"b{batch}_" if "batch_sizes" in arm else ""
    return f"{arm['name']}/{prefix}lr{lr:g}_seed{seed}"


def _check_resumable(out: Path, spec: dict[str, Any]) -> None:
    if not (out / "config.json").exists():
        raise ValueError(f"--resume: {out} holds no sweep (no config.json)")
    saved = json.loads((out / "config.json").read_text())
    changed = sorted(k for k in set(saved) | set(spec) if saved.get(k) != spec.get(k))
    if changed:
        raise ValueError(f"--resume: the spec differs from the sweep saved in {out} in "
                         f"{', '.join(changed)}; resume with the saved spec "
                         f"({out / 'config.json'}) or start a new --out")


def sweep(spec: dict[str, Any], out: Path, progress: bool = True,
          resume: bool = False) -> dict[str, Any]:
    """Run every arm × (batch size ×) learning rate × seed of ``spec``; write
    ``sweep.json``/``.csv`` (with the load averages before and after) and each run's
    ``result.json``. With ``resume``, runs whose ``result.json`` exists are read, not rerun.

    Raises:
        ValueError: With ``resume``, if ``out`` holds no sweep or another spec.
    """
    out = Path(out)
    if resume:
        _check_resumable(out, spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(spec, indent=2))
    load_before = os.getloadavg()  # a figure is quoted only from a quiet machine
    base = TrainConfig(**{**spec["base"], "stop_at": spec["target"]})
    # seed-major order: the machine's slow and fast spells fall on every arm alike
    jobs = [(arm, batch, lr, seed) for seed in spec["seeds"] for arm in spec["arms"]
            for batch in arm.get("batch_sizes", [replace(base, **arm.get("set", {})).batch_size])
            for lr in arm["lrs"]]
    tasks: dict[tuple, Any] = {}  # one data split per (data, seed), shared by every arm
    runs: dict[str, list[dict[str, Any]]] = {arm["name"]: [] for arm in spec["arms"]}
    for arm, batch, lr, seed in each(
            jobs, "sweep", progress,
            lambda j: f"{j[0]['name']}, batch {j[1]}, lr {j[2]:g}, seed {j[3]}"):
        folder = out / "runs" / _folder(arm, batch, lr, seed)
        if resume and (folder / "result.json").exists():
            saved = _read_result(folder / "result.json")
            if saved is not None:
                runs[arm["name"]].append(saved)
                continue
        cfg = replace(base, **arm.get("set", {}), batch_size=batch, lr=lr, seed=seed)
        key = (cfg.data, cfg.limit, cfg.context, cfg.seed)
        if key not in tasks:
            tasks[key] = load_task(cfg.data, limit=cfg.limit, data_dir=cfg.data_dir,
                                   context=cfg.context, seed=cfg.seed)
        if "budget_epochs" in spec:
            cfg = replace(cfg, steps=math.ceil(spec["budget_epochs"]
                                               * steps_per_epoch(tasks[key], batch)))
        result = _one(cfg, folder, arm.get("clock", "measured"), tasks[key])
        _write_atomic(folder / "result.json", json.dumps(result))
        runs[arm["name"]].append(result)
    arms = [_summarise(arm, runs[arm["name"]]) for arm in spec["arms"]]
    reference = arms[0]["median_s"]
    for a in arms:
        for key in ("median_s", "median_estimated_s"):
            a[f"{key}_vs_{arms[0]['name']}"] = (a[key] / reference
                                                if a[key] is not None and reference else None)
    task = load_task(base.data, limit=base.limit, data_dir=base.data_dir,
                     context=base.context) if not tasks else next(iter(tasks.values()))
    summary = {"target": spec["target"], "metric": f"val_{task.metric}",
               "seeds": spec["seeds"], "base": asdict(base),
               "budget_epochs": spec.get("budget_epochs"), "arms": arms,
               "load_average_before": list(load_before),
               "load_average_after": list(os.getloadavg()), "runs": runs}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    _write_csv(out / "sweep.csv", runs)
    return summary


def _summarise(arm: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    by_setting: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for r in results:
        by_setting.setdefault((r["batch_size"], r["lr"]), []).append(r)
    clock = arm.get("clock", "measured")
    key = "estimated_s" if clock != "measured" else "seconds"

    def score(setting: tuple[int, float]) -> float:
        med = _median([r[key] for r in by_setting[setting]])
        return math.inf if med is None else med

    def stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"median_s": _median([r["seconds"] for r in rs]),
                "reached": sum(r["step"] is not None for r in rs),
                "diverged": sum(r["diverged"] for r in rs)}

    best_batch, best = min(by_setting, key=score)
    chosen = by_setting[best_batch, best]
    return {"name": arm["name"], "family": arm.get("family", arm["name"]),
            "baseline": arm.get("baseline", False), "clock": clock,
            "set": arm.get("set", {}), "trials": len(by_setting),
            "lrs": arm["lrs"], "best_lr": best,
            "batch_sizes": sorted({b for b, _ in by_setting}), "batch_size": best_batch,
            "reached": sum(r["step"] is not None for r in chosen), "seeds": len(chosen),
            "median_step": _median([r["step"] for r in chosen]),
            "median_epochs": _median([r["epochs"] for r in chosen]),
            "median_s": _median([r["seconds"] for r in chosen]),
            "median_estimated_s": _median([r["estimated_s"] for r in chosen])
            if clock != "measured" else None,
            "median_estimated_by_settle": {
                m: _median([r["estimated_by_settle"].get(m) for r in chosen])
                for m in SETTLE_CLOCKS} if clock != "measured" else None,
            "median_step_ms": 1e3 * statistics.median(r["median_step_s"] for r in chosen),
            "mean_step_parts_ms": {  # the median over the tuned seeds of each run's mean
                k: statistics.median(r["mean_step_parts_ms"][k] for r in chosen)
                for k in chosen[0].get("mean_step_parts_ms", {})},
            "load_average_1min_max": max(r.get("load_average_1min_before", math.nan)
                                         for r in results),
            # every learning rate at the chosen batch size; every setting below
            "by_lr": {f"{lr:g}": stats(rs) for (b, lr), rs in by_setting.items()
                      if b == best_batch},
            "by_setting": [{"batch_size": b, "lr": lr, **stats(rs)}
                           for (b, lr), rs in sorted(by_setting.items())]}


def _write_csv(path: Path, runs: dict[str, list[dict[str, Any]]]) -> None:
    keys = ["arm", "batch_size", "lr", "seed", "step", "epochs", "seconds", "estimated_s",
            "steps_run", "median_step_s", "load_average_1min_before"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for name, rs in runs.items():
            for r in rs:
                writer.writerow({"arm": name, **r})


def table(summary: dict[str, Any]) -> str:
    """The sweep's Markdown table: one row per arm at its tuned batch size and learning
    rate (the grids in brackets)."""
    first = summary["arms"][0]["name"]
    rows = [f"| arm | batch (of grid) | lr (of grid) | reached | steps | epochs | seconds | "
            f"× {first} | estimated s | × {first} (estimated) | estimated s by settle "
            f"model: RC / RC/α_min / t₀+T | ms/step |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]

    def f(v, fmt):
        if v is None:
            return "—"
        return format(v, fmt) if math.isfinite(v) else "n/a (not computable)"

    def settle(arm) -> str:
        values = arm.get("median_estimated_by_settle")
        if not values:
            return "—"
        return " / ".join(f(values.get(m), ".3g") for m in SETTLE_CLOCKS)

    for a in summary["arms"]:
        grid = ", ".join(f"{lr:g}" for lr in a["lrs"])
        batches = a.get("batch_sizes", [a["batch_size"]])
        batch = str(a["batch_size"]) if len(batches) == 1 else \
            f"{a['batch_size']} ({', '.join(map(str, batches))})"
        rows.append(
            f"| {a['name']} | {batch} | {a['best_lr']:g} ({grid}) | "
            f"{a['reached']}/{a['seeds']} | {f(a['median_step'], '.0f')} | "
            f"{f(a['median_epochs'], '.2f')} | {f(a['median_s'], '.1f')} | "
            f"{f(a[f'median_s_vs_{first}'], '.2f')} | {f(a['median_estimated_s'], '.1f')} | "
            f"{f(a[f'median_estimated_s_vs_{first}'], '.2f')} | {settle(a)} | "
            f"{a['median_step_ms']:.1f} |")
    return "\n".join(rows)
