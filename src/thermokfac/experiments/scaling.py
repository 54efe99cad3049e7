"""``thermokfac scaling`` (paper Tables 1–2): cost vs width n, measured and modelled.

Measured on this machine, per n (an SPD matrix with eigenvalues in [10⁻², 1], n
right-hand sides, medians of ``repeats``): Cholesky + inverse (Method 1), Cholesky +
solve of n columns (Method 2), and conjugate gradient (tolerance 10⁻⁶) — with fitted
log–log exponents over the larger half of n (on a multi-core CPU at these sizes they
come out below 3). Beside them the hardware model's time for the same work on an SPU —
quadratic in n *by construction* (n² values over the link), a model, not a measurement.
Memory: what a K-FAC layer of width n holds, factor-forming vs resistor-array (rows)
mode, at batch ``batch`` — measured from the tensors held.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import KFACPreconditioner
from ..solvers import CGSolver, CholeskySolver, HardwareModel, ThermodynamicSolver
from ..timing import median_seconds
from .progress import each


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    evals = torch.logspace(-2, 0, n, dtype=torch.float64)
    return ((q * evals) @ q.mT).float()


def _held_bytes(n: int, batch: int, storage: str) -> int:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, n), nn.Tanh(), nn.Linear(n, 4))
    pre = KFACPreconditioner(model, solver=ThermodynamicSolver(), factor_decay=0.0,
                             kl_clip=None, factor_storage=storage)
    x, y = torch.randn(batch, n), torch.randint(0, 4, (batch,))
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    held = pre.memory_bytes()["total"]
    pre.remove()
    return held


def fit_exponent(ns: list[int], seconds: list[float]) -> float:
    """Slope of log(seconds) vs log(n) over the larger half of the sizes."""
    half = max(2, len(ns) // 2)
    slope, _ = np.polyfit(np.log(ns[-half:]), np.log(seconds[-half:]), 1)
    return float(slope)


def scaling(out: Path, ns: list[int], repeats: int, batch: int) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hw = HardwareModel()
    chol, cg = CholeskySolver(), CGSolver(tol=1e-6)
    rows = []
    for n in each(ns, "scaling", describe=lambda n: f"n = {n}"):
        m = _spd(n)
        b = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
        prepared = chol.prepare(m, 0.0)
        alpha_min = 1e-2 / float(m.abs().sum(1).max())  # λ_min after the device's scaling
        model = {name: (hw.time_program(n) + hw.time_solve(
            n, n, alpha_min=alpha_min, t0_rc=np.log(1e3) / alpha_min, window_rc=0.0,
            settle_model=name)).total_s for name in ("rc", "rc_over_alpha_min", "target_error")}
        rows.append({
            "n": n,
            "cholesky_inverse_s": median_seconds(lambda m=m: chol.inverse(chol.prepare(m, 0.0)),
                                            repeats),
            "cholesky_solve_s": median_seconds(lambda m=m, b=b: chol.solve(chol.prepare(m, 0.0), b),
                                          repeats),
            "cholesky_apply_s": median_seconds(lambda p=prepared, b=b: chol.solve(p, b), repeats),
            "cg_solve_s": median_seconds(lambda m=m, b=b: cg.solve(cg.prepare(m, 0.0), b),
                                    max(1, repeats // 3)),
            "model_s": model,
            "held_bytes_matrix": _held_bytes(n, batch, "matrix"),
            "held_bytes_rows": _held_bytes(n, batch, "rows"),
        })
    keys = ("cholesky_inverse_s", "cholesky_solve_s", "cholesky_apply_s", "cg_solve_s")
    ns_list = [r["n"] for r in rows]
    exponents = {k: fit_exponent(ns_list, [r[k] for r in rows]) for k in keys}
    exponents["model_rc"] = fit_exponent(ns_list, [r["model_s"]["rc"] for r in rows])
    result = {"config": {"ns": ns, "repeats": repeats, "batch": batch,
                         "threads": torch.get_num_threads()},
              "rows": rows, "exponents": exponents}
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    return result
