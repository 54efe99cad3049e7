"""``thermokfac quantize`` (paper Fig. 4): K-FAC on a quantized device vs Adam.

For each precision — integer ``bits`` and full precision (fp32, the device without
quantization) — and each seed, Thermodynamic K-FAC is trained with the input (programmed
matrix, conservative quantizer by default) or the output (ADC) quantized; Adam is
trained with the same seeds. Validation accuracy per evaluation is averaged over seeds
(mean ± one standard deviation). Full precision is one set of runs shared by both panels.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from .train import Run, TrainConfig


def _curve(runs: list[Run], metric: str) -> dict[str, list[float]]:
    steps = [m["step"] for m in runs[0].metrics]
    values = [[r.metrics[i][metric] for r in runs] for i in range(len(steps))]
    return {"step": steps, "mean": [statistics.fmean(v) for v in values],
            "std": [statistics.pstdev(v) if len(v) > 1 else 0.0 for v in values]}


def quantize_sweep(base: TrainConfig, out: Path, bits: list[int], seeds: list[int],
                   adam_lr: float, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    thermo = replace(base, kfac=True, solver="thermodynamic")
    plans: dict[str, TrainConfig] = {"fp32": thermo}
    for b in bits:
        plans[f"input-{b}"] = replace(thermo, input_bits=b)
        plans[f"output-{b}"] = replace(thermo, output_bits=b)
    plans["adam"] = replace(base, kfac=False, optimizer="adam", lr=adam_lr)
    runs: dict[str, list[Run]] = {}
    for name, cfg in plans.items():
        runs[name] = []
        for seed in seeds:
            run = Run(replace(cfg, seed=seed), out / "runs" / f"{name}-seed{seed}")
            run.train(progress=progress, checkpoint=False, label=f"{name} bits, seed {seed}"
                      if name != "adam" else f"adam, seed {seed}")
            runs[name].append(run)
    task = runs["adam"][0].task
    metric = "val_accuracy" if task.metric == "accuracy" else "val_rmse"
    curves = {name: _curve(rs, metric) for name, rs in runs.items()}
    final = {name: {"mean": c["mean"][-1], "std": c["std"][-1]} for name, c in curves.items()}
    stats = {name: {k: statistics.fmean(r.pre.stats.get(k, 0.0) for r in rs)
                    for k in ("prepare_failures", "passthrough_layers")}
             for name, rs in runs.items() if rs[0].pre is not None}
    result = {"config": {"base": base.__dict__, "bits": bits, "seeds": seeds,
                         "adam_lr": adam_lr},
              "metric": metric, "curves": curves, "final": final, "stats": stats,
              "title": f"{base.model} on {task.name}: Thermodynamic K-FAC with quantized "
                       f"input / output vs Adam ({len(seeds)} seeds)"}
    (out / "quantize.json").write_text(json.dumps(result, indent=2))
    return result
