"""``thermokfac sweep``: time to a target metric, per optimizer, tuned over a learning-rate grid.

A sweep is described by a JSON spec (committed under ``configs/``)::

    {"target": 0.88, "seeds": [0, 1, 2, 3, 4],
     "base": {...TrainConfig fields shared by every arm...},
     "arms": [{"name": "adam", "lrs": [3e-4, 1e-3, 3e-3], "set": {"optimizer": "adam"}},
              {"name": "thermo", "lrs": [0.1], "set": {...}, "clock": "thermo-m2"}]}

Every arm runs every learning rate × seed until the validation metric meets ``target``
(``stop_at``) or the step budget ends; runs go seed by seed, every arm and rate within
a seed, so that a shared machine's speed changes fall on all arms alike. Time to target
is the training clock at the first evaluation that meets it (evaluation itself
excluded). An arm's learning rate is the one with the smallest median time over the
seeds (a seed that misses counts as never), so every arm gets the same tuning budget.
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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .compare import ACCOUNTING, SETTLE_CLOCKS, _clock
from .train import Run, TrainConfig

CLOCKS = ("measured", *ACCOUNTING)


def load_spec(path: Path) -> dict[str, Any]:
    """Read and check a sweep spec (see the module docstring)."""
    spec = json.loads(Path(path).read_text())
    for key in ("target", "seeds", "base", "arms"):
        if key not in spec:
            raise ValueError(f"sweep spec {path} lacks {key!r}")
    names = [arm["name"] for arm in spec["arms"]]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep spec {path}: arm names must be unique, got {names}")
    for arm in spec["arms"]:
        clock = arm.get("clock", "measured")
        if clock not in CLOCKS:
            raise ValueError(f"arm {arm['name']!r}: clock={clock!r} is not one of {CLOCKS}")
        if not arm.get("lrs"):
            raise ValueError(f"arm {arm['name']!r} needs a non-empty 'lrs' list")
    return spec


def time_to_target(run: Run, clock: list[float] | None = None) -> dict[str, float | None]:
    """Step, epochs and seconds (measured, and on ``clock`` if given) of the first
    evaluation that meets the run's ``stop_at``; ``None`` where it never does."""
    for m in run.metrics:
        if m["step"] and run.reached(m):
            step = int(m["step"])
            task, per_step = run.task, run.cfg.batch_size
            n_train = len(task.train[0]) if task.kind == "image" else len(task.train)
            if task.kind == "text":  # the corpus is counted in characters
                per_step *= task.meta["context"]
            return {"step": step, "epochs": step * per_step / n_train,
                    "seconds": m["train_s"],
                    "estimated_s": clock[step - 1] if clock is not None else None}
    return {"step": None, "epochs": None, "seconds": None, "estimated_s": None}


def _median(values: list[float | None]) -> float | None:
    """Median where a missing value (a seed that missed the target) counts as +∞."""
    full = [math.inf if v is None else v for v in values]
    med = statistics.median(full)
    return None if math.isinf(med) else med


def _one(cfg: TrainConfig, out: Path, clock_name: str, task) -> tuple[dict[str, Any], Any]:
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
    kfac = {} if run.pre is None else {  # what was preconditioned, and every event
        "preconditioned": run.pre.layer_names,
        "stats": {k: v for k, v in run.pre.stats.items() if v and k != "kl_clip_scale"}}
    return {"lr": cfg.lr, "seed": cfg.seed, **reached, "estimated_by_settle": by_settle,
            "final": run.metrics[-1], "steps_run": run.step, "median_step_s": step_s,
            "diverged": diverged, **kfac,
            "curve": curve}, run.task


