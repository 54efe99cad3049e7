"""Writes ``state_v1.pt``: checkpoints of format version 1 and the runs they belong to.

Run with the code that wrote format 1 first on the path (commit 56bbb4b, before the
block redesign)::

    git worktree add /tmp/v1 56bbb4b
    PYTHONPATH=/tmp/v1/src python tests/data/make_state_v1.py

For each configuration: the model, optimizer and preconditioner state after 4 steps,
and the parameters that code reached after 7 uninterrupted steps.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import thermokfac
from thermokfac import KFACPreconditioner

CONFIGS = {"solve": {"method": "solve"}, "inverse": {"method": "inverse"},
           "pi_eigh": {"method": "solve", "solver": "eigh", "damping_split": "pi"}}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(12, 3), nn.Flatten(), nn.Linear(6, 8), nn.Tanh(),
                         nn.Linear(8, 4)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    return torch.randint(0, 12, (16, 2), generator=g), torch.randint(0, 4, (16,), generator=g)


def build(config: dict):
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pre = KFACPreconditioner(net, optimizer=opt, damping=0.05, factor_decay=0.7,
                             inv_update_steps=3, seed=5, **config)
    return net, opt, pre


def train(net, opt, pre, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        pre.step()
        opt.step()


def main() -> None:
    out = {}
    for name, config in CONFIGS.items():
        net, opt, pre = build(config)
        train(net, opt, pre, range(4))
        # deep copies: state dicts hold the live tensors that training goes on changing
        saved = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(),
                               "pre": pre.state_dict()})
        train(net, opt, pre, range(4, 7))
        saved["params_at_7"] = {k: v.detach().clone() for k, v in net.named_parameters()}
        out[name] = saved
    out["written_by"] = f"thermokfac {thermokfac.__version__}, checkpoint format 1"
    torch.save(out, Path(__file__).with_name("state_v1.pt"))


if __name__ == "__main__":
    main()
