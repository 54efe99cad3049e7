"""Graph isomorphism network for molecules (OGB featurisation), plain torch.

Nodes are the weight-sharing dimension: every Linear acts on all atoms of all graphs in
the batch. For K-FAC-reduce the rows must be summed per graph, so training code wraps
the forward in ``pre.grouped_rows(batch.membership)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.graphs import ATOM_DIMS, BOND_DIMS, GraphBatch


class FeatureEncoder(nn.Module):
    """Sum of one embedding per integer feature column."""

    def __init__(self, dims: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(d, width) for d in dims)

    def forward(self, features: Tensor) -> Tensor:
        return sum(table(features[:, i]) for i, table in enumerate(self.tables))


class GINLayer(nn.Module):
    """h'ᵢ = MLP((1 + ε) hᵢ + Σ_{j→i} ReLU(hⱼ + bond(eⱼᵢ)))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bond = FeatureEncoder(BOND_DIMS, width)
        self.eps = nn.Parameter(torch.zeros(()))
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h: Tensor, edges: Tensor, edge_features: Tensor) -> Tensor:
        messages = torch.relu(h[edges[0]] + self.bond(edge_features))
        agg = torch.zeros_like(h).index_add_(0, edges[1], messages)
        return self.fc2(torch.relu(self.fc1((1 + self.eps) * h + agg)))


class GIN(nn.Module):
    """Atom encoder, ``layers`` GIN layers (ReLU between), mean pooling, a linear head."""

    def __init__(self, width: int = 64, layers: int = 3, outputs: int = 1) -> None:
        super().__init__()
        self.atoms = FeatureEncoder(ATOM_DIMS, width)
        self.layers = nn.ModuleList(GINLayer(width) for _ in range(layers))
        self.head = nn.Linear(width, outputs)

    def forward(self, batch: GraphBatch) -> Tensor:
        h = self.atoms(batch.nodes)
        for i, layer in enumerate(self.layers):
            h = layer(h, batch.edges, batch.edge_features)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        pooled = torch.zeros(batch.num_graphs, h.shape[1], dtype=h.dtype, device=h.device)
        pooled.index_add_(0, batch.membership, h)
        counts = torch.bincount(batch.membership, minlength=batch.num_graphs).clamp_min(1)
        return self.head(pooled / counts[:, None].to(h.dtype)).squeeze(-1)