def sweep(spec: dict[str, Any], out: Path, progress: bool = True) -> dict[str, Any]:
    """Run every arm × learning rate × seed of ``spec``; write ``sweep.json``/``.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(spec, indent=2))
    load_before = os.getloadavg()  # a figure is quoted only from a quiet machine
    base = TrainConfig(**{**spec["base"], "stop_at": spec["target"]})
    # seed-major order: the machine's slow and fast spells fall on every arm alike
    jobs = [(arm, lr, seed) for seed in spec["seeds"] for arm in spec["arms"]
            for lr in arm["lrs"]]
    tasks: dict[tuple, Any] = {}  # one data split per (data, seed), shared by every arm
    runs: dict[str, list[dict[str, Any]]] = {arm["name"]: [] for arm in spec["arms"]}
    for arm, lr, seed in tqdm(jobs, desc="sweep runs", disable=not progress):
        cfg = replace(base, **arm.get("set", {}), lr=lr, seed=seed)
        key = (cfg.data, cfg.limit, cfg.context, cfg.seed)
        result, tasks[key] = _one(cfg, out / "runs" / arm["name"] / f"lr{lr:g}_seed{seed}",
                                  arm.get("clock", "measured"), tasks.get(key))
        runs[arm["name"]].append(result)
    arms = [_summarise(arm, runs[arm["name"]], base) for arm in spec["arms"]]
    reference = arms[0]["median_s"]
    for a in arms:
        for key in ("median_s", "median_estimated_s"):
            a[f"{key}_vs_{arms[0]['name']}"] = (a[key] / reference
                                                if a[key] is not None and reference else None)
    metric = next(iter(tasks.values())).metric
    summary = {"target": spec["target"], "metric": f"val_{metric}",
               "seeds": spec["seeds"], "base": asdict(base), "arms": arms,
               "load_average_before": list(load_before),
               "load_average_after": list(os.getloadavg()), "runs": runs}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    _write_csv(out / "sweep.csv", runs)
    return summary


def _summarise(arm: dict[str, Any], results: list[dict[str, Any]],
               base: TrainConfig) -> dict[str, Any]:
    by_lr: dict[float, list[dict[str, Any]]] = {}
    for r in results:
        by_lr.setdefault(r["lr"], []).append(r)
    clock = arm.get("clock", "measured")
    key = "estimated_s" if clock != "measured" else "seconds"

    def score(lr: float) -> float:
        med = _median([r[key] for r in by_lr[lr]])
        return math.inf if med is None else med

    best = min(by_lr, key=score)
    chosen = by_lr[best]
    return {"name": arm["name"], "clock": clock, "set": arm.get("set", {}),
            "lrs": arm["lrs"], "best_lr": best,
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
            "by_lr": {f"{lr:g}": {"median_s": _median([r["seconds"] for r in rs]),
                                  "reached": sum(r["step"] is not None for r in rs),
                                  "diverged": sum(r["diverged"] for r in rs)}
                      for lr, rs in by_lr.items()},
            "batch_size": replace(base, **arm.get("set", {})).batch_size}


def _write_csv(path: Path, runs: dict[str, list[dict[str, Any]]]) -> None:
    keys = ["arm", "lr", "seed", "step", "epochs", "seconds", "estimated_s", "steps_run",
            "median_step_s"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for name, rs in runs.items():
            for r in rs:
                writer.writerow({"arm": name, **r})


def table(summary: dict[str, Any]) -> str:
    """The sweep's Markdown table: one row per arm at its tuned learning rate."""
    first = summary["arms"][0]["name"]
    rows = [f"| arm | batch | lr (of grid) | reached | steps | epochs | seconds | "
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
        rows.append(
            f"| {a['name']} | {a['batch_size']} | {a['best_lr']:g} ({grid}) | "
            f"{a['reached']}/{a['seeds']} | {f(a['median_step'], '.0f')} | "
            f"{f(a['median_epochs'], '.2f')} | {f(a['median_s'], '.1f')} | "
            f"{f(a[f'median_s_vs_{first}'], '.2f')} | {f(a['median_estimated_s'], '.1f')} | "
            f"{f(a[f'median_estimated_s_vs_{first}'], '.2f')} | {settle(a)} | "
            f"{a['median_step_ms']:.1f} |")
    return "\n".join(rows)
