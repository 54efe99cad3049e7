"""Figures from saved result files — never trains. ``thermokfac plot RUN_DIR`` redraws.

Every drawing function reads a run folder (``results.json`` / CSV files written by an
experiment) and writes PNG files next to them, returning their paths.
"""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) if v not in ("", "None") else float("nan") for k, v in row.items()}
                for row in csv.DictReader(fh)]


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
    axes[2].set(xlabel="training time (s)", ylabel=metric.replace("_", " "))
    fig.suptitle(run.name)
    fig.tight_layout()
    path = run / "training.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_compare(folder: Path) -> list[Path]:
    """Validation loss and metric vs (estimated) wall-clock for every curve (Fig. 3)."""
    folder = Path(folder)
    summary = json.loads((folder / "compare.json").read_text())
    metric = summary["metric_key"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for curve in summary["curves"]:
        xs = [p["clock_s"] for p in curve["points"]]
        style = "--" if curve.get("estimated") else "-"
        axes[0].plot(xs, [p["val_loss"] for p in curve["points"]], style, marker=".",
                     label=curve["label"])
        axes[1].plot(xs, [p[metric] for p in curve["points"]], style, marker=".",
                     label=curve["label"])
    axes[0].set(xlabel="wall-clock (s; dashed: estimated)", ylabel="validation loss",
                yscale="log")
    axes[1].set(xlabel="wall-clock (s; dashed: estimated)", ylabel=metric.replace("_", " "))
    axes[1].legend(fontsize=8)
    fig.suptitle(summary["title"], fontsize=10)
    caption = "\n".join(textwrap.wrap(summary["caption"], 150))
    fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.14, 1, 0.95))
    path = folder / "compare.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return [path]


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
                 f"Method 1; mean of {cfg['repeats']} steps, {cfg['threads']} threads)",
                 fontsize=10)
    fig.tight_layout()
    path = folder / "profile.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


DRAWERS = {"compare.json": plot_compare, "steps.csv": plot_train,
           "profile.json": plot_profile}


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
