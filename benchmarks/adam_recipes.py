"""K-FAC in front of Adam-type optimizers: the base alone against K-FAC + the base, at the
base's own rate, per step.

Three workloads (the README's Fashion-MNIST MLP, a small ResNet with BatchNorm on
Fashion-MNIST, a character GPT on Shakespeare), each trained for a fixed number of steps
from the same initialisation and batches; the score is the mean training loss over the
last 10% of the steps, and the validation loss at the end.

``--pilot``: one seed of AdamW alone and of K-FAC + AdamW under several recipes
(grafting, first preconditioned step) at the absolute damping 10⁻³.
``--grid``: one seed of K-FAC + AdamW with the damping relative to each factor's mean
eigenvalue (λ, grafting, first preconditioned step), which chose the defaults.
``--tune``: one seed of Adam, AdamW and NAdamW alone at four rates (is 10⁻³ their best
rate on these budgets?).
``--final``: three seeds of Adam, AdamW and NAdamW, alone and with K-FAC at its
defaults, at the rate 10⁻³; ``--final --tuned``: the same at each base's best rate of
``--tune`` on each workload (its score: the same training loss).

Run by hand:  python benchmarks/adam_recipes.py --pilot      (≈ 10 minutes on 2 cores)
              python benchmarks/adam_recipes.py --grid       (≈ 15 minutes)
              python benchmarks/adam_recipes.py --tune       (≈ 5 minutes)
              python benchmarks/adam_recipes.py --final      (≈ 30 minutes)
              python benchmarks/adam_recipes.py --final --tuned   (≈ 30 minutes)
Add ``--resume`` to keep the runs an interrupted sitting already wrote.
Writes ``benchmarks/results/adam_recipes_<mode>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from thermokfac.experiments.train import Run, TrainConfig

HERE = Path(__file__).parent
WORKLOADS = {
    "fmnist-mlp": {"data": "fashion-mnist", "model": "mlp", "width": 512, "depth": 2,
                   "batch_size": 512, "steps": 240},
    "fmnist-resnet": {"data": "fashion-mnist", "model": "resnet", "width": 8, "depth": 1,
                      "batch_size": 128, "steps": 200},
    "shakespeare-gpt": {"data": "shakespeare", "model": "gpt", "width": 64, "depth": 2,
                        "heads": 4, "context": 64, "batch_size": 64, "steps": 200},
}
BASE_LR = {"adam": 1e-3, "adamw": 1e-3, "nadamw": 1e-3}
TUNE_LR = (3e-4, 1e-3, 3e-3, 1e-2)  # --tune: the base alone, one seed, at each rate
PILOT = {  # name: K-FAC settings (None: the base alone)
    "adamw": None,
    "kfac none/0": {"grafting": "none", "start_preconditioning_step": 0},
    "kfac gradient/0": {"grafting": "gradient", "start_preconditioning_step": 0},
    "kfac none/10": {"grafting": "none", "start_preconditioning_step": 10},
    "kfac gradient/10": {"grafting": "gradient", "start_preconditioning_step": 10},
    "kfac gradient/30": {"grafting": "gradient", "start_preconditioning_step": 30},
}
GRID = {f"kfac relative {lam:g} {graft}/{start}": {
    "damping": lam, "damping_split": "relative", "grafting": graft,
    "start_preconditioning_step": start}
    for lam, start in ((0.1, 0), (0.3, 0), (1.0, 0), (3.0, 0), (1.0, 10))
    for graft in ("none", "gradient")}
# every pilot and grid arm sets damping (and split) itself: the pilot's absolute 1e-3
for arm in PILOT.values():
    if arm is not None:
        arm.update(damping=1e-3, damping_split="equal")


def run(workload: str, optimizer: str, kfac: dict | None, seed: int,
        lr: float | None = None) -> dict:
    settings = {**WORKLOADS[workload], "optimizer": optimizer, "lr": lr or BASE_LR[optimizer],
                "seed": seed, "threads": 2, "eval_every": WORKLOADS[workload]["steps"],
                "kfac": kfac is not None, **(kfac or {})}
    if optimizer == "adamw":
        settings["weight_decay"] = 0.01
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer = Run(TrainConfig(**settings), Path(tmp) / "run")
        try:
            trainer.train(progress=False, checkpoint=False)
        except FloatingPointError:  # diverged: scored as an infinite loss
            return {"train_loss": float("inf"), "val": {"val_loss": float("inf")},
                    "wall_s": time.perf_counter() - start, "max_loss": float("inf")}
        wall = time.perf_counter() - start
        losses = [r["loss"] for r in trainer.steps]
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_loss": statistics.fmean(tail), "val": trainer.metrics[-1],
            "wall_s": wall, "max_loss": max(losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pilot", action="store_true")
    mode.add_argument("--grid", action="store_true")
    mode.add_argument("--final", action="store_true")
    mode.add_argument("--tune", action="store_true")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--tuned", action="store_true",
                        help="with --final: each base optimizer at its best rate of "
                             "adam_recipes_tune.json on each workload, alone and with K-FAC")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in the JSON and do only the missing ones")
    args = parser.parse_args()
    torch.set_num_threads(2)
    workloads = args.workloads.split(",")
    if args.tune:
        arms = {f"{opt} lr {lr:g}": (opt, None, lr) for opt in BASE_LR for lr in TUNE_LR}
        seeds = [0]
    elif args.pilot or args.grid:
        arms = {name: ("adamw", kfac, None)
                for name, kfac in (PILOT if args.pilot else GRID).items()}
        seeds = [0]
    else:
        arms = {}
        for opt in BASE_LR:
            arms[opt] = (opt, None, None)
            arms[f"kfac + {opt}"] = (opt, {}, None)
        seeds = [0, 1, 2]
    tuned = best_rates() if args.tuned else None
    load_before = os.getloadavg()
    results: dict = {}
    mode_name = ("pilot" if args.pilot else "grid" if args.grid else
                 "tune" if args.tune else "final_tuned" if args.tuned else "final")
    out = HERE / "results" / f"adam_recipes_{mode_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"mode": mode_name, "workloads": WORKLOADS, "base_lr": tuned or BASE_LR,
               "seeds": seeds,
               "load_average_1_5_15": {"before": load_before}, "results": results}
    if args.resume and out.exists():  # the losses do not depend on the load: keep them
        earlier = json.loads(out.read_text())
        results.update(earlier["results"])
        payload["load_average_1_5_15"] = {"before": earlier["load_average_1_5_15"]["before"],
                                          "resumed_before": load_before}
    for workload in workloads:
        for name, (opt, kfac, lr) in arms.items():
            if args.tuned:
                lr = tuned[workload][opt]
            for seed in seeds:
                if len(results.get(workload, {}).get(name, [])) > seeds.index(seed):
                    continue  # resumed: this seed is done
                r = run(workload, opt, kfac, seed, lr)
                results.setdefault(workload, {}).setdefault(name, []).append(r)
                print(f"{workload} {name} seed {seed}: train loss {r['train_loss']:.4f}, "
                      f"val {r['val']}", file=sys.stderr, flush=True)
                payload["load_average_1_5_15"]["after"] = os.getloadavg()
                out.write_text(json.dumps(payload, indent=2))  # so far
    print(table(payload))
    print(f"\nwrote {out}")


def best_rates() -> dict[str, dict[str, float]]:
    """workload ↦ base optimizer ↦ the rate of ``--tune`` with the lowest score."""
    tune = json.loads((HERE / "results" / "adam_recipes_tune.json").read_text())
    best: dict[str, dict[str, float]] = {}
    for workload, arms in tune["results"].items():
        for opt in BASE_LR:
            scores = {lr: arms[f"{opt} lr {lr:g}"][0]["train_loss"] for lr in TUNE_LR}
            best.setdefault(workload, {})[opt] = min(scores, key=scores.get)
    return best


def table(payload: dict) -> str:
    rows = ["| workload | arm | train loss, last 10% (median [min–max] over seeds) | "
            "val loss |", "|---|---|---:|---:|"]
    for workload, arms in payload["results"].items():
        for name, runs in arms.items():
            losses = [r["train_loss"] for r in runs]
            val = [r["val"].get("val_loss", float("nan")) for r in runs]
            rows.append(f"| {workload} | {name} | {statistics.median(losses):.4f} "
                        f"[{min(losses):.4f}–{max(losses):.4f}] | "
                        f"{statistics.median(val):.4f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
