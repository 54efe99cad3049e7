"""
A CNN with BatchNorm
====================

Convolutions get Kronecker factors through expand (the paper's Eqs. 18–19: every
spatial position is a row of A and G); BatchNorm layers have no K-FAC helper and are
left to the base optimizer, as the notice printed at construction says. Here a small
CNN on scikit-learn's 8×8 ``digits``, with K-FAC in front of AdamW (its recipe:
relative damping and grafting onto the gradient's norm) against AdamW alone.
"""

# %%
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from thermokfac import KFACOptimizer

x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16, dtype=torch.float32).view(-1, 1, 8, 8)
y = torch.tensor(y)


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def train(use_kfac: bool, steps: int = 120) -> list[float]:
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if use_kfac:
        opt = KFACOptimizer(model, opt)
        print("recipe in front of AdamW:", opt.preconditioner.recipe)
    losses = []
    for step in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


adamw, kfac = train(False), train(True)
tail = slice(-20, None)
print(f"mean loss over the last 20 steps: AdamW {sum(adamw[tail]) / 20:.4f}, "
      f"K-FAC + AdamW {sum(kfac[tail]) / 20:.4f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(adamw, label="AdamW")
ax.semilogy(kfac, label="K-FAC + AdamW")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.legend()
fig.tight_layout()
