"""Speed of the thermodynamic-solver simulator, and of K-FAC on it.

1. ``solver``: this simulator against thermox 0.0.6 (JAX, CPU, jitted) when it is
   installed, each side at its own best sample spacing and count for a relative error
   ≤ 1e-2 (see ``thermox_compare.py``, which states every setting searched).
2. ``euler``: Euler–Maruyama steps (n × n times n × 64, plus noise) against the bare
   matrix products they need.
3. ``kfac``: a K-FAC step (Method 2, factors every step, prepare every 10) on the
   reference MLP of ``step_time.py`` with the digital Cholesky and eigh solvers vs the
   closed-form thermodynamic solver, round-robin medians.
4. ``memory``: held bytes and peak RSS of factor-forming vs resistor-array (rows) mode.

Run by hand, in an environment with thermox for part 1 (see the README):
    python benchmarks/thermo_solver.py [--quick] [--parts solver euler kfac memory]
Writes ``benchmarks/results/thermo_solver.json`` (the parts run replace theirs; the
others are kept) and prints the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import step_time  # the reference MLP and machine facts
import thermox_compare  # part 1

from thermokfac import KFACPreconditioner
from thermokfac.solvers import ThermodynamicSolver
from thermokfac.solvers.thermo import backends
from thermokfac.timing import median_seconds


def _timed(fn) -> float:
    """Median seconds of ``fn`` over as many calls as fit in about 2 s (3 to 25)."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return median_seconds(fn, repeats=max(3, min(25, math.ceil(2.0 / max(once, 1e-6)))))


def _problem(n: int):
    a, b, x_star, _, _ = thermox_compare.problem(n)
    return a, b, x_star


def euler_part(sizes: list[int], steps: int = 200, rhs: int = 64) -> dict:
    out = {}
    for n in sizes:
        a, _, _ = _problem(n)
        matrix = torch.tensor(a, dtype=torch.float32) / 1.0
        b = torch.randn(n, rhs)
        sched = backends.Schedule(backends.Readout.SAMPLES, steps * 0.1, 0.0, 1, 0.1)
        gen = torch.Generator().manual_seed(0)
        em = _timed(lambda m=matrix, b=b, s=sched, g=gen: backends.euler_maruyama(
            m, b, None, s, 0.1, 1.0, g))

        start = torch.randn(n, rhs)

        def bare(m=matrix, x=start):
            for _ in range(steps):
                x = torch.addmm(x, m, x, alpha=-0.1)
            return x
        mm = _timed(bare)
        # The noise alone: n·k fresh normals per step, however the step is written.
        draw = _timed(lambda g=gen, n=n: [torch.randn(n, rhs, generator=g)
                                          for _ in range(steps)])
        out[str(n)] = {"em_step_us": 1e6 * em / steps, "matmul_us": 1e6 * mm / steps,
                       "normals_us": 1e6 * draw / steps, "em_speed_vs_matmul": mm / em,
                       "ceiling": mm / (mm + draw)}
        print(f"euler n={n}: {out[str(n)]}", file=sys.stderr)
    return out


def kfac_part(rounds: int, device: str = "cpu") -> dict:
    def build(solver):
        model = step_time.reference_mlp().to(device)
        x, y = (t.to(device) for t in step_time.batch())
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        pre = KFACPreconditioner(model, solver=solver, method="solve", optimizer=opt)

        def step():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            opt.step()
            if device != "cpu":
                torch.cuda.synchronize()
        return step, pre

    configs = {"digital (cholesky)": build("cholesky"),
               "digital (eigh)": build("eigh"),
               "thermodynamic (closed-form)": build(ThermodynamicSolver())}
    for step, _ in configs.values():
        for _ in range(10):
            step()
    floor = _FloorParts(step_time.reference_mlp(), device=device)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, (step, _) in configs.items():
            start = time.perf_counter()
            for _ in range(10):
                step()
            times[name].append((time.perf_counter() - start) / 10)
        floor.measure()  # in the same rounds, so machine drift hits it alike
    out = {}
    for name, (_, pre) in configs.items():
        out[name] = {"median_ms": 1e3 * statistics.median(times[name]),
                     "breakdown_ms": {k.removeprefix("mean_").removesuffix("_s"): 1e3 * v
                                      for k, v in pre.timing_summary().items()
                                      if k.startswith("mean_")}}
    digital = out["digital (cholesky)"]["median_ms"]
    parts = floor.medians_ms()
    floor_ms = digital + sum(parts.values())
    out["floor"] = {**parts, "floor_ms": floor_ms, "floor_ratio": floor_ms / digital}
    thermo = out["thermodynamic (closed-form)"]["median_ms"]
    out["ratio"] = thermo / digital
    out["ratio_vs_eigh"] = thermo / out["digital (eigh)"]["median_ms"]
    print(f"kfac: {out}", file=sys.stderr)
    return out


