"""Figures from saved result files — never trains. ``thermokfac plot RUN_DIR`` redraws.

Every drawing function reads a run folder (``results.json`` / CSV files written by an
experiment) and writes PNG files next to them, returning their paths.
"""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.colors as mcolors
import matplotlib.text
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) if v not in ("", "None") else float("nan") for k, v in row.items()}
                for row in csv.DictReader(fh)]


def metric_label(metric: str) -> str:
    """Axis label of a validation metric: accuracies in percent."""
    text = metric.replace("_", " ")
    return f"{text} (%)" if metric.endswith("accuracy") else text


def metric_value(metric: str, value: float) -> str:
    """A metric's value as text: accuracies in percent (0.88 → 88%)."""
    return f"{100 * value:g}%" if metric.endswith("accuracy") else f"{value:g}"


def _metric_axis(ax, metric: str) -> None:
    """Label ``ax``'s y axis with ``metric``; accuracies (fractions) shown in percent."""
    ax.set_ylabel(metric_label(metric))
    if metric.endswith("accuracy"):
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, symbol=""))


def figure_texts(fig) -> list[str]:
    """Every text a figure shows (titles, labels, tick labels, legends, annotations)."""
    fig.canvas.draw()
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def _save(fig, path: Path, dpi: int, rect: tuple[float, ...] | None = None) -> list[Path]:
    """Lay out, write and close ``fig``; the written paths."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return [path]


def plot_train(run: Path) -> list[Path]:
    """Training loss per step and validation metrics per evaluation of one run."""
    run = Path(run)
    steps = read_csv(run / "steps.csv")
    metrics = read_csv(run / "metrics.csv")
    metric = next(k for k in metrics[0] if k.startswith("val_") and k != "val_loss")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log")
    axes[1].plot([r["train_s"] for r in metrics], [r["val_loss"] for r in metrics], marker="o")
    axes[1].set(xlabel="training time (s)", ylabel="validation loss")
    axes[2].plot([r["train_s"] for r in metrics], [r[metric] for r in metrics], marker="o")
    axes[2].set(xlabel="training time (s)")
    _metric_axis(axes[2], metric)
    fig.suptitle(run.name)
    return _save(fig, run / "training.png", 120)


def plot_compare(folder: Path) -> list[Path]:
    """Validation loss and metric vs (estimated) wall-clock for every curve (Fig. 3).

    When the clocks span more than two orders of magnitude (the settle models) the
    clock axis is logarithmic, and the step-0 points (clock 0, which a log axis cannot
    show) are left out of both panels, so they neither stretch the value axes nor draw
    segments from the axis edge; the axis label says so.
    """
    folder = Path(folder)
    summary = json.loads((folder / "compare.json").read_text())
    metric = summary["metric_key"]
    clocks = [p["clock_s"] for c in summary["curves"] for p in c["points"] if p["clock_s"] > 0]
    log_clock = bool(clocks) and max(clocks) > 100 * min(clocks)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for curve in summary["curves"]:
        points = [p for p in curve["points"] if p["clock_s"] > 0 or not log_clock]
        xs = [p["clock_s"] for p in points]
        style = "--" if curve.get("estimated") else "-"
        axes[0].plot(xs, [p["val_loss"] for p in points], style, marker=".",
                     label=curve["label"])
        axes[1].plot(xs, [p[metric] for p in points], style, marker=".",
                     label=curve["label"])
    xlabel = "wall-clock (s; dashed: estimated)" + \
        ("; log scale, step 0 not shown" if log_clock else "")
    axes[0].set(xlabel=xlabel, ylabel="validation loss", yscale="log")
    axes[1].set(xlabel=xlabel)
    _metric_axis(axes[1], metric)
    if log_clock:  # settle models orders of magnitude apart
        for ax in axes:
            ax.set_xscale("log")
    fig.set_size_inches(12, 5.6)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", ncol=2,
               fontsize=7, bbox_to_anchor=(0.5, 0.115), frameon=False)  # off the data
    fig.suptitle(summary["title"], fontsize=10)
    caption = "\n".join(textwrap.wrap(summary["caption"], 150))
    fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom")
    return _save(fig, folder / "compare.png", 130, rect=(0, 0.27, 1, 0.95)) + \
        plot_spectra(folder)


def plot_spectra(folder: Path) -> list[Path]:
    """κ = α_max/α_min of every device matrix over training (one line per layer and
    factor), from the ``spectra.csv`` of each thermodynamic run in a compare folder."""
    folder = Path(folder)
    runs = sorted(p.parent for p in folder.glob("*/spectra.csv"))
    if not runs:
        return []
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        with open(run / "spectra.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for key in dict.fromkeys((r["layer"], r["factor"]) for r in rows):
            mine = [r for r in rows if (r["layer"], r["factor"]) == key]
            ax.plot([float(r["step"]) for r in mine], [float(r["kappa"]) for r in mine],
                    marker=".", lw=0.9, label=f"{key[0] or '<root>'} {key[1].upper()}")
        ax.set(xlabel="step", ylabel="κ = α_max / α_min of the device matrix",
               yscale="log", title=run.name)
        ax.legend(fontsize=7)
    fig.suptitle("κ = α_max/α_min of each device matrix per layer and factor (after damping "
                 "and scaling; α_min as the simulation used it: the damping bound unless "
                 "alpha_min_source='spectrum')", fontsize=9)
    return _save(fig, folder / "spectra.png", 120)


def plot_profile(folder: Path) -> list[Path]:
    """Stacked time of the four parts of a K-FAC update per sweep (Fig. 2)."""
    folder = Path(folder)
    result = json.loads((folder / "profile.json").read_text())
    panels = [("mlp_width", "width", f"MLP, depth {result['config']['depth']}: width n"),
              ("gpt_embd", "n_embd", "GPT: embedding width n"),
              ("gpt_vocab", "vocab", "GPT: vocabulary size")]
    parts = ("gradient", "curvature", "inversion", "update")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, xkey, title) in zip(axes, panels):
        rows = result[key]
        labels = [str(r[xkey]) for r in rows]
        bottom = [0.0] * len(rows)
        for part in parts:
            values = [r[part] for r in rows]
            ax.bar(labels, values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set(title=title, ylabel="seconds per step", xlabel=xkey)
    axes[0].legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"K-FAC update time (factors and inverses every step, {cfg['solver']}, "
                 f"Method 1; mean of {cfg['repeats']} steps, "
                 f"{cfg.get('device', str(cfg['threads']) + ' threads')})",
                 fontsize=10)
    return _save(fig, folder / "profile.png", 120)


def plot_profile_nproc(folder: Path) -> list[Path]:
    """Stacked parts of the step per width, one bar per process count (Table 4 analogue)."""
    folder = Path(folder)
    result = json.loads((folder / "profile_nproc.json").read_text())
    rows, nprocs = result["rows"], result["config"]["nprocs"]
    widths = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bar = 0.8 / len(nprocs)
    for j, n in enumerate(nprocs):
        for i, w in enumerate(widths):
            r = next(r for r in rows if r["model"] == w and r["nproc"] == n)
            bottom, x = 0.0, i + (j - (len(nprocs) - 1) / 2) * bar
            for k, part in enumerate(("gradient", "curvature", "inversion", "update")):
                ax.bar(x, r[part], bar * 0.9, bottom=bottom, color=colors[k],
                       label=part if (i, j) == (0, 0) else None)
                bottom += r[part]
            ax.text(x, bottom, f"{n}p\n{100 * r['inversion_share']:.0f}%", ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(widths)), [str(w) for w in widths])
    cfg = result["config"]
    ax.set(xlabel="model (mlp-WIDTH: depth " + str(cfg["depth"]) + ")",
           ylabel="seconds per step",
           title=f"MLP batch {cfg['batch']}: 1 vs more processes "
                 f"({cfg['strategy']}, {cfg['total_threads']} threads in all; label: "
                 "inversion share)")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    return _save(fig, folder / "profile_nproc.png", 130)


def plot_scaling(folder: Path) -> list[Path]:
    """Measured digital times and modelled SPU times vs n (log–log); held memory vs n."""
    folder = Path(folder)
    result = json.loads((folder / "scaling.json").read_text())
    rows, exps = result["rows"], result["exponents"]
    ns = [r["n"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, label in (("cholesky_inverse_s", "Cholesky + inverse"),
                       ("cholesky_solve_s", "Cholesky + n solves"),
                       ("cg_solve_s", "CG, n solves")):
        axes[0].loglog(ns, [r[key] for r in rows], marker="o",
                       label=f"{label} (measured, slope {exps[key]:.2f})")
    for name, style in (("rc", ":"), ("rc_over_alpha_min", "--")):
        axes[0].loglog(ns, [r["model_s"][name] for r in rows], style, marker="x",
                       label=f"SPU model, settle {name} (model)")
    axes[0].set(xlabel="n", ylabel="seconds", title="time per factor: n×n, n right-hand sides")
    axes[0].legend(fontsize=7)
    axes[1].loglog(ns, [r["held_bytes_matrix"] / 2**20 for r in rows], marker="o",
                   label="factor-forming (K-FAC with EMA)")
    axes[1].loglog(ns, [r["held_bytes_rows"] / 2**20 for r in rows], marker="o",
                   label=f"resistor-array rows (batch {result['config']['batch']})")
    axes[1].set(xlabel="n", ylabel="MB held", title="memory of a width-n layer (measured)")
    axes[1].legend(fontsize=8)
    for ax in axes:  # label the measured sizes only (no overlapping minor labels)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    return _save(fig, folder / "scaling.png", 120)


def plot_quantize(folder: Path) -> list[Path]:
    """Validation metric vs step for each precision, mean ± one std over seeds (Fig. 4)."""
    folder = Path(folder)
    result = json.loads((folder / "quantize.json").read_text())
    bits = result["config"]["bits"]
    curves, metric = result["curves"], result["metric"]
    colours = plt.cm.viridis([i / max(1, len(bits)) for i in range(len(bits) + 1)])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, mode in zip(axes, ("input", "output")):
        names = [f"{mode}-{b}" for b in bits] + ["fp32"]
        labels = [f"K-FAC, {b}-bit {mode}" for b in bits] + ["K-FAC, fp32"]
        for name, label, colour in zip(names, labels, colours):
            c = curves[name]
            lo = [m - s for m, s in zip(c["mean"], c["std"])]
            hi = [m + s for m, s in zip(c["mean"], c["std"])]
            ax.plot(c["step"], c["mean"], color=colour, label=label)
            ax.fill_between(c["step"], lo, hi, color=colour, alpha=0.2)
        c = curves["adam"]
        ax.plot(c["step"], c["mean"], "k--", label="Adam")
        ax.fill_between(c["step"], [m - s for m, s in zip(c["mean"], c["std"])],
                        [m + s for m, s in zip(c["mean"], c["std"])], color="k", alpha=0.1)
        ax.set(title=f"{mode} quantization", xlabel="step")
        _metric_axis(ax, metric)
        ax.legend(fontsize=7)
    fig.suptitle(result["title"], fontsize=10)
    return _save(fig, folder / "quantize.png", 120)


def plot_plan(folder: Path) -> list[Path]:
    """Predicted speed-up of the device over digital K-FAC vs bits and RC, one panel per
    settle model (a panel without the factors' spectra says so instead of a curve)."""
    folder = Path(folder)
    result = json.loads((folder / "plan.json").read_text())
    grid = result["grid"]
    bits = sorted({g["bits"] for g in grid})
    rcs = sorted({g["rc_us"] for g in grid})
    models = list(grid[0]["speedup_by_settle"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True)
    for ax, model in zip(axes, models):
        title = model + (" (paper's convention)" if model == "rc" else "")
        for rc in rcs:
            ys = [next(g["speedup_by_settle"][model] for g in grid
                       if g["bits"] == b and g["rc_us"] == rc) for b in bits]
            if all(y is not None for y in ys):
                ax.plot(bits, ys, marker="o", label=f"RC = {rc:g} µs")
        if ax.lines:
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "n/a: " + result["alpha_min_source"], ha="center",
                    va="center", wrap=True, fontsize=8, transform=ax.transAxes)
        ax.set(xlabel="bits per value", title=f"settle: {title}", yscale="log")
    axes[0].set_ylabel("predicted speed-up of the K-FAC work")
    fig.suptitle(f"{result['model']} on {result['data']}: {result['spus_needed']} SPUs")
    return _save(fig, folder / "plan.png", 120)


#: How the settle models are named on the figures.
SETTLE_LABELS = {"rc": "RC", "rc_over_alpha_min": "RC/α_min", "target_error": "t₀ + T"}


def _tuned_runs(summary: dict[str, Any], arm: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of ``arm`` at its best learning rate and batch size (one per seed)."""
    return [r for r in summary["runs"][arm["name"]] if r["lr"] == arm["best_lr"]
            and r.get("batch_size", arm["batch_size"]) == arm["batch_size"]]


def _sweep_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One bar per measured arm and one per settle model of an estimated arm: its
    label, median seconds (None: missed the target) and the seeds' seconds."""
    rows = []
    for i, arm in enumerate(summary["arms"]):
        chosen = _tuned_runs(summary, arm)
        setting = (f"batch {arm['batch_size']}, lr {arm['best_lr']:g}, "
                   f"{arm['reached']}/{arm['seeds']} seeds")
        by_settle = arm.get("median_estimated_by_settle")
        if arm["clock"] == "measured" or not by_settle:
            rows.append({"arm": i, "label": f"{arm['name']} ({setting})",
                         "median": arm["median_s"], "estimated": False,
                         "seeds": [r["seconds"] for r in chosen if r["seconds"] is not None]})
            continue
        for model, median in by_settle.items():
            seeds = [(r.get("estimated_by_settle") or {}).get(model) for r in chosen]
            rows.append({"arm": i, "label": f"{arm['name']}, estimated, settle "
                         f"{SETTLE_LABELS.get(model, model)} ({setting})", "median": median,
                         "estimated": True, "seeds": [v for v in seeds if v is not None]})
    return rows


def plot_sweep(folder: Path) -> list[Path]:
    """Time to target per arm at its tuned setting — every settle model's clock of an
    estimated (thermodynamic) arm as a bar of its own, dots for the seeds — and the
    tuned runs' curves (estimated arms on the ``rc`` clock, as labelled)."""
    folder = Path(folder)
    summary = json.loads((folder / "sweep.json").read_text())
    metric, target = summary["metric"], summary["target"]
    if target is None:
        return plot_pilot(folder)
    rows = _sweep_rows(summary)
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.9 + 0.45 * max(len(rows), 6)),
                             gridspec_kw={"width_ratios": [1.1, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for y, row in enumerate(rows):
        color = colors[row["arm"] % len(colors)]
        axes[0].barh(y, row["median"] or 0.0, color=color, alpha=0.6,
                     hatch="//" if row["estimated"] else None)
        axes[0].scatter(row["seeds"], [y] * len(row["seeds"]), color="k", s=10, zorder=3)
        if row["median"] is None:
            axes[0].text(0, y, " missed the target", va="center", fontsize=7)
    axes[0].set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
    axes[0].invert_yaxis()
    values = [v for r in rows for v in [r["median"], *r["seeds"]] if v]
    if values and max(values) > 100 * min(values):
        axes[0].set_xscale("log")
    hatched = " (hatched: estimated)" if any(r["estimated"] for r in rows) else ""
    axes[0].set(xlabel=f"seconds to {metric.replace('_', ' ')} "
                       f"{metric_value(metric, target)}{hatched}")
    for i, arm in enumerate(summary["arms"]):
        chosen = _tuned_runs(summary, arm)
        estimated = arm["clock"] != "measured"
        key = "estimated_s" if estimated else "seconds"
        label = f"{arm['name']} (estimated, settle RC)" if estimated else arm["name"]
        for j, r in enumerate(chosen):
            xs = [p[key] for p in r["curve"]]
            axes[1].plot(xs, [p[metric] for p in r["curve"]], "--" if estimated else "-",
                         color=colors[i % len(colors)], lw=0.9,
                         label=label if j == 0 else None)
    axes[1].axhline(target, color="grey", lw=0.8, ls=":")
    if metric.endswith("accuracy"):  # zoom on the approach to the target
        axes[1].set_ylim(max(0.0, target - 0.15), min(1.0, target + 0.05))
    else:
        axes[1].set_ylim(0.5 * target, 2.5 * target)
    axes[1].set(xlabel="training clock (s; dashed: estimated)")
    _metric_axis(axes[1], metric)
    axes[1].legend(fontsize=7)
    base = summary["base"]
    models = dict.fromkeys(a.get("set", {}).get("model", base["model"]) for a in summary["arms"])
    fig.suptitle(f"{' and '.join(models)} on {base['data']}: time to "
                 f"{metric.replace('_', ' ')} {metric_value(metric, target)} "
                 f"(median of {len(summary['seeds'])} seeds, each arm at its best batch and lr)",
                 fontsize=10)
    return _save(fig, folder / "sweep.png", 130)


def plot_pilot(folder: Path) -> list[Path]:
    """A pilot sweep's (``"target": null``) ``sweep.png``: every run's validation curve
    over its steps, one colour per arm, and the target the pilot sets — the best
    baseline setting's median metric at half the budget (:func:`.score.pilot_target`)."""
    from .experiments.score import pilot_target

    folder = Path(folder)
    summary = json.loads((folder / "sweep.json").read_text())
    metric = summary["metric"]
    found = pilot_target(summary)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    budget = 0
    for i, arm in enumerate(summary["arms"]):
        best = found["arms"].get(arm["name"])
        labelled = False
        for r in summary["runs"][arm["name"]]:
            budget = max(budget, r["steps_budget"])
            tuned = best is not None and (r["lr"], r["batch_size"]) == (best["lr"],
                                                                       best["batch_size"])
            label = None
            if tuned and not labelled:  # one legend entry per arm: its best setting
                label = f"{arm['name']} (best: batch {r['batch_size']}, lr {r['lr']:g})"
                labelled = True
            ax.plot([p["step"] for p in r["curve"]], [p[metric] for p in r["curve"]],
                    color=colors[i % len(colors)], lw=1.2 if tuned else 0.5,
                    alpha=1.0 if tuned else 0.35, label=label)
    ax.axvline(found["fraction"] * budget, color="grey", lw=0.8, ls=":")
    ax.axhline(found["target"], color="k", lw=0.8, ls="--",
               label=f"target {metric_value(metric, found['target'])} ({found['arm']})")
    if metric.endswith("accuracy"):  # zoom on the approach to the target
        ax.set_ylim(max(0.0, found["target"] - 0.15), min(1.0, found["target"] + 0.03))
    ax.set_xlabel(f"step (dotted: {found['fraction']:g} of the budget)")
    _metric_axis(ax, metric)
    ax.legend(fontsize=7)
    base = summary["base"]
    ax.set_title(f"Pilot on {base['model']}/{base['data']}: the baselines' curves and the "
                 f"target (best median at {found['fraction']:g} of the budget)", fontsize=9)
    return _save(fig, folder / "sweep.png", 130)


def plot_breakeven(folder: Path) -> list[Path]:
    """Speed-up of the device's Method 2 step over the digital one, over RC × link
    bandwidth: rows settle models, columns bits; the break-even contour and the paper's
    point."""
    folder = Path(folder)
    result = json.loads((folder / "breakeven.json").read_text())
    models = list(dict.fromkeys(p["settle_model"] for p in result["panels"]))
    bits = list(dict.fromkeys(p["bits"] for p in result["panels"]))
    fig, axes = plt.subplots(len(models), len(bits), figsize=(5.2 * len(bits),
                                                              3.6 * len(models)),
                             squeeze=False, sharex=True, sharey=True)
    rcs, links = np.array(result["rcs_us"]), np.array(result["links_gbps"])
    norm = mcolors.TwoSlopeNorm(vmin=-4, vcenter=0, vmax=1)
    for panel in result["panels"]:
        ax = axes[models.index(panel["settle_model"])][bits.index(panel["bits"])]
        speed = np.log10(np.array(panel["speedup"]))
        mesh = ax.pcolormesh(rcs, links, np.clip(speed, -4, 1), cmap="RdBu", norm=norm,
                             shading="auto")
        if speed.min() < 0 < speed.max():
            ax.contour(rcs, links, speed, levels=[0.0], colors="k", linewidths=1.2)
        paper = result["paper_point"]
        if panel["bits"] == paper["bits"]:
            ax.plot(paper["rc_us"], paper["link_gbps"], "k*", ms=11)
        ax.set(xscale="log", yscale="log",
               title=f"settle {panel['settle_model']}, {panel['bits']} bits "
                     f"(best ×{10 ** speed.max():.3g})")
        ax.title.set_fontsize(9)
    for ax in axes[-1]:
        ax.set_xlabel("RC (µs)")
    for row in axes:
        row[0].set_ylabel("link (Gb/s)")
    fig.colorbar(mesh, ax=axes, label="log₁₀ speed-up = log₁₀(digital step / device step)")
    fig.suptitle(f"Thermodynamic K-FAC (Method 2) vs digital on {result['model']} / "
                 f"{result['data']}, batch {result['batch']}, {result['n_spus']} SPU(s): "
                 "black line = break-even, ★ = the paper's device", fontsize=10)
    fig.savefig(folder / "breakeven.png", dpi=120)
    plt.close(fig)
    return [folder / "breakeven.png"]




def profile_curve(ratios: list[float], tau_max: float) -> tuple[list[float], list[float]]:
    """The performance profile ρ(τ) of one optimizer's ratios as a step function from
    τ = 1 to ``tau_max``: (τ values, ρ values), ρ jumping at each ratio below τ_max."""
    n = len(ratios)
    taus, rhos = [1.0], [sum(r <= 1.0 for r in ratios) / n]
    for r in sorted(r for r in ratios if 1.0 < r < tau_max):
        taus += [r, r]
        rhos += [rhos[-1], sum(x <= r for x in ratios) / n]
    return [*taus, tau_max], [*rhos, rhos[-1]]


def plot_score(folder: Path) -> list[Path]:
    """``score.png``: each optimizer's performance profile ρ(τ) (the share of workloads
    it reaches the target within τ times the fastest optimizer's time), its score in
    the legend."""
    result = json.loads((Path(folder) / "score.json").read_text())
    tau_max = result["tau_max"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ranked = sorted(result["families"].items(), key=lambda kv: -kv[1]["score"])
    for name, fam in ranked:
        taus, rhos = profile_curve(fam["ratios"], tau_max)
        ax.plot(taus, rhos, label=f"{name} (score {fam['score']:.3f})", linewidth=1.8)
    ax.set_xlim(1.0, tau_max)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ: time to target ÷ the fastest optimizer's")
    ax.set_ylabel("share of workloads within τ")
    names = ", ".join(w["name"] for w in result["workloads"])
    ax.set_title("\n".join(textwrap.wrap(f"Performance profiles over {names}", 60)),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, Path(folder) / "score.png", dpi=120)


def plot_frontier(folder: Path) -> list[Path]:
    """``frontier.png``: device time per step (the ``target_error`` clock, log scale)
    against the final validation metric (mean over seeds, bars to the seeds' range) and
    against the time to target on the estimated clock, one colour per method, each
    method's Pareto front as a line, digital K-FAC and the other references as
    horizontal lines, the paper's RC point circled and the cheapest schedule within the
    tolerance of digital K-FAC starred."""
    result = json.loads((Path(folder) / "frontier.json").read_text())
    metric, clock = result["metric"], result["axis_clock"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    points = [p for p in result["points"] if p["device_ms_per_step"]]
    methods = sorted({p["method"] for p in points})
    panels = (("metric_mean", f"final {metric.replace('_', ' ')} (mean over seeds)"),
              ("time_to_target_s", "time to target, estimated clock (s, median)"))
    for ax, (key, label) in zip(axes, panels):
        for i, method in enumerate(methods):
            color = colors[i % len(colors)]
            mine = [p for p in points if p["method"] == method and p[key] is not None]
            xs = [p["device_ms_per_step"][clock] for p in mine]
            ys = [p[key] for p in mine]
            if key == "metric_mean":
                low = [p[key] - p["metric_min"] for p in mine]
                high = [p["metric_max"] - p[key] for p in mine]
                ax.errorbar(xs, ys, yerr=[low, high], fmt="o", color=color, ms=4,
                            capsize=2, label=f"Method {'1' if method == 'inverse' else '2'}")
            else:
                ax.scatter(xs, ys, color=color, s=16,
                           label=f"Method {'1' if method == 'inverse' else '2'}")
            front_names = result["fronts"][method]["metric" if key == "metric_mean"
                                                     else "time_to_target"]
            front = sorted((p for p in mine if p["name"] in front_names),
                           key=lambda p: p["device_ms_per_step"][clock])
            ax.plot([p["device_ms_per_step"][clock] for p in front], [p[key] for p in front],
                    color=color, linewidth=1.2)
        for j, (name, ref) in enumerate(result["references"].items()):
            if ref[key] is not None:
                ax.axhline(ref[key], color="0.3", linestyle=("--", ":", "-.")[j % 3],
                           linewidth=1, label=f"{name} ({ref['clock']} clock)")
        for mark, style in ((result["paper_point"], {"s": 140, "facecolors": "none",
                                                     "edgecolors": "k"}),
                            (result["cheapest"], {"s": 160, "marker": "*", "color": "gold",
                                                  "edgecolors": "k"})):
            found = [p for p in points if p["name"] == mark and p[key] is not None]
            for p in found:
                ax.scatter([p["device_ms_per_step"][clock]], [p[key]], zorder=4, **style)
        ax.set_xscale("log")
        ax.set_xlabel("simulated device time per step (ms, burn-in + window of each solve)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(result["target"], color="tab:red", linewidth=0.8, alpha=0.6,
                    label="target")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("\n".join(textwrap.wrap(
        f"Thermodynamic K-FAC's accuracy–device-time frontier (circle: the paper's RC "
        f"timing; star: the cheapest schedule within {result['tolerance']:g} of digital "
        "K-FAC)", 110)), fontsize=10)
    return _save(fig, Path(folder) / "frontier.png", dpi=120, rect=(0, 0, 1, 0.93))


DRAWERS = {"breakeven.json": plot_breakeven, "sweep.json": plot_sweep,
           "profile_nproc.json": plot_profile_nproc,
           "compare.json": plot_compare, "steps.csv": plot_train,
           "profile.json": plot_profile, "scaling.json": plot_scaling,
           "quantize.json": plot_quantize, "plan.json": plot_plan,
           "score.json": plot_score, "frontier.json": plot_frontier}


def redraw(folder: Path) -> list[Path]:
    """Redraw every figure whose result files are in ``folder`` (and its run folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a run folder")
    written: list[Path] = []
    for marker, draw in DRAWERS.items():
        for found in sorted(folder.rglob(marker)):
            written += draw(found.parent)
    if not written:
        raise FileNotFoundError(f"no result files in {folder} (looked for {list(DRAWERS)})")
    return written
