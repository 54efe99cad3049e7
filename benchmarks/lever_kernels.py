"""Kernel-level A/B of three step levers on the reference MLP's shapes: does a lever's
kernel gain leave room for a step gain at all?

The reference MLP (784→512×7→10, batch 512) has seven A factors of 513×513 (512 inputs
and the bias) and seven G factors of 512×512 of the same shape, so a step could batch
them. Each pair below does the same arithmetic two ways, interleaved in every round
(A, B, A, B, ...), and reports the median milliseconds per K-FAC step with its IQR:

* ``prepare``: Cholesky + inverse of the seven A and seven G factors, a loop of
  ``cholesky_ex``/``cholesky_inverse`` per factor against one batched call on the
  stacked factors (per step: divided by the inverse interval, 10);
* ``precondition_m1``: G⁻¹ DΘ A⁻¹ for the six 512×513 hidden blocks, a loop of two
  ``mm`` against two ``bmm``;
* ``precondition_m2``: the four triangular solves of Method 2, a loop against batched
  ``solve_triangular``;
* ``bias_in_a``: the factor product aᵀa and the Method 1 products of the seven
  512-input layers with the bias in A (a_dim 513) against without (a_dim 512, as ASDL
  does), the work a bias kept out of A would save;
* ``bf16_products``: the factor products aᵀa, gᵀg in float32 against bfloat16.

Run by hand (≈ 2 minutes on 2 cores, on a quiet machine):
    python benchmarks/lever_kernels.py --rounds 30
Writes ``benchmarks/results/lever_kernels.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).parent
BATCH, WIDTH, LAYERS, HIDDEN_BLOCKS, INV_STEPS = 512, 512, 7, 6, 10


def _spd(n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    rows = torch.randn(BATCH, n, generator=gen, dtype=dtype)
    return rows.mT @ rows / BATCH + 1e-3 * torch.eye(n, dtype=dtype)


def pairs() -> dict[str, tuple[Callable[[], object], Callable[[], object], float]]:
    """name: (A = today's way, B = the lever, divisor to a per-step figure)."""
    gen = torch.Generator().manual_seed(0)
    a = [_spd(WIDTH + 1, gen) for _ in range(LAYERS)]
    g = [_spd(WIDTH, gen) for _ in range(LAYERS)]
    a_stack, g_stack = torch.stack(a), torch.stack(g)

    def prepare_loop():
        for f in a + g:
            chol, _ = torch.linalg.cholesky_ex(f)
            torch.cholesky_inverse(chol)

    def prepare_batched():
        for stack in (a_stack, g_stack):
            chol, _ = torch.linalg.cholesky_ex(stack)
            torch.cholesky_inverse(chol)

    a_inv = [torch.cholesky_inverse(torch.linalg.cholesky(f)) for f in a[:HIDDEN_BLOCKS]]
    g_inv = [torch.cholesky_inverse(torch.linalg.cholesky(f)) for f in g[:HIDDEN_BLOCKS]]
    d = [torch.randn(WIDTH, WIDTH + 1, generator=gen) for _ in range(HIDDEN_BLOCKS)]
    a_inv_s, g_inv_s, d_s = torch.stack(a_inv), torch.stack(g_inv), torch.stack(d)

    def m1_loop():
        for gi, di, ai in zip(g_inv, d, a_inv):
            torch.mm(torch.mm(gi, di), ai)

    def m1_batched():
        torch.bmm(torch.bmm(g_inv_s, d_s), a_inv_s)

    chol_a = [torch.linalg.cholesky(f) for f in a[:HIDDEN_BLOCKS]]
    chol_g = [torch.linalg.cholesky(f) for f in g[:HIDDEN_BLOCKS]]
    chol_a_s, chol_g_s = torch.stack(chol_a), torch.stack(chol_g)
    solve = torch.linalg.solve_triangular

    def m2_loop():
        for lg, di, la in zip(chol_g, d, chol_a):
            q = solve(lg.mT, solve(lg, di, upper=False), upper=True)
            solve(la.mT, solve(la, q.mT, upper=False), upper=True)

    def m2_batched():
        q = solve(chol_g_s.mT, solve(chol_g_s, d_s, upper=False), upper=True)
        solve(chol_a_s.mT, solve(chol_a_s, q.mT, upper=False), upper=True)

    rows_513 = torch.randn(BATCH, WIDTH + 1, generator=gen)
    rows_512 = rows_513[:, :WIDTH].contiguous()
    sum_513, sum_512 = torch.zeros(WIDTH + 1, WIDTH + 1), torch.zeros(WIDTH, WIDTH)
    inv_513, inv_512 = a_inv[0], a_inv[0][:WIDTH, :WIDTH].contiguous()
    d_513, d_512 = d[0], d[0][:, :WIDTH].contiguous()

    def bias_in():
        for _ in range(LAYERS):
            sum_513.addmm_(rows_513.mT, rows_513)
            torch.mm(torch.mm(g_inv[0], d_513), inv_513)

    def bias_out():
        for _ in range(LAYERS):
            sum_512.addmm_(rows_512.mT, rows_512)
            torch.mm(torch.mm(g_inv[0], d_512), inv_512)

    g_rows = torch.randn(BATCH, WIDTH, generator=gen)
    rows_bf, g_rows_bf = rows_513.bfloat16(), g_rows.bfloat16()
    sum_g = torch.zeros(WIDTH, WIDTH)

    def products_f32():
        for _ in range(LAYERS):
            sum_513.addmm_(rows_513.mT, rows_513)
            sum_g.addmm_(g_rows.mT, g_rows)

    def products_bf16():
        for _ in range(LAYERS):
            sum_513.add_(torch.mm(rows_bf.mT, rows_bf).float())
            sum_g.add_(torch.mm(g_rows_bf.mT, g_rows_bf).float())

    return {"prepare": (prepare_loop, prepare_batched, INV_STEPS),
            "precondition_m1": (m1_loop, m1_batched, 1),
            "precondition_m2": (m2_loop, m2_batched, 1),
            "bias_in_a": (bias_in, bias_out, 1),
            "bf16_products": (products_f32, products_bf16, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lever_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    work = pairs()
    samples = {name: {"a": [], "b": []} for name in work}
    for _ in range(3):  # warm-up
        for fa, fb, _div in work.values():
            fa(), fb()
    for _ in range(args.rounds):
        for name, (fa, fb, div) in work.items():
            for side, fn in (("a", fa), ("b", fb)):
                start = time.perf_counter()
                fn()
                samples[name][side].append(1e3 * (time.perf_counter() - start) / div)
    results = {}
    for name, s in samples.items():
        qa, qb = statistics.quantiles(s["a"], n=4), statistics.quantiles(s["b"], n=4)
        ratios = [b / a for a, b in zip(s["a"], s["b"])]
        qr = statistics.quantiles(ratios, n=4)
        results[name] = {"a_ms": statistics.median(s["a"]), "a_iqr": qa[2] - qa[0],
                         "b_ms": statistics.median(s["b"]), "b_iqr": qb[2] - qb[0],
                         "b_over_a": statistics.median(ratios), "ratio_iqr": qr[2] - qr[0]}
    payload = {"rounds": args.rounds, "threads": 2, "torch": torch.__version__,
               "machine": {"cpu": platform.processor() or platform.machine(),
                           "cpu_model": _cpu_model()},
               "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(table(payload))
    print(f"\nwrote {args.out}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def table(payload: dict) -> str:
    rows = ["| lever | today (ms/step) [IQR] | with the lever (ms/step) [IQR] | "
            "lever / today (round-ratio IQR) |", "|---|---:|---:|---:|"]
    for name, r in payload["results"].items():
        rows.append(f"| {name} | {r['a_ms']:.2f} [{r['a_iqr']:.2f}] | {r['b_ms']:.2f} "
                    f"[{r['b_iqr']:.2f}] | {r['b_over_a']:.3f} ({r['ratio_iqr']:.3f}) |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
