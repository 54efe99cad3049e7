"""``thermokfac profile`` (paper Fig. 2): where the time of a K-FAC update goes.

Each step is split into the paper's four parts: **gradient** (forward + backward,
without the hooks' work), **curvature** (forming the factors and their moving average),
**inversion** (factorising / inverting) and **update** (computing U). Factors and
inverses are updated every step (as in the paper's profile), Method 1 by default; the
parts are averaged over ``repeats`` steps after one warm-up step. Inputs are random
tensors of the workload's shapes: the costs do not depend on the values.

Sweeps: (a) an MLP of fixed depth (50) vs width; (b) a GPT vs embedding width
(vocabulary 10⁴, context 64, batch 64, 3 layers, as the paper's App. C); (c) a GPT vs
vocabulary size (the untied V×V output-head factor dominates).

On a GPU (``device="cuda"``) every part is timed between ``torch.cuda.synchronize()``
calls, so the kernels' asynchronous launches do not hide their time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import KFACPreconditioner
from ..models import GPT, MLP
from .progress import each

PARTS = ("gradient", "curvature", "inversion", "update")


def profile_step(model: nn.Module, batch: Callable[[], tuple], loss_fn: Callable,
                 repeats: int, method: str = "inverse", solver: str = "cholesky",
                 **kfac: Any) -> dict[str, float]:
    """Mean seconds of each part of a K-FAC step (factors and inverses every step), on
    the device of ``model``'s parameters (``batch`` returns tensors there); the
    gradient is timed with the preconditioner's own clock (synchronised on a GPU)."""
    pre = KFACPreconditioner(model, solver=solver, method=method, factor_update_steps=1,
                             inv_update_steps=1, kl_clip=None, **kfac)
    totals = dict.fromkeys(PARTS, 0.0)
    for i in range(repeats + 1):
        x, y = batch()
        model.zero_grad(set_to_none=False)
        start = pre.timing.clock()
        loss_fn(model(x), y).backward()
        grad = pre.timing.clock() - start - pre.pending_curvature_s
        pre.step()
        if i == 0:
            continue  # warm-up: allocator, kernels' self-checks
        t = pre.last_timings
        for part, value in zip(PARTS, (grad, t.curvature_s, t.inversion_s, t.update_s)):
            totals[part] += value
    pre.remove()
    return {part: value / repeats for part, value in totals.items()}


def _classification(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def mlp_sweep(widths: list[int], depth: int, batch: int, repeats: int, input_dim: int = 3072,
              device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    rows = []
    for width in each(widths, "profile MLP", describe=lambda w: f"width {w}"):
        torch.manual_seed(0)
        model = MLP(input_dim, width, depth, 10).to(device)
        gen = torch.Generator().manual_seed(1)

        def data(width=width, gen=gen):
            return (torch.randn(batch, input_dim, generator=gen).to(device),
                    torch.randint(0, 10, (batch,), generator=gen).to(device))
        rows.append({"width": width, **profile_step(model, data, _classification, repeats)})
    return rows


def gpt_sweep(key: str, values: list[int], base: dict[str, int], batch: int, repeats: int,
              device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    rows = []
    for value in each(values, "profile GPT", describe=lambda v: f"{key} {v}"):
        cfg = {**base, key: value}
        torch.manual_seed(0)
        model = GPT(cfg["vocab"], cfg["context"], n_layer=cfg["n_layer"], n_embd=cfg["n_embd"],
                    n_head=cfg["n_head"], tie=False).to(device)
        gen = torch.Generator().manual_seed(1)

        def data(cfg=cfg, gen=gen):
            x = torch.randint(0, cfg["vocab"], (batch, cfg["context"]), generator=gen)
            y = torch.randint(0, cfg["vocab"], (batch, cfg["context"]), generator=gen)
            return x.to(device), y.to(device)
        rows.append({key: value, **profile_step(
            model, data, _classification, repeats, kfac_approx="expand",
            num_per_example_loss_terms=cfg["context"])})
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"cpu, {torch.get_num_threads()} threads (torch {torch.__version__})"


def profile(out: Path, *, widths: list[int], depth: int, mlp_batch: int, embds: list[int],
            vocabs: list[int], gpt_batch: int, context: int, n_layer: int, vocab: int,
            n_embd: int, repeats: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run the three sweeps on ``device`` and write ``profile.json``."""
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = {"vocab": vocab, "context": context, "n_layer": n_layer, "n_embd": n_embd,
            "n_head": 4}
    result = {
        "config": {"widths": widths, "depth": depth, "mlp_batch": mlp_batch, "embds": embds,
                   "vocabs": vocabs, "gpt_batch": gpt_batch, "gpt": base, "repeats": repeats,
                   "threads": torch.get_num_threads(), "method": "inverse",
                   "solver": "cholesky", "device": _device_name(device)},
    }
    sweeps = {"mlp_width": lambda: mlp_sweep(widths, depth, mlp_batch, repeats, device=device),
              "gpt_embd": lambda: gpt_sweep("n_embd", embds, base, gpt_batch, repeats,
                                            device=device),
              "gpt_vocab": lambda: gpt_sweep("vocab", vocabs, base, gpt_batch, repeats,
                                             device=device)}
    for key, run in sweeps.items():  # written after each sweep: a cut-off run keeps them
        result[key] = run()
        (out / "profile.json").write_text(json.dumps(result, indent=2))
    return result