class _FloorParts:
    """What an exact closed-form step must add to a digital Cholesky step, from its
    primitives alone: per layer and step, two draws of d_out × d_in normals and the two
    products that colour them (S_G Ξ₁, Ξ₂ S_A); per prepare (every ``inv_steps``),
    ``eigh`` of both factors instead of a Cholesky factorisation."""

    def __init__(self, model: nn.Module, inv_steps: int = 10, device: str = "cpu") -> None:
        self.inv_steps = inv_steps
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(0)
        self.layers = []
        for layer in (m for m in model if isinstance(m, nn.Linear)):
            d_out, d_in = layer.out_features, layer.in_features + 1
            factors = []
            for n in (d_out, d_in):
                m = torch.randn(n, n + 8, generator=self.gen, device=self.device)
                factors.append(m @ m.mT / n + 1e-3 * torch.eye(n, device=self.device))
            xi, s_g, s_a = (torch.randn(*shape, device=self.device)
                            for shape in ((d_out, d_in), (d_out, d_out), (d_in, d_in)))
            self.layers.append((xi, s_g, s_a, factors))
        self.samples: dict[str, list[float]] = {"normals_ms": [], "colouring_ms": [],
                                                "eigh_ms": []}

    def measure(self) -> None:
        def clock(fn) -> float:
            start = time.perf_counter()
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return 1e3 * (time.perf_counter() - start)

        totals = dict.fromkeys(self.samples, 0.0)
        for xi, s_g, s_a, factors in self.layers:
            totals["normals_ms"] += 2 * clock(lambda xi=xi: xi.normal_(generator=self.gen))
            totals["colouring_ms"] += (clock(lambda s=s_g, xi=xi: s @ xi)
                                       + clock(lambda s=s_a, xi=xi: xi @ s))
            for m in factors:
                extra = clock(lambda m=m: torch.linalg.eigh(m)) - clock(
                    lambda m=m: torch.linalg.cholesky(m))
                totals["eigh_ms"] += extra / self.inv_steps
        for key, value in totals.items():
            self.samples[key].append(value)

    def medians_ms(self) -> dict[str, float]:
        return {key: statistics.median(values) for key, values in self.samples.items()}


def _memory_child(storage: str, width: int, batch: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                          nn.ReLU(), nn.Linear(width, 10))
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    pre = KFACPreconditioner(model, solver=ThermodynamicSolver(), factor_decay=0.0,
                             kl_clip=None, factor_storage=storage, inv_update_steps=1)
    for _ in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text()
                .splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"held_mb": pre.memory_bytes()["total"] / 2**20, "peak_mb": peak / 1024}))


def memory_part(width: int = 2048, batch: int = 32) -> dict:
    out = {}
    for storage in ("matrix", "rows"):
        res = subprocess.run([sys.executable, __file__, "--memory-child", storage, str(width),
                              str(batch)], check=True, capture_output=True, text=True)
        out[storage] = json.loads(res.stdout.strip().splitlines()[-1])
    out["workload"] = f"MLP {width}->{width}->{width}->10, batch {batch}, factor_decay 0"
    print(f"memory: {out}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["solver", "euler", "kfac", "memory"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="where the kfac part runs (cpu or cuda); its results are "
                             "stored under kfac_<device> when not cpu")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "thermo_solver.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        storage, width, batch = args.memory_child
        _memory_child(storage, int(width), int(batch))
        return
    sizes = [64, 256] if args.quick else [64, 256, 1024]
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["machine"] = step_time.machine()
    load_before = os.getloadavg()
    if "solver" in args.parts:
        results["solver"] = thermox_compare.solver_part(sizes)
    if "euler" in args.parts:
        results["euler"] = euler_part(sizes)
    if "kfac" in args.parts:
        key = "kfac" if args.device == "cpu" else f"kfac_{args.device}"
        results[key] = kfac_part(3 if args.quick else 20, args.device)
        if args.device != "cpu":
            results[key]["device"] = torch.cuda.get_device_name()
    if "memory" in args.parts:
        results["memory"] = memory_part()
    load = {"before": load_before, "after": os.getloadavg()}
    for part in args.parts:  # each part keeps the load of the run that measured it
        key = "kfac" if part == "kfac" and args.device == "cpu" else (
            f"kfac_{args.device}" if part == "kfac" else part)
        results[key]["load_average_1_5_15"] = load
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
