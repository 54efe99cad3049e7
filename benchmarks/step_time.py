"""Step time of K-FAC vs SGD/Adam on the reference MLP, side by side with ASDL and curvlinops.

Reference workload: MLP 784→512×7→10 (ReLU), batch 512, float32, 2 threads. Every
configuration runs in this one process, round-robin: each round runs a block of
``--block`` consecutive steps of every configuration (a block of 10 covers one
inverse update of the every-10-steps variants), and the per-step time of a config is
the median over rounds of its block means. Weights are held fixed (learning rate 0) so
every configuration does the same, data-independent work at every step.

Peak memory is measured per configuration in a fresh subprocess (peak RSS, VmHWM, after
12 steps, minus that of the SGD process), beside the bytes the preconditioner holds
between steps (its factors and what was prepared from them).

Run by hand:  python benchmarks/step_time.py            (≈ 10 minutes on 2 cores)
              python benchmarks/step_time.py --quick    (a smoke run)
Writes ``benchmarks/results/step_time.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from thermokfac import KFACPreconditioner

sys.path.insert(0, str(Path(__file__).parent))
from kernel_floor import KernelFloor

BATCH, WIDTH, DEPTH, CLASSES, INPUT = 512, 512, 7, 10, 784
KFAC = {  # name: (factor_update_steps, inv_update_steps, method, solver)
    "thermokfac ema1/inv10 M1": (1, 10, "inverse", "cholesky"),
    "thermokfac ema1/inv10 M2": (1, 10, "solve", "cholesky"),
    "thermokfac ema1/inv10 M1 eigh": (1, 10, "inverse", "eigh"),
    "thermokfac ema1/inv10 M2 eigh": (1, 10, "solve", "eigh"),
    "thermokfac all1 M1": (1, 1, "inverse", "cholesky"),
    "thermokfac all1 M2": (1, 1, "solve", "cholesky"),
    "thermokfac all10 M1": (10, 10, "inverse", "cholesky"),
    "thermokfac all10 M2": (10, 10, "solve", "cholesky"),
}
ASDL = {"asdl ema1/inv10": (1, 10), "asdl all1": (1, 1), "asdl all10": (10, 10)}
TARGETS = {"ema1/inv10": 2.5, "all1": 3.0, "all10": 1.9}


def reference_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(INPUT, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, CLASSES))
    return nn.Sequential(*layers)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, INPUT, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def _plain(opt_cls, **kw) -> Callable[[], Callable[[], None]]:
    def build():
        model, (x, y) = reference_mlp(), batch()
        opt = opt_cls(model.parameters(), lr=0.0, **kw)

        def step():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return step
    return build


def _thermokfac(factor_steps, inv_steps, method, solver, holder=None):
    def build():
        model, (x, y) = reference_mlp(), batch()
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        pre = KFACPreconditioner(model, solver=solver, method=method, damping=1e-3,
                                 factor_decay=0.95, factor_update_steps=factor_steps,
                                 inv_update_steps=inv_steps, optimizer=opt)
        if holder is not None:
            holder.append(pre)

        def step():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            opt.step()
        return step
    return build


class _NoOpRange(contextlib.ContextDecorator):
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _asdl(factor_steps, inv_steps):
    def build():
        torch.cuda.nvtx.range = _NoOpRange  # ASDL calls NVTX even on CPU-only torch
        import asdl

        model, (x, y) = reference_mlp(), batch()
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        config = asdl.PreconditioningConfig(
            data_size=BATCH, damping=1e-3, preconditioner_upd_interval=inv_steps,
            curvature_upd_interval=factor_steps, ema_decay=0.05)
        maker = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")

        def step():
            opt.zero_grad()
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(nn.functional.cross_entropy, dummy, y)
            maker.forward_and_backward()
            opt.step()
        return step
    return build


def _curvlinops():
    def build():
        import curvlinops

        model, (x, y) = reference_mlp(), batch()
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)

        def step():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            op = curvlinops.KFACLinearOperator(
                model, nn.CrossEntropyLoss(), params, [(x, y)],
                fisher_type=curvlinops.FisherType.EMPIRICAL, check_deterministic=False,
                num_data=BATCH, num_per_example_loss_terms=1, separate_weight_and_bias=False)
            inverse = curvlinops.KFACInverseLinearOperator(op, damping=1e-3)
            for p, u in zip(params, inverse @ [p.grad for p in params]):
                p.grad.copy_(u)
            opt.step()
        return step
    return build


def configurations(skip_asdl: bool, skip_curvlinops: bool, holders: dict) -> dict:
    configs = {"sgd": _plain(torch.optim.SGD, momentum=0.9), "adam": _plain(torch.optim.Adam)}
    for name, spec in KFAC.items():
        holders[name] = []
        configs[name] = _thermokfac(*spec, holder=holders[name])
    if not skip_asdl and _importable("asdl"):
        configs.update({name: _asdl(*spec) for name, spec in ASDL.items()})
    if not skip_curvlinops and _importable("curvlinops"):
        configs["curvlinops full step"] = _curvlinops()
    return configs


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # any import failure means "not available"
        return False
    return True


def measure(configs: dict, rounds: int, block: int, floor: KernelFloor | None = None
            ) -> dict[str, list[float]]:
    """Round-robin block means per configuration; ``floor`` is sampled once per round, in
    the same rounds, so that machine drift hits it alike."""
    steps = {name: build() for name, build in configs.items()}
    for step in steps.values():  # warm-up: first inverse, allocator, kernels' self-checks
        for _ in range(block):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(block):
                step()
            times[name].append((time.perf_counter() - start) / block)
        if floor is not None:
            floor.measure()
        print(f"round {r + 1}/{rounds}", file=sys.stderr)
    return times


def peak_rss_mb(name: str) -> float:
    """Max RSS (MB) of a fresh process that builds ``name`` and runs 12 steps."""
    out = subprocess.run([sys.executable, __file__, "--memory-only", name], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _memory_only(name: str) -> None:
    torch.set_num_threads(2)
    build = configurations(False, False, {})[name]
    step = build()
    for _ in range(12):
        step()
    # VmHWM is this process's own peak (ru_maxrss would include the parent's before exec).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) / 1024)


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 rounds, no memory runs")
    parser.add_argument("--skip-asdl", action="store_true")
    parser.add_argument("--skip-curvlinops", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--configs", default="",
                        help="comma-separated configurations to run (sgd and adam always run)")
    parser.add_argument("--memory-only", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "step_time.json")
    args = parser.parse_args()
    if args.memory_only:
        _memory_only(args.memory_only)
        return
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    holders: dict = {}
    configs = configurations(args.skip_asdl, args.skip_curvlinops, holders)
    if args.configs:
        keep = {"sgd", "adam", *(c.strip() for c in args.configs.split(","))}
        unknown = sorted(keep - set(configs))
        if unknown:
            parser.error(f"--configs: unknown {unknown}; choose from {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in keep}
    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        print(f"warning: 1-minute load average {load_before[0]:.2f} > 1 before the run: "
              "another process is using the cores; the figures will not reproduce on a "
              "quiet machine (the README quotes only runs that start below 0.5)",
              file=sys.stderr)
    floor = KernelFloor(reference_mlp(), BATCH)
    times = measure(configs, rounds, args.block, floor)
    load_after = os.getloadavg()
    adam = statistics.median(times["adam"])
    results = {}
    for name, values in times.items():
        median = statistics.median(values)
        ratios = [v / a for v, a in zip(values, times["adam"])]  # same round
        entry = {"median_ms": 1e3 * median, "iqr_ms": 1e3 * _iqr(values),
                 "ratio_to_adam": median / adam, "round_ratio_median": statistics.median(ratios),
                 "round_ratio_iqr": _iqr(ratios), "rounds": len(values)}
        if holders.get(name):
            pre = holders[name][0]
            entry["breakdown_ms"] = {k.removeprefix("mean_").removesuffix("_s"): 1e3 * v
                                     for k, v in pre.timing_summary().items()
                                     if k.startswith("mean_")}
            held = pre.memory_bytes()
            entry["held_mb"] = held["total"] / 2**20
            entry["held_over_factors_and_factorisations"] = held["total"] / (2 * held["factors"])
        results[name] = entry
    if not (args.quick or args.skip_memory):
        base = peak_rss_mb("sgd")
        for name in results:
            results[name]["peak_rss_over_sgd_mb"] = peak_rss_mb(name) - base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"workload": f"MLP {INPUT}->{WIDTH}x{DEPTH}->{CLASSES}, batch {BATCH}, fp32",
               "block": args.block, "machine": machine(), "targets": TARGETS,
               "load_average_1_5_15": {"before": load_before, "after": load_after},
               # The run itself loads both cores, so the 1-minute load after it is ~1-2:
               # a quiet machine is one whose load was below 0.5 before the run.
               "quiet": load_before[0] < 0.5,
               "results": results,
               "kernel_floor": _floor_entry(floor, times)}
    args.out.write_text(json.dumps(payload, indent=2))
    print(table(payload))
    print(f"\nwrote {args.out}")


def _floor_entry(floor: KernelFloor, times: dict[str, list[float]]) -> dict[str, float]:
    """The kernels' medians, and each method's floor: the plain SGD step plus them."""
    adam_ms = 1e3 * statistics.median(times["adam"])
    floors = floor.floors_ms(1e3 * statistics.median(times["sgd"]))
    return {**{f"{k}_ms": v for k, v in floor.medians_ms().items()}, **floors,
            **{f"{k.removesuffix('_ms')}_ratio_to_adam": v / adam_ms
               for k, v in floors.items()}}


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def table(payload: dict) -> str:
    rows = ["| configuration | median step (ms) | × Adam | extra peak RSS (MB) |",
            "|---|---:|---:|---:|"]
    for name, r in payload["results"].items():
        rss = r.get("peak_rss_over_sgd_mb")
        rows.append(f"| {name} | {r['median_ms']:.1f} | {r['ratio_to_adam']:.2f} | "
                    f"{'' if rss is None else f'{rss:.0f}'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
