"""Worker functions of the distributed tests; each runs inside a rank started by
:func:`thermokfac.distributed.run_workers` (the process group is already set up)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.distributed import DistributedKFACPreconditioner
from thermokfac.solvers import HardwareModel, ThermodynamicSolver

STEPS, BATCH = 5, 16


class TokenNet(nn.Module):
    """Embedding (diagonal A) → Linear → Linear: every layer kind with a Kronecker factor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.hidden = nn.Linear(18, 10)
        self.out = nn.Linear(10, 4)

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embed(tokens).flatten(1))))


class LayerNet(nn.Module):
    """Multi-block layers: attention (four blocks), a grouped Conv1d (one block per
    group) and a transposed convolution, between an embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv1d(8, 6, 3, groups=2, padding=1, padding_mode="circular")
        self.up = nn.ConvTranspose1d(6, 4, 2, stride=2)
        self.out = nn.Linear(24, 4)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.up(torch.tanh(self.conv(x.transpose(1, 2))))
        return self.out(torch.tanh(x).flatten(1))


MODELS = {"token": TokenNet, "layers": LayerNet}


def data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 12, (BATCH, 3), generator=g), torch.randint(0, 4, (BATCH,),
                                                                          generator=g)


def train(model: nn.Module, pre, opt, rank: int, world: int, mc: bool = False,
          device: torch.device | None = None) -> None:
    """STEPS steps; this rank takes its contiguous share of every batch."""
    share = BATCH // world
    for step in range(STEPS):
        x, y = data(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        if device is not None:
            x, y = x.to(device), y.to(device)
        opt.zero_grad()
        logits = model(x)
        nn.functional.cross_entropy(logits, y).backward(retain_graph=mc)
        pre.step(outputs=logits if mc else None)
        opt.step()


KFAC = {"damping": 0.05, "factor_decay": 0.5, "inv_update_steps": 2, "kl_clip": 1e-2,
        "lr": 0.2}


def options(method: str, solver: str, fisher: str, storage: str) -> dict:
    kw = {**KFAC, "method": method, "fisher_type": fisher, "factor_storage": storage}
    if storage == "rows":  # the resistor-array mode keeps only the current batch
        kw["factor_decay"] = 0.0
    if solver == "thermodynamic":
        kw["solver"] = ThermodynamicSolver(target_error=1e-3)
        kw["seed"] = 3
    else:
        kw["solver"] = solver
    return kw


def single(method: str, solver: str = "cholesky", fisher: str = "empirical",
           storage: str = "matrix", net: str = "token"):
    """The reference: one process, the whole batch."""
    torch.manual_seed(0)
    model = MODELS[net]().double()
    pre = KFACPreconditioner(model, **options(method, solver, fisher, storage))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    train(model, pre, opt, 0, 1, mc=fisher != "empirical")
    return model, pre


def equivalence(out: str, strategy: str, method: str, solver: str = "cholesky",
                fisher: str = "empirical", storage: str = "matrix", net: str = "token") -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    inner = MODELS[net]().double()
    model = nn.parallel.DistributedDataParallel(inner)
    pre = DistributedKFACPreconditioner(model, strategy=strategy,
                                        **options(method, solver, fisher, storage))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    train(model, pre, opt, rank, world, mc=fisher != "empirical")
    torch.save({"params": {k: v.detach() for k, v in inner.named_parameters()},
                "factors": pre.factors(), "owners": pre.assignment.owners,
                "collectives": pre.collectives, "kl": pre.stats["kl_clip_scale"]},
               f"{out}.{rank}")


def cuda_equivalence(out: str, strategy: str, method: str, solver: str = "cholesky") -> None:
    """The same training on this rank's GPU (NCCL where the launcher chose it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    inner = TokenNet().double().to(device)
    model = nn.parallel.DistributedDataParallel(inner, device_ids=[rank])
    pre = DistributedKFACPreconditioner(model, strategy=strategy,
                                        **options(method, solver, "empirical", "matrix"))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    train(model, pre, opt, rank, world, device=device)
    torch.save({"params": {k: v.detach().cpu() for k, v in inner.named_parameters()},
                "backend": dist.get_backend(), "collectives": pre.collectives},
               f"{out}.{rank}")


def failing(out: str, how: str) -> None:
    """Rank 1 fails inside its third K-FAC step (an exception, or the process killed);
    rank 0 must come out with an error instead of waiting forever."""
    import os
    import signal

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TokenNet().double())
    pre = DistributedKFACPreconditioner(model, strategy="mem-opt", **options(
        "solve", "cholesky", "empirical", "matrix"))
    if rank == 1:  # fails inside the solver's prepare of step 2 (rank 1 owns blocks)
        original = pre.solver.prepare

        def broken(*args, **kwargs):
            if pre.steps == 2:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("injected failure")
            return original(*args, **kwargs)
        pre.solver.prepare = broken
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    train(model, pre, opt, rank, world)


