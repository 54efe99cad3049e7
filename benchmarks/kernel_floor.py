"""The bare kernels of a K-FAC step on the reference MLP, timed without any Python around
them: what no implementation of the same algorithm with the same routines can beat.

Per step (factors every step, prepares every ``inv_steps``), for every Linear layer
(a_dim = d_in + 1, A and G):

* ``factor_products``: aᵀa and gᵀg of the batch (``addmm`` into the running sums);
* ``ema``: the moving average of both factors (``lerp_``);
* ``precondition_m1``: G⁻¹ DΘ A⁻¹, two matrix products;
* ``precondition_m2``: two triangular solves per factor (four ``solve_triangular``);
* ``prepare_m1`` / ``prepare_m2``: ``cholesky_ex`` (+ ``cholesky_inverse`` for Method 1)
  of both factors, divided by ``inv_steps``.

The forward/backward and the optimiser step are the plain SGD step, measured beside it.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


class KernelFloor:
    """Collects one sample per :meth:`measure` call (call it once per benchmark round)."""

    def __init__(self, model: nn.Sequential, batch: int, inv_steps: int = 10) -> None:
        self.inv_steps = inv_steps
        gen = torch.Generator().manual_seed(0)
        self.layers = []
        for layer in (m for m in model if isinstance(m, nn.Linear)):
            d_out, a_dim = layer.out_features, layer.in_features + 1
            a_rows = torch.randn(batch, a_dim, generator=gen)
            g_rows = torch.randn(batch, d_out, generator=gen)
            a = a_rows.mT @ a_rows / batch + 1e-3 * torch.eye(a_dim)
            g = g_rows.mT @ g_rows / batch + 1e-3 * torch.eye(d_out)
            chol_a, chol_g = torch.linalg.cholesky(a), torch.linalg.cholesky(g)
            self.layers.append({
                "a_rows": a_rows, "g_rows": g_rows, "a": a, "g": g,
                "sum_a": torch.zeros_like(a), "sum_g": torch.zeros_like(g),
                "a_inv": torch.cholesky_inverse(chol_a), "g_inv": torch.cholesky_inverse(chol_g),
                "chol_a": chol_a, "chol_g": chol_g,
                "d": torch.randn(d_out, a_dim, generator=gen)})
        self.samples: dict[str, list[float]] = {k: [] for k in (
            "factor_products", "ema", "precondition_m1", "precondition_m2", "prepare_m1",
            "prepare_m2")}

    def measure(self) -> None:
        def clock(fn) -> float:
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)

        totals = dict.fromkeys(self.samples, 0.0)
        for p in self.layers:
            totals["factor_products"] += clock(lambda p=p: (
                p["sum_a"].addmm_(p["a_rows"].mT, p["a_rows"]),
                p["sum_g"].addmm_(p["g_rows"].mT, p["g_rows"])))
            totals["ema"] += clock(lambda p=p: (p["a"].lerp_(p["sum_a"], 0.05),
                                                p["g"].lerp_(p["sum_g"], 0.05)))
            totals["precondition_m1"] += clock(lambda p=p: p["g_inv"] @ p["d"] @ p["a_inv"])

            def solves(p=p):
                q = torch.linalg.solve_triangular(p["chol_g"], p["d"], upper=False)
                q = torch.linalg.solve_triangular(p["chol_g"].mT, q, upper=True)
                u = torch.linalg.solve_triangular(p["chol_a"].mT, q, upper=True, left=False)
                return torch.linalg.solve_triangular(p["chol_a"], u, upper=False, left=False)
            totals["precondition_m2"] += clock(solves)
            factorise = clock(lambda p=p: (torch.linalg.cholesky_ex(p["a"]),
                                           torch.linalg.cholesky_ex(p["g"])))
            invert = clock(lambda p=p: (torch.cholesky_inverse(p["chol_a"]),
                                        torch.cholesky_inverse(p["chol_g"])))
            totals["prepare_m2"] += factorise / self.inv_steps
            totals["prepare_m1"] += (factorise + invert) / self.inv_steps
        for key, value in totals.items():
            self.samples[key].append(value)
        for p in self.layers:  # keep the sums bounded over rounds (not timed)
            p["sum_a"].zero_()
            p["sum_g"].zero_()

    def medians_ms(self) -> dict[str, float]:
        return {key: statistics.median(values) for key, values in self.samples.items()}

    def floors_ms(self, plain_step_ms: float) -> dict[str, float]:
        """Per-step floor of each method: the plain step plus its kernels."""
        m = self.medians_ms()
        shared = plain_step_ms + m["factor_products"] + m["ema"]
        return {"method1_ms": shared + m["precondition_m1"] + m["prepare_m1"],
                "method2_ms": shared + m["precondition_m2"] + m["prepare_m2"]}
