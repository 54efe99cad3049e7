"""
K-FAC in front of SGD on an MLP
===============================

The preconditioner rewrites each layer's gradient into the natural-gradient direction
U = (G + λI)⁻¹ DΘ (A + λI)⁻¹ (the paper's Eq. 15) before the base optimizer steps. Here
an MLP on scikit-learn's ``digits`` trains with SGD + momentum alone and with K-FAC in
front of the same SGD, from the same initialisation and the same batches.
"""

# %%
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from thermokfac import KFACPreconditioner

x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)


def train(use_kfac: bool, steps: int = 150) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = KFACPreconditioner(model, optimizer=opt) if use_kfac else None
    losses = []
    for step in range(steps):
        batch = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        if pre is not None:
            pre.step()  # A and G from this batch's hooks; U written into each .grad
        opt.step()
        losses.append(loss.item())
    return losses


sgd, kfac = train(False), train(True)
print(f"loss after {len(sgd)} steps: SGD {sgd[-1]:.4f}, K-FAC + SGD {kfac[-1]:.4f}")

# %%
# The training loss per step, on a log scale:
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(sgd, label="SGD + momentum")
ax.semilogy(kfac, label="K-FAC + SGD + momentum")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.legend()
fig.tight_layout()
