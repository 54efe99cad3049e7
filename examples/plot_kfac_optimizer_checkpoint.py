"""
KFACOptimizer with a scheduler and a checkpoint
===============================================

:class:`~thermokfac.KFACOptimizer` is K-FAC and a base optimizer as one
``torch.optim.Optimizer``: a learning-rate scheduler drives it as any optimizer, and
its ``state_dict`` holds both parts (the Kronecker factors, their inverses and the
base optimizer's state). A run saved half-way and resumed continues exactly as the
uninterrupted run.
"""

# %%
import io

import torch
from torch import nn

from thermokfac import KFACOptimizer


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    opt = KFACOptimizer(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    return model, opt, scheduler


data = torch.Generator().manual_seed(1)
batches = [(torch.randn(32, 20, generator=data), torch.randint(0, 5, (32,), generator=data))
           for _ in range(40)]


def run(model, opt, scheduler, steps):
    for x, y in steps:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        scheduler.step()


model, opt, scheduler = build()  # uninterrupted: 40 steps
run(model, opt, scheduler, batches)

resumed, opt2, scheduler2 = build()  # 20 steps, saved, loaded into fresh objects, 20 more
run(resumed, opt2, scheduler2, batches[:20])
buffer = io.BytesIO()
torch.save({"model": resumed.state_dict(), "opt": opt2.state_dict(),
            "scheduler": scheduler2.state_dict()}, buffer)
buffer.seek(0)
saved = torch.load(buffer, weights_only=False)
resumed, opt2, scheduler2 = build()
resumed.load_state_dict(saved["model"])
opt2.load_state_dict(saved["opt"])
scheduler2.load_state_dict(saved["scheduler"])
run(resumed, opt2, scheduler2, batches[20:])

same = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
print(f"learning rate after 40 steps: {opt.param_groups[0]['lr']:g}")
print(f"resumed run equals the uninterrupted one bit for bit: {same}")
assert same
