"""``thermokfac breakeven``: what device makes Thermodynamic K-FAC worth building.

For one model and batch, two short real training runs are made with the same settings:
a digital one (Cholesky, Method 2), which measures the K-FAC step and the part of it a
device would take over (the prepares and the time inside the solves, ``inversion_s +
solve_s``, averaged over steps so that prepares every ``inv_update_steps`` are
amortised); and a thermodynamic one, which records what the device would be given —
each factor's dimension, the α_min of its device matrix and the burn-in t₀ and window T
its simulation used for the target error.

From these, the estimated Method 2 step on a device is

    measured digital step − the part taken over + modelled device time,

the device time being that of :class:`~thermokfac.solvers.HardwareModel` for the
programs (amortised) and the two solve banks of every layer, spread over ``n_spus``. The
speed-up digital step / device step is mapped over RC (0.01–10 µs) × link bandwidth
(10–400 Gb/s) for each settle model (``rc``, ``rc_over_alpha_min``, ``target_error``)
and 8 and 16 bits, with the break-even contour (speed-up = 1) and the paper's point
(RC = 1 µs, 50 Gb/s, 16 bits). Measured parts come from this machine; the device part
is a model (App. E).

With a ``schedule`` — the cheapest device a frontier found training to tolerate
(``--schedule-from results/frontier_mlp/frontier.json``, :func:`.frontier.tolerated_schedule`)
— a third run simulates that device, and the ``target_error`` settle model's maps are
drawn once more for its burn-in and window: the device time training actually needs,
beside that of the 10⁻³ target error. (The ``rc`` and ``rc_over_alpha_min`` clocks do not
depend on t₀ and T.)
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..solvers import HardwareModel, SettleModel
from .config import _THERMO
from .train import Run, TrainConfig

RCS_US = np.logspace(-2, 1, 25)
LINKS_GBPS = np.logspace(1, math.log10(400), 25)
BITS = (8, 16)
PAPER = {"rc_us": 1.0, "link_gbps": 50.0, "bits": 16}


def solve_banks(run: Run) -> list[dict[str, float]]:
    """Per Method 2 solve bank of every layer: its dimension n, right-hand sides k, the
    α_min, t₀ and window T (RC units) of the device matrix the simulation used, and the
    device reads per solve and matrices programmed per prepare (mitigation, the ADC's
    calibration read)."""
    banks = []
    for name, block in run.pre.blocks.items():
        helper = block.helper
        for which, prep, k in (("g", block.g_prep, helper.a_dim),
                               ("a", block.a_prep, helper.d_out)):
            if prep is None:  # a diagonal A (embeddings): no device work
                continue
            t = prep.tensors
            sched = run.pre.solver.schedule(prep)
            banks.append({"layer": name, "factor": which, "n": prep.n, "k": k,
                          "alpha_min": float(t["alpha_min"]), "t0_rc": sched.t0,
                          "window_rc": sched.duration,
                          "reads": run.pre.solver.reads_per_solve,
                          "programs": run.pre.solver.programs_per_prepare})
    return banks


def device_step_s(banks: list[dict[str, float]], hw: HardwareModel,
                  inv_update_steps: int) -> float:
    """Modelled device seconds per step: every factor programmed (``programs`` times)
    once per ``inv_update_steps`` (amortised) and solved once per step (``reads`` device
    reads)."""
    jobs = []
    for bank in banks:
        program = hw.time_program(int(bank["n"])).scaled(
            bank.get("programs", 1) / inv_update_steps)
        solve = hw.time_solve(int(bank["n"]), int(bank["k"]), alpha_min=bank["alpha_min"],
                              t0_rc=bank["t0_rc"], window_rc=bank["window_rc"]
                              ).scaled(bank.get("reads", 1))
        jobs.append(program + solve)
    return hw.step_time(jobs)


def device_settings(schedule: dict[str, Any]) -> dict[str, Any]:
    """The device fields of a frontier schedule's settings (:data:`.config._THERMO`).

    Raises:
        ValueError: The schedule also sets something that is not the device's (a prepare
            interval, Method 1), which would change the digital run it is compared with.
    """
    other = {k: v for k, v in schedule["set"].items()
             if k not in _THERMO and not (k == "method" and v == "solve")}
    if other:
        listed = ", ".join(f"{k}={v!r}" for k, v in other.items())
        raise ValueError(f"schedule {schedule['name']!r} also sets {listed}, which is not the "
                         "device's: breakeven compares Method 2 steps at the command's own "
                         "K-FAC settings (give them as options instead)")
    return {k: v for k, v in schedule["set"].items() if k in _THERMO}


def _panels(banks: list[dict[str, float]], models: list[SettleModel], n_spus: int,
            inv_update_steps: int, step_s: float, taken_s: float, label: str = ""
            ) -> list[dict[str, Any]]:
    panels = []
    for model in models:
        for bits in BITS:
            grid = [[step_s / (step_s - taken_s + device_step_s(
                banks, HardwareModel(rc_s=rc * 1e-6, link_gbps=link, input_bits=bits,
                                     output_bits=bits, n_spus=n_spus, shared_link=False,
                                     settle_model=model), inv_update_steps))
                     for rc in RCS_US] for link in LINKS_GBPS]
            panels.append({"settle_model": model.value + label, "bits": bits,
                           "speedup": grid})
    return panels


def _at_paper(banks: list[dict[str, float]], n_spus: int, inv_update_steps: int,
              step_s: float, taken_s: float) -> dict[str, float]:
    return {m.value: step_s / (step_s - taken_s + device_step_s(
        banks, HardwareModel(rc_s=PAPER["rc_us"] * 1e-6, link_gbps=PAPER["link_gbps"],
                             n_spus=n_spus, shared_link=False, settle_model=m),
        inv_update_steps)) for m in SettleModel}


def breakeven(cfg: TrainConfig, out: Path, progress: bool = True,
              schedule: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run both short trainings (``cfg.steps`` steps each) into ``out`` and write
    ``breakeven.json``; the device has ``cfg.n_spus`` SPUs, one link each.

    Args:
        cfg: The workload and K-FAC settings (Method 2 is used).
        out: The run folder.
        progress: Show progress.
        schedule: A frontier's tolerated schedule (:func:`.frontier.tolerated_schedule`):
            a third run simulates it and its ``target_error`` maps are added.

    Raises:
        ValueError: If ``cfg.steps`` is smaller than ``inv_update_steps`` + 1 (no
            prepare after the first step to amortise), or ``schedule`` sets more than
            the device (:func:`device_settings`).
    """
    device = device_settings(schedule) if schedule is not None else None
    steps, n_spus = cfg.steps, cfg.n_spus
    if steps <= cfg.inv_update_steps:
        raise ValueError(f"steps={steps} must exceed inv_update_steps="
                         f"{cfg.inv_update_steps} so that a prepare after the first step "
                         "is measured")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    base = replace(cfg, kfac=True, method="solve", steps=steps, eval_every=steps,
                   checkpoint_every=0)
    digital = Run(replace(base, solver="cholesky"), out / "digital")
    digital.train(progress=progress, checkpoint=False, label="breakeven: digital K-FAC")
    thermo = Run(replace(base, solver="thermodynamic"), out / "thermodynamic")
    thermo.train(progress=progress, checkpoint=False, label="breakeven: thermodynamic")
    measured = digital.steps[1:]  # the first step compiles caches and allocates
    step_s = statistics.fmean(s["wall_s"] for s in measured)
    taken_s = statistics.fmean(s["inversion_s"] + s["solve_s"] for s in measured)
    banks = solve_banks(thermo)
    args = (cfg.n_spus, cfg.inv_update_steps, step_s, taken_s)
    panels = _panels(banks, list(SettleModel), *args)
    paper = _at_paper(banks, *args)
    scheduled = None
    if schedule is not None and device is not None:
        run = Run(replace(base, solver="thermodynamic", **device),
                  out / "thermodynamic_schedule")
        run.train(progress=progress, checkpoint=False,
                  label=f"breakeven: the tolerated device ({schedule['name']})")
        tolerated = solve_banks(run)
        panels += _panels(tolerated, [SettleModel.TARGET_ERROR], *args,
                          label=f", tolerated: {schedule['name']}")
        scheduled = {**schedule, "set": device, "banks": tolerated,
                     "speedup_at_paper_point": _at_paper(tolerated, *args)}
    result = {"model": cfg.model, "data": cfg.data, "batch": cfg.batch_size,
              "steps": steps, "inv_update_steps": cfg.inv_update_steps, "n_spus": n_spus,
              "digital_step_s": step_s, "taken_over_s": taken_s,
              "taken_over_share": taken_s / step_s, "banks": banks,
              "rcs_us": RCS_US.tolist(), "links_gbps": LINKS_GBPS.tolist(),
              "panels": panels, "paper_point": PAPER, "speedup_at_paper_point": paper,
              "schedule": scheduled,
              "load_average_before": list(load_before),
              "load_average_after": list(os.getloadavg()),
              "note": "speed-up = measured digital K-FAC step / (measured step − prepares "
                      "and solves + modelled device time); device: programs amortised "
                      "over inv_update_steps, two solve banks per layer, one link per SPU"}
    (out / "breakeven.json").write_text(json.dumps(result, indent=2))
    return result
