"""What one Kronecker block per group costs: a depthwise layer against an ordinary one.

Workload: 1×1 conv 16→64, a 3×3 conv 64→64 (``groups`` = 1 or 64, i.e. depthwise),
1×1 conv 64→32, global average pool, Linear 32→10; ReLU between; batch 32 of 16×16
images, float32, 2 threads. Each configuration runs plain SGD and K-FAC + SGD
(Cholesky, Method 2, inverses every 10 steps) with learning rate 0 (the same work at
every step), round-robin in blocks of 10 steps; the per-step time of a configuration is
the median over rounds of its block means, with the interquartile range over rounds,
and every ratio is taken per round within this one process.

Run by hand:  python benchmarks/grouped_conv.py      (≈ 1 minute on 2 cores)
Writes ``benchmarks/results/grouped_conv.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from thermokfac import KFACPreconditioner


def model(groups: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 64, 1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1, groups=groups), nn.ReLU(),
                         nn.Conv2d(64, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def make(groups: int, kfac: bool):
    net = model(groups)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    pre = KFACPreconditioner(net, kl_clip=None, damping=1e-2, inv_update_steps=10) \
        if kfac else None
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if pre is not None:
            pre.step()
        opt.step()

    return step, (len(pre.layer_names) if pre else 0)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "grouped_conv.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    configs = {f"{kind} groups={g}": make(g, kind == "kfac")
               for g in (1, 64) for kind in ("sgd", "kfac")}
    for step, _ in configs.values():  # warm-up: one inverse update each
        for _ in range(args.block + 1):
            step()
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (step, _) in configs.items():
            start = time.perf_counter()
            for _ in range(args.block):
                step()
            times[name].append((time.perf_counter() - start) / args.block)
    load_after = os.getloadavg()
    rows = {}
    for name, values in times.items():
        q1, med, q3 = quartiles(values)
        groups = name.split("=")[1]
        ratio = [t / s for t, s in zip(values, times[f"sgd groups={groups}"])]
        r1, rmed, r3 = quartiles(ratio)
        rows[name] = {"median_ms": 1e3 * med, "iqr_ms": [1e3 * q1, 1e3 * q3],
                      "vs_sgd": rmed, "vs_sgd_iqr": [r1, r3],
                      "kfac_blocks": configs[name][1]}
    result = {"load_average_before": list(load_before), "load_average_after": list(load_after),
              "quiet": load_before[0] < 0.5, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(),
              "rounds": args.rounds, "block": args.block, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"load before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print("| configuration | K-FAC blocks | ms/step (IQR) | × SGD (IQR) |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['kfac_blocks']} | {r['median_ms']:.1f} "
              f"({r['iqr_ms'][0]:.1f}–{r['iqr_ms'][1]:.1f}) | {r['vs_sgd']:.2f} "
              f"({r['vs_sgd_iqr'][0]:.2f}–{r['vs_sgd_iqr'][1]:.2f}) |")


if __name__ == "__main__":
    main()
