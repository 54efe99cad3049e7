"""A small vision transformer: patch embedding, a class token, pre-norm blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Block


class ViT(nn.Module):
    """Images ``[b, c, h, w]`` cut into ``patch``×``patch`` patches (a strided Conv2d).

    >>> ViT(1, 28, 10, patch=7, dim=16, depth=1, heads=2)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, image_size: int, classes: int, patch: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of patch={patch}")
        self.patches = nn.Conv2d(in_channels, dim, patch, stride=patch)
        count = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, count + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, causal=False) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # [b, patches, dim]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])
