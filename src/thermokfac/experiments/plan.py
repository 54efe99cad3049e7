"""``thermokfac plan`` (beyond the paper): what a thermodynamic K-FAC deployment needs.

For a model and batch size: the Kronecker-factor dimensions of every layer; the SPUs
needed to give every (non-diagonal) factor its own; the predicted per-step time of the
K-FAC work digitally (Cholesky prepare every ``inv_update_steps`` + two solve banks per
layer, priced from this machine's measured times for each size) and on the device (the
hardware model: programming, settling, transfers); and the speed-up as a function of
the bits per value and of RC. Predictions, not measurements: the digital side reuses
measured costs per dimension, the device side is the model of App. E under the RC settle
model only (no α_min is known here); :mod:`.breakeven` prices the whole step under every
settle model from a real run's factors.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import KFACPreconditioner
from ..solvers import CholeskySolver, HardwareModel
from ..timing import median_seconds
from .tasks import build_model, load_task
from .train import TrainConfig


def _measure(n: int, k: int, repeats: int = 3) -> tuple[float, float]:
    """Measured (prepare, solve of k columns) seconds of the Cholesky solver at size n."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=gen)
    m = x.mT @ x / (2 * n)
    b = torch.randn(n, k, generator=gen)
    solver = CholeskySolver()

    prepared = solver.prepare(m, 1e-3)
    return (median_seconds(lambda: solver.prepare(m, 1e-3), repeats),
            median_seconds(lambda: solver.solve(prepared, b), repeats))


def plan(cfg: TrainConfig, out: Path, bits: list[int], rcs_us: list[float],
         inv_update_steps: int = 10) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(cfg.data, limit=cfg.limit or 256, data_dir=cfg.data_dir,
                     context=cfg.context, seed=cfg.seed)
    model = build_model(cfg.model, task, width=cfg.width, depth=cfg.depth, heads=cfg.heads)
    pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=task.kfac_approx)
    layers, cache = [], {}
    for name in pre.layer_names:
        helper = pre._records[name].helper
        a_dim = None if helper.diagonal_a else helper.a_dim
        layers.append({"layer": name, "a_dim": a_dim, "g_dim": helper.d_out,
                       "diagonal_a": helper.diagonal_a})
    pre.remove()
    digital = 0.0
    for layer in layers:  # Method 2: bank G on DΘ's columns, bank A on Q's rows
        for n, k in ((layer["g_dim"], layer["a_dim"] or 1), (layer["a_dim"], layer["g_dim"])):
            if n is None:
                continue
            if (n, k) not in cache:
                cache[(n, k)] = _measure(n, k)
            prep, solve = cache[(n, k)]
            digital += prep / inv_update_steps + solve
    factors = [(n, k) for layer in layers for n, k in
               ((layer["g_dim"], layer["a_dim"] or 1), (layer["a_dim"], layer["g_dim"]))
               if n is not None]

    def device_time(hw: HardwareModel) -> float:
        jobs = []
        for n, k in factors:
            program = hw.time_program(n).scaled(1 / inv_update_steps)
            jobs.append(program + hw.time_solve(n, k, alpha_min=1.0, t0_rc=0.0, window_rc=0.0))
        return hw.step_time(jobs)

    base = HardwareModel(n_spus=len(factors), shared_link=False)
    grid = [{"bits": b, "rc_us": rc,
             "device_s": device_time(replace(base, input_bits=b, output_bits=b,
                                             rc_s=rc * 1e-6))} for b in bits for rc in rcs_us]
    for row in grid:
        row["speedup"] = digital / row["device_s"]
    shared = device_time(HardwareModel(n_spus=len(factors), shared_link=True))
    result = {"model": cfg.model, "data": cfg.data, "batch": cfg.batch_size,
              "layers": layers, "spus_needed": len(factors),
              "largest_factor": max(n for n, _ in factors),
              "digital_kfac_s": digital, "device_s_shared_link": shared,
              "device_s_per_spu_links": device_time(base), "grid": grid,
              "inv_update_steps": inv_update_steps,
              "note": "digital: measured Cholesky costs per size (Method 2, prepare amortised);"
                      " device: hardware model under the RC settle model only (settle 1 RC "
                      "whatever the spectrum; n² programming amortised, n·k values each way "
                      "per bank). For the whole step under every settle model with a real "
                      "run's spectra, use `thermokfac breakeven`"}
    (out / "plan.json").write_text(json.dumps(result, indent=2))
    return result

