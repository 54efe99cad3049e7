"""Workers of the FSDP2 checkpoint tests (``tests/test_fully_shard.py``): train the
equivalence suite's base case on FSDP2 with K-FAC, save through
``torch.distributed.checkpoint`` after ``SAVE_AT`` steps and go on (``save_and_go_on``),
or load such a checkpoint on any number of ranks and go on (``load_and_go_on``). Each
writes the parameters it ends with, gathered whole, to ``out.<rank>`` before the process
group is torn down."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from thermokfac.distributed import DistributedKFACPreconditioner
from thermokfac.distributed.checkpoint import KFACState

from . import equivalence as eq

SAVE_AT = 3


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, DistributedKFACPreconditioner]:
    model = eq.build("base")
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    pre = DistributedKFACPreconditioner(model, **{**eq.options(eq.CASES["base"]),
                                                  "optimizer": opt, "lr": None})
    return model, opt, pre


def _steps(model, opt, pre, start: int, stop: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    share = eq.BATCH // world
    mine = slice(rank * share, (rank + 1) * share)
    for step in range(start, stop):
        x, y, route = (t[mine] for t in eq.data("base", step))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x, route), y).backward()
        pre.step()
        opt.step()


def _state(model, opt, pre) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
            "kfac": KFACState(pre)}


def _write(model, out: str, held: int = 0) -> None:
    params = {k: v.detach().full_tensor() for k, v in model.named_parameters()}
    torch.save({"params": params, "held_after_load": held}, f"{out}.{dist.get_rank()}")


def save_and_go_on(folder: str, out: str) -> None:
    model, opt, pre = _setup()
    _steps(model, opt, pre, 0, SAVE_AT)
    dcp.save(_state(model, opt, pre), checkpoint_id=folder)
    _steps(model, opt, pre, SAVE_AT, eq.STEPS)
    _write(model, out)


def load_and_go_on(folder: str, out: str) -> None:
    model, opt, pre = _setup()
    state = _state(model, opt, pre)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert pre.steps == SAVE_AT, pre.steps
    held = pre.memory_bytes()["total"]  # each rank: the blocks it owns here
    _steps(model, opt, pre, SAVE_AT, eq.STEPS)
    _write(model, out, held)
