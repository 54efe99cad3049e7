"""Multi-layer perceptron on flattened inputs."""

from __future__ import annotations

import itertools

from torch import Tensor, nn


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units (ReLU), then a linear classifier.

    >>> import torch
    >>> MLP(784, 32, 2, 10)(torch.zeros(5, 1, 28, 28)).shape
    torch.Size([5, 10])
    """

    def __init__(self, input_dim: int, width: int, depth: int, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        dims = [input_dim] + [width] * depth
        for n_in, n_out in itertools.pairwise(dims):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
