"""
K-FAC under Accelerate
======================

:class:`~thermokfac.KFACOptimizer` goes through ``accelerator.prepare`` like any
optimizer. Under ``accelerator.accumulate`` the preconditioner steps once per
optimizer step, on the synchronising micro-batch, with the factors of every
micro-batch — so two micro-batches of 32 give the same step as one batch of 64.
"""

# %%
import torch
from accelerate import Accelerator
from torch import nn

from thermokfac import KFACOptimizer

data = torch.Generator().manual_seed(0)
x = torch.randn(64, 20, generator=data, dtype=torch.float64)  # float64: compared to 1e-10
y = torch.randint(0, 5, (64,), generator=data)


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).double()
    return model, KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))


# one batch of 64, a plain loop
model, opt = build()
opt.zero_grad()
nn.functional.cross_entropy(model(x), y).backward()
opt.step()

# two micro-batches of 32 under Accelerate's gradient accumulation
accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
accumulated, opt2 = build()
accumulated, opt2 = accelerator.prepare(accumulated, opt2)
for part in (slice(0, 32), slice(32, 64)):
    with accelerator.accumulate(accumulated):
        # each micro-batch's loss is a mean over 32: half of it is the mean over 64
        accelerator.backward(nn.functional.cross_entropy(accumulated(x[part]), y[part]))
        opt2.step()
        opt2.zero_grad()

difference = max((p - q).abs().max().item()
                 for p, q in zip(model.parameters(), accumulated.parameters()))
print(f"largest difference between the two: {difference:.2e}")
assert difference < 1e-10
