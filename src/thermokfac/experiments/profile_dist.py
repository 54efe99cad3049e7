"""``thermokfac profile --nproc N``: a K-FAC step's parts with 1 and N processes.

The analogue of the paper's Table 4 (the inversion's share of the step, on 4×V100 and
8×A100): an MLP of ``depth`` × ``width`` (and optionally a GPT) on random inputs,
data-parallel (DDP, gloo on CPU) with
:class:`~thermokfac.distributed.DistributedKFACPreconditioner`, factors and inverses
every step, the global batch split over the processes. The machine's
``total_threads`` are divided among the processes (1 process × 2 threads vs 2 × 1 on
two cores), so the comparison is at equal hardware. Each part is the mean over
``repeats`` steps after a warm-up step, as rank 0 measures it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import DistributedKFACPreconditioner, run_workers
from ..models import GPT, MLP
from .progress import each

PARTS = ("gradient", "curvature", "inversion", "update")


def _worker(config_json: str, out: str) -> None:
    cfg = json.loads(config_json)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    gpt = cfg.get("gpt")
    extra: dict[str, Any] = {}
    if gpt is None:
        net: nn.Module = MLP(cfg["input_dim"], cfg["width"], cfg["depth"], 10)
    else:
        net = GPT(gpt["vocab"], gpt["context"], n_layer=gpt["n_layer"], n_embd=gpt["n_embd"],
                  n_head=4)
        extra = {"kfac_approx": "expand", "num_per_example_loss_terms": gpt["context"]}
    model = nn.parallel.DistributedDataParallel(net)
    pre = DistributedKFACPreconditioner(
        model, strategy=cfg["strategy"], solver=cfg["solver"], method=cfg["method"],
        factor_update_steps=1, inv_update_steps=1, kl_clip=None, **extra)
    gen = torch.Generator().manual_seed(1 + rank)
    share = cfg["batch"] // world
    totals = dict.fromkeys((*PARTS, "step"), 0.0)
    for i in range(cfg["repeats"] + 1):
        if gpt is None:
            x = torch.randn(share, cfg["input_dim"], generator=gen)
            y = torch.randint(0, 10, (share,), generator=gen)
        else:
            x = torch.randint(0, gpt["vocab"], (share, gpt["context"]), generator=gen)
            y = torch.randint(0, gpt["vocab"], (share, gpt["context"]), generator=gen)
        dist.barrier()
        start = time.perf_counter()
        model.zero_grad(set_to_none=False)
        logits = model(x)
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                    y.reshape(-1)).backward()
        grad = time.perf_counter() - start - pre.pending_curvature_s
        pre.step()
        step = time.perf_counter() - start
        if i == 0:
            continue
        t = pre.last_timings
        for part, value in zip((*PARTS, "step"),
                               (grad, t.curvature_s, t.inversion_s, t.update_s, step)):
            totals[part] += value
    if rank == 0:
        means = {k: v / cfg["repeats"] for k, v in totals.items()}
        Path(out).write_text(json.dumps({**means, "imbalance": pre.assignment.imbalance,
                                         "loads": list(pre.assignment.loads)}))


def profile_nproc(out: Path, *, nprocs: list[int], widths: list[int], depth: int, batch: int,
                  repeats: int, total_threads: int, strategy: str = "comm-opt",
                  solver: str = "cholesky", method: str = "inverse", input_dim: int = 784,
                  gpt: dict[str, int] | None = None, gpt_batch: int = 32,
                  progress: bool = True) -> dict[str, Any]:
    """Profile every MLP width (and the GPT ``gpt``, if given: vocab, context, n_layer,
    n_embd) with each process count; write ``profile_nproc.json``."""
    for n in nprocs:
        if n < 1 or batch % n or gpt_batch % n:
            raise ValueError(f"nproc={n} must be positive and divide the batches "
                             f"({batch}, {gpt_batch})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    models: list[tuple[str, Any]] = [(f"mlp-{w}", w) for w in widths]
    if gpt is not None:
        models.append((f"gpt-{gpt['n_embd']}-v{gpt['vocab']}", None))
    jobs = [(name, w, n) for name, w in models for n in nprocs]
    with tempfile.TemporaryDirectory() as tmp:
        for name, width, n in each(jobs, "profile", progress,
                                   lambda j: f"{j[0]} width {j[1]} on {j[2]} processes"):
            cfg = {"input_dim": input_dim, "width": width, "depth": depth, "batch": batch,
                   "repeats": repeats, "strategy": strategy, "solver": solver,
                   "method": method}
            if width is None:
                cfg.update(gpt=gpt, batch=gpt_batch)
            path = Path(tmp) / f"{name}_{n}.json"
            run_workers("thermokfac.experiments.profile_dist:_worker", n,
                        [json.dumps(cfg), str(path)], timeout=3600,
                        threads=max(1, total_threads // n))
            measured = json.loads(path.read_text())
            share = measured["inversion"] / measured["step"] if measured["step"] else 0.0
            rows.append({"model": name, "width": width, "nproc": n, **measured,
                         "inversion_share": share})
    result = {"config": {"nprocs": nprocs, "widths": widths, "depth": depth, "batch": batch,
                         "gpt": gpt, "gpt_batch": gpt_batch,
                         "repeats": repeats, "total_threads": total_threads,
                         "strategy": strategy, "solver": solver, "method": method,
                         "backend": "gloo"},
              "rows": rows}
    (out / "profile_nproc.json").write_text(json.dumps(result, indent=2))
    return result
