"""Adam vs SGD vs K-FAC on real handwritten digits (scikit-learn's 8×8 digits).

Trains the same MLP (64→256→256→10, ReLU) from the same initialisation and batch order
with each optimizer, evaluates on a held-out split, prints a table and writes
``results.json`` and ``results.csv`` into ``--out``.

    python examples/digits_compare.py [--steps 300] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from thermokfac import KFACPreconditioner, data

OPTIMIZERS = {
    "adam": "Adam, lr 3e-3",
    "sgd": "SGD momentum 0.9, lr 0.1",
    "kfac+sgd": "K-FAC (Cholesky, Method 2, damping 1e-2) + SGD momentum 0.9, lr 0.1",
    "kfac+adam": "K-FAC (Cholesky, Method 2, damping 1e-2) + Adam, lr 3e-3",
}


def build(kind: str, model: nn.Module):
    if kind.endswith("adam"):
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = None
    if kind.startswith("kfac"):
        pre = KFACPreconditioner(model, damping=1e-2, optimizer=opt, inv_update_steps=10)
    return opt, pre


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return (nn.functional.cross_entropy(logits, y).item(),
                (logits.argmax(1) == y).float().mean().item())


def run(kind: str, steps: int, batch: int, seed: int, splits) -> dict:
    x_train, y_train, x_val, y_val = splits
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    opt, pre = build(kind, model)
    order = torch.Generator().manual_seed(seed + 1)
    curve = []
    start = time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc=f"{kind:>9}", leave=False):
        idx = torch.randint(0, len(x_train), (batch,), generator=order)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        if pre is not None:
            pre.step()
        opt.step()
        if step % 25 == 0 or step == steps:
            curve.append((step, time.perf_counter() - start, *evaluate(model, x_val, y_val)))
    elapsed = time.perf_counter() - start
    train_loss, train_acc = evaluate(model, x_train, y_train)
    val_loss, val_acc = evaluate(model, x_val, y_val)
    return {"optimizer": kind, "description": OPTIMIZERS[kind], "steps": steps,
            "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
            "val_acc": val_acc, "seconds": elapsed, "ms_per_step": 1e3 * elapsed / steps,
            "curve": [dict(zip(("step", "seconds", "val_loss", "val_acc"), c)) for c in curve]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=list(OPTIMIZERS))
    parser.add_argument("--out", type=Path, default=Path("runs/digits_compare"))
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--steps, --batch and --threads must be positive")
    torch.set_num_threads(args.threads)
    splits = data.digits(seed=args.seed)
    results = [run(kind, args.steps, args.batch, args.seed, splits) for kind in args.optimizers]

    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"config": config, "results": results},
                                                      indent=2))
    columns = ["optimizer", "train_loss", "val_loss", "val_acc", "seconds", "ms_per_step"]
    with open(args.out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    print(f"\ndigits (1,500 train / 297 validation), {args.steps} steps of batch {args.batch}, "
          f"seed {args.seed}\n")
    print("| optimizer | train loss | val loss | val acc | time (s) | ms/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['optimizer']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
              f"{100 * r['val_acc']:.1f}% | {r['seconds']:.1f} | {r['ms_per_step']:.2f} |")
    print(f"\nresults written to {args.out}/results.json and results.csv")


if __name__ == "__main__":
    main()
