"""``thermokfac plan`` (beyond the paper): what a thermodynamic K-FAC deployment needs.

For a model and batch size: the Kronecker-factor dimensions of every layer; the SPUs
needed to give every (non-diagonal) factor its own; the predicted per-step time of the
K-FAC work digitally (Cholesky prepare every ``inv_update_steps`` + two solve banks per
layer, priced from this machine's measured times for each size) and on the device (the
hardware model: programming, settling, transfers); and the speed-up as a function of
the bits per value and of RC. Predictions, not measurements: the digital side reuses
measured costs per dimension, the device side is the model of App. E.

The device is priced under every settle model: ``rc`` (the paper's convention, settle
1 RC whatever the spectrum), ``rc_over_alpha_min`` and ``target_error`` (t₀ + T of the
simulation). The last two need each factor's α_min, which only real factors give: a
short thermodynamic K-FAC run (``record_steps`` steps, Method 2) records the α_min, t₀
and T its simulation used for every solve bank, as :mod:`.breakeven` does. With
``record_steps=0`` nothing runs and those two columns are None, with the reason.
:mod:`.breakeven` prices the whole step (measured digital parts included).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import KFACPreconditioner
from ..solvers import CholeskySolver, HardwareModel, SettleModel
from ..timing import median_seconds
from .breakeven import device_step_s, solve_banks
from .tasks import build_model, load_task
from .train import Run, TrainConfig

NEEDS_SPECTRA = "needs the factors' α_min: run with record_steps > 0"


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


def _record(cfg: TrainConfig, out: Path, steps: int, progress: bool
            ) -> list[dict[str, float]]:
    """Solve banks (n, k, α_min, t₀, T) of a short thermodynamic K-FAC run."""
    run = Run(replace(cfg, kfac=True, method="solve", solver="thermodynamic", steps=steps,
                      eval_every=steps, checkpoint_every=0), out / "recorded")
    run.train(progress=progress, checkpoint=False, label="plan: recording α_min")
    return solve_banks(run)


def plan(cfg: TrainConfig, out: Path, bits: list[int], rcs_us: list[float],
         inv_update_steps: int = 10, record_steps: int = 5,
         progress: bool = False) -> dict[str, Any]:
    """Write ``plan.json`` into ``out`` and return it.

    Args:
        cfg: The model, data and K-FAC settings (damping, target error) to plan for.
        out: Output folder.
        bits: Bits per value (input and output) of the grid's rows.
        rcs_us: RC time constants (µs) of the grid's rows.
        inv_update_steps: Prepares amortised over this many steps.
        record_steps: Steps of the short thermodynamic run that records the factors'
            spectra (0: none; the α_min-based settle models are then not priced).
        progress: Show the recording run's progress bar.

    Raises:
        ValueError: If ``record_steps`` is negative.
    """
    if record_steps < 0:
        raise ValueError(f"record_steps={record_steps!r} must be >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    task = load_task(cfg.data, limit=cfg.limit or 256, data_dir=cfg.data_dir,
                     context=cfg.context, seed=cfg.seed)
    model = build_model(cfg.model, task, width=cfg.width, depth=cfg.depth, heads=cfg.heads)
    pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=task.kfac_approx)
    layers, cache = [], {}
    for name in pre.layer_names:
        helper = pre.block(name).helper
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

    banks = _record(replace(cfg, inv_update_steps=inv_update_steps), out, record_steps,
                    progress) if record_steps else None

    def device_time(hw: HardwareModel) -> float:
        jobs = []
        for n, k in factors:
            program = hw.time_program(n).scaled(1 / inv_update_steps)
            jobs.append(program + hw.time_solve(n, k, alpha_min=1.0, t0_rc=0.0, window_rc=0.0,
                                                settle_model=SettleModel.RC))
        return hw.step_time(jobs)

    def by_settle(hw: HardwareModel) -> dict[str, float | None]:
        times: dict[str, float | None] = {SettleModel.RC.value: device_time(hw)}
        for m in (SettleModel.RC_OVER_ALPHA_MIN, SettleModel.TARGET_ERROR):
            times[m.value] = None if banks is None else device_step_s(
                banks, replace(hw, settle_model=m), inv_update_steps)
        return times

    base = HardwareModel(n_spus=len(factors), shared_link=False)
    grid = []
    for b in bits:
        for rc in rcs_us:
            times = by_settle(replace(base, input_bits=b, output_bits=b, rc_s=rc * 1e-6))
            grid.append({"bits": b, "rc_us": rc, "device_s": times["rc"],
                         "speedup": digital / times["rc"], "device_s_by_settle": times,
                         "speedup_by_settle": {m: None if t is None else digital / t
                                               for m, t in times.items()}})
    shared = device_time(HardwareModel(n_spus=len(factors), shared_link=True))
    result = {"model": cfg.model, "data": cfg.data, "batch": cfg.batch_size,
              "layers": layers, "spus_needed": len(factors),
              "largest_factor": max(n for n, _ in factors),
              "digital_kfac_s": digital, "device_s_shared_link": shared,
              "device_s_per_spu_links": device_time(base), "grid": grid,
              "inv_update_steps": inv_update_steps, "record_steps": record_steps,
              "recorded_banks": banks, "load_average_before": list(load_before),
              "load_average_after": list(os.getloadavg()),
              "alpha_min_source": "the recorded run's (damping bound, the solver default)"
                                  if banks is not None else NEEDS_SPECTRA,
              "note": "digital: measured Cholesky costs per size (Method 2, prepare amortised);"
                      " device: hardware model (n² programming amortised, n·k values each way "
                      "per bank) under each settle model: rc = the paper's convention (settle "
                      "1 RC whatever the spectrum, far shorter than the time the simulation "
                      "needs for its accuracy); rc_over_alpha_min and target_error use the "
                      "α_min, t0 and T a short thermodynamic run's simulation used. For the "
                      "whole step with measured digital parts, use `thermokfac breakeven`"}
    (out / "plan.json").write_text(json.dumps(result, indent=2))
    return result