def thermodynamic(out: str, strategy: str, method: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    inner = TokenNet()
    model = nn.parallel.DistributedDataParallel(inner)
    solver = ThermodynamicSolver(hardware=HardwareModel(n_spus=1), input_bits=8,
                                 target_error=1e-2)
    pre = DistributedKFACPreconditioner(model, strategy=strategy, method=method,
                                        solver=solver, **KFAC, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    train(model, pre, opt, rank, world)
    local = []
    for step in range(STEPS):  # a few more steps, recording this rank's own device time
        x, y = data(STEPS + step)
        share = BATCH // world
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[rank * share:(rank + 1) * share]),
                                    y[rank * share:(rank + 1) * share]).backward()
        pre.step()
        opt.step()
        local.append((pre.local_modeled_s, pre.last_timings.modeled_hardware_s))
    torch.save({"params": {k: v.detach() for k, v in inner.named_parameters()},
                "modeled": local, "owners": pre.assignment.owners}, f"{out}.{rank}")


def train_run(out: str, steps: str, strategy: str, solver: str, resume: str) -> None:
    """``Run`` on 2 ranks (the CLI's training loop): fresh, or resumed from its folder."""
    from thermokfac.experiments.train import Run, TrainConfig

    cfg = TrainConfig(data="digits", width=24, steps=int(steps), eval_every=4, batch_size=64,
                      kfac=True, optimizer="sgd", lr=0.05, damping=0.01, solver=solver,
                      dist_strategy=strategy, threads=1, device="cpu", inv_update_steps=3,
                      input_bits=8 if solver == "thermodynamic" else None)
    run = Run.resume(out, steps=int(steps)) if resume == "1" else Run(cfg, out)
    run.train(progress=False)
    torch.save({k: v.clone() for k, v in run.net.state_dict().items()},
               f"{out}/params.{dist.get_rank()}")


def plain_on_ddp(out: str) -> None:
    """A plain KFACPreconditioner on a DDP model with 2 ranks must refuse to start."""
    from pathlib import Path

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TokenNet().double())
    try:
        KFACPreconditioner(model, kl_clip=None)
    except RuntimeError as err:
        message = str(err)
    else:
        message = "no error"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{dist.get_rank()}.txt").write_text(message)
    # built on the bare model, wrapped afterwards: warned at the first step
    import warnings

    bare = TokenNet().double()
    pre = KFACPreconditioner(bare, kl_clip=None)
    wrapped = nn.parallel.DistributedDataParallel(bare)
    x, y = data(0)
    nn.functional.cross_entropy(wrapped(x), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre.step()
    text = " ".join(str(w.message) for w in caught)
    (Path(out) / f"late{dist.get_rank()}.txt").write_text(
        f"{pre.stats['multi_rank_warnings']}|{text}")


def kfac_optimizer_ddp(out: str) -> None:
    """``KFACOptimizer`` on a DDP model: it builds the distributed preconditioner."""
    from thermokfac import KFACOptimizer

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    inner = MODELS["token"]().double()
    model = nn.parallel.DistributedDataParallel(inner)
    kfac = {k: v for k, v in KFAC.items() if k != "lr"}
    opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.2), method="inverse",
                        **kfac)
    share = BATCH // world
    for step in range(STEPS):
        x, y = data(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save({"params": {k: v.detach() for k, v in inner.named_parameters()},
                "kind": type(opt.preconditioner).__name__}, f"{out}.{rank}")


def mismatched(out: str) -> None:
    """Rank 1 builds a wider hidden layer than rank 0; construction must say so on every
    rank (written to out.<rank>) instead of a later collective aborting."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6 + rank), nn.Tanh(), nn.Linear(6 + rank, 2))
    try:
        DistributedKFACPreconditioner(model)
    except ValueError as err:
        with open(f"{out}.{rank}", "w") as fh:
            fh.write(str(err))


def mismatched_setting(out: str) -> None:
    """Same model, but rank 1 asks for another damping and factor interval (a launch
    script that reads its settings per rank); construction must say so on every rank."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)))
    try:
        DistributedKFACPreconditioner(model, damping=0.05 * (1 + rank),
                                      factor_update_steps=1 + rank)
        message = "accepted"
    except ValueError as err:
        message = str(err)
    with open(f"{out}.{rank}", "w") as fh:
        fh.write(message)
