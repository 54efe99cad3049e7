"""``thermokfac compare`` (paper Fig. 3): baseline vs K-FAC vs Thermodynamic K-FAC.

Runs, on one workload: the baseline optimizer; K-FAC with a digital solver; and
Thermodynamic K-FAC — the same K-FAC on the simulated device — once with Method 2 and
once with Method 1. Validation loss and metric are plotted against wall-clock. The
thermodynamic curves' clock is an estimate, per step:

    Method 2: measured step − (prepare + time inside both solve banks) + modelled device time
    Method 1: measured step − (inversion) + modelled device time

i.e. the digital work the device takes over (here: its simulation) is replaced by the
hardware model's time for it; gradient, curvature, the rest of computing U (forming DΘ,
checks, the KL clip, writing ``.grad``) and the base optimizer stay measured.
The share of the digital K-FAC step that each accounting removes is reported (the
analogue of the paper's Table 4 inversion share).
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

from ..enums import Method
from .train import Run, TrainConfig

ACCOUNTING = {
    "thermo-m2": ("inversion_s", "solve_s"),
    "thermo-m1": ("inversion_s",),
}


#: Settle models of the estimated clocks (App. E), the step column each is read from,
#: and how a legend names it.
SETTLE_CLOCKS = {
    "rc": ("modeled_rc_s", "settle RC, the paper's convention"),
    "rc_over_alpha_min": ("modeled_rc_over_alpha_min_s", "settle RC/α_min"),
    "target_error": ("modeled_target_error_s", "settle t₀ + T of the target error"),
}


def _clock(steps: list[dict[str, float]], removed: tuple[str, ...],
           modeled: str = "modeled_s") -> list[float]:
    """Cumulative clock: measured step − the ``removed`` parts + the ``modeled`` device
    time (a step column: ``modeled_s``, or one settle model's)."""
    out, total = [], 0.0
    for s in steps:
        total += s["wall_s"] - sum(s[k] for k in removed) + (s[modeled] if removed else 0)
        out.append(total)
    return out


def _curve(label: str, run: Run, removed: tuple[str, ...], metric: str,
           settle: str | None = None) -> dict[str, Any]:
    modeled = SETTLE_CLOCKS[settle][0] if settle else "modeled_s"
    clock = _clock(run.steps, removed, modeled)
    points = [{"step": m["step"], "clock_s": clock[int(m["step"]) - 1] if m["step"] else 0.0,
               "val_loss": m["val_loss"], metric: m[metric]} for m in run.metrics]
    return {"label": label, "estimated": bool(removed), "settle_model": settle,
            "points": points, "run": run.out.name}


def _share(steps: list[dict[str, float]], parts: tuple[str, ...]) -> float:
    wall = sum(s["wall_s"] for s in steps)
    return sum(s[k] for s in steps for k in parts) / wall if wall else 0.0


#: The device as the paper's RC timing charges it: settled after one RC and read at
#: once (a window of 10⁻³ RC stands for the instantaneous read).
RC_TIMED = {"t0_rc": 1.0, "window_rc": 1e-3}


def compare(base: TrainConfig, out: Path, baseline_optimizer: str, baseline_lr: float,
            methods: tuple[str, ...] = ("m2", "m1"), progress: bool = True,
            rc_timed: bool = False) -> dict[str, Any]:
    """Run every curve of the comparison into ``out`` and write ``compare.json``.

    With ``rc_timed``, one more Method 2 run simulates the device only for the time the
    RC convention charges (:data:`RC_TIMED`): the accuracy that timing really buys.
    """
    out = Path(out)
    load_before = os.getloadavg()  # figures are quoted only from a quiet start (< 0.5)
    configs = {
        "baseline": replace(base, kfac=False, optimizer=baseline_optimizer, lr=baseline_lr),
        "kfac": replace(base, kfac=True, solver="cholesky"),
    }
    for m in methods:
        configs[f"thermo-{m}"] = replace(base, kfac=True, solver="thermodynamic",
                                         method="solve" if m == "m2" else "inverse")
    if rc_timed:
        configs["thermo-m2-rc-timed"] = replace(base, kfac=True, solver="thermodynamic",
                                                method="solve", **RC_TIMED)
    runs = {name: Run(cfg, out / name) for name, cfg in configs.items()}
    task = runs["baseline"].task
    for name, run in runs.items():
        run.train(progress=progress, label=f"compare: {name}")
    metric = next(k for k in runs["baseline"].metrics[0] if k.startswith("val_")
                  and k != "val_loss")
    kfac_method = runs["kfac"].pre.config.method  # the solver's default when not given
    labels = {"baseline": f"{baseline_optimizer} (lr {baseline_lr:g})",
              "kfac": f"K-FAC + {base.optimizer} (cholesky, {kfac_method.value})",
              "thermo-m2": "Thermodynamic K-FAC, Method 2 (estimated)",
              "thermo-m1": "Thermodynamic K-FAC, Method 1 (estimated)",
              "thermo-m2-rc-timed": "Thermodynamic K-FAC, Method 2, device run only as long as "
                                    "RC charges (t₀ = 1 RC, one read)"}
    curves = []
    for name, run in runs.items():
        if name == "thermo-m2-rc-timed":  # its accuracy, on the clock RC charges
            curves.append(_curve(labels[name], run, ACCOUNTING["thermo-m2"], metric, "rc"))
            continue
        if name not in ACCOUNTING:
            curves.append(_curve(labels[name], run, (), metric))
            continue
        for settle, (key, text) in SETTLE_CLOCKS.items():  # one estimated clock per model
            note = "" if all(math.isfinite(s[key]) for s in run.steps) else (
                " — not computable for some steps (α_min ≤ 0 or no burn-in), clock is NaN")
            curves.append(_curve(f"{labels[name]}, {text}{note}", run, ACCOUNTING[name],
                                 metric, settle))
    kfac_steps = runs["kfac"].steps
    hw = runs["thermo-" + methods[0]].pre.solver.hardware if methods else None
    summary = {
        "title": f"{base.model} on {task.name}: {labels['baseline']} vs K-FAC vs "
                 "Thermodynamic K-FAC",
        "metric_key": metric,
        "curves": curves,
        # Measured in the digital run, so only for the method it ran: with Method 1 the
        # time of digital solves was never spent.
        "share_removed": {"method_1 (inversion)": _share(kfac_steps, ("inversion_s",))}
        if kfac_method is Method.INVERSE else {
            "method_2 (prepare + solves)": _share(kfac_steps, ("inversion_s", "solve_s"))},
        "final": {name: run.metrics[-1] for name, run in runs.items()},
        "train_s": {name: run.train_s for name, run in runs.items()},
        "config": asdict(base),
        "caption": _caption(hw, base),
        "median_step_ms": {name: 1e3 * statistics.median(s["wall_s"] for s in run.steps[1:])
                           for name, run in runs.items() if len(run.steps) > 1},
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    with open(out / "compare.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["curve", "step", "clock_s", "val_loss", metric])
        for c in curves:
            for p in c["points"]:
                writer.writerow([c["label"], p["step"], p["clock_s"], p["val_loss"], p[metric]])
    return summary


def _caption(hw, cfg: TrainConfig) -> str:
    if hw is None:
        return ""
    return (f"Estimated clocks: measured step − work the device takes over (Method 2: prepare"
            f" + time inside both solve banks; Method 1: inversion) + modelled device time, "
            f"one curve per settle model: RC (the paper's convention, which charges far less "
            f"device time than the simulated device needed for the accuracy plotted), "
            f"RC/α_min, and the burn-in t₀ and window T the simulation used (α_min as the "
            f"simulation used it). Hardware model:"
            f" RC = {hw.rc_s * 1e6:g} µs, {hw.load_bits}-bit input, {hw.read_bits}-bit "
            f"output, {hw.link_gbps:g} Gb/s link ({'shared' if hw.shared_link else 'per SPU'}),"
            f" {hw.n_spus} SPU(s). Simulated device: "
            f"{cfg.backend} OU, input {_bits(cfg.input_bits)}, output "
            f"{_bits(cfg.output_bits)}, target error {cfg.target_error:g}.")


def _bits(bits: int | None) -> str:
    return "not quantized" if bits is None else f"{bits} bits"


def table(summary: dict[str, Any]) -> str:
    metric = summary["metric_key"]
    rows = [f"| curve | train s (estimated for thermodynamic) | val loss | {metric} |",
            "|---|---:|---:|---:|"]
    for c in summary["curves"]:
        last = c["points"][-1]
        clock = f"{last['clock_s']:.1f}" if math.isfinite(last["clock_s"]) else \
            "n/a (settle model not computable)"
        rows.append(f"| {c['label']} | {clock} | {last['val_loss']:.4f} | "
                    f"{last[metric]:.4f} |")
    shares = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in summary["share_removed"].items())
    return "\n".join(rows) + f"\n\nshare of the digital K-FAC step the device takes over: {shares}"
