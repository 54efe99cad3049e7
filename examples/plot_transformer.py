"""
A transformer from ``nn.TransformerEncoderLayer``
=================================================

``nn.MultiheadAttention``'s query, key, value and output projections each get their
own Kronecker factors, and the feed-forward ``Linear`` layers theirs; the weight-sharing
dimension (the sequence) is handled by expand (Eqs. 18–19). The task: copy the first
token of a random sequence to every position — which needs attention — in 70 steps.
"""

# %%
import torch
from torch import nn

from thermokfac import KFACOptimizer

VOCAB, LENGTH, WIDTH = 16, 12, 32


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.randn(LENGTH, WIDTH) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=64,
                                                  dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (64, LENGTH), generator=torch.Generator().manual_seed(step))
    return tokens, tokens[:, :1].expand(-1, LENGTH)


def train(use_kfac: bool, steps: int = 70) -> float:
    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    if use_kfac:
        opt = KFACOptimizer(model, opt)
        print("Kronecker blocks:", opt.preconditioner.layer_names)
    for step in range(steps):
        tokens, target = batch(step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
    tokens, target = batch(10_000)
    with torch.no_grad():
        return (model(tokens).argmax(-1) == target).float().mean().item()


print(f"accuracy on fresh sequences: Adam {train(False):.3f}, K-FAC + Adam {train(True):.3f}")
