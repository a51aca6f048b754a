"""Projection heads: a per-pixel MLP for dense contrast and an MLP on pooled features."""

from __future__ import annotations

import torch.nn as nn
from lightly.models.modules.heads import MoCoProjectionHead
from torch import Tensor


class DenseProjectionHead(nn.Module):
    """MLP applied independently at every cell, as 1×1 convs (DenseCL, Wang et al. 2021;
    PixPro, Xie et al. 2021).

    Args:
        in_dim, hidden_dim, out_dim: channel sizes of conv1×1 → BN → ReLU → conv1×1.

    Shapes:
        ``B×in_dim×h×w -> B×out_dim×h×w`` (not normalised; losses normalise).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, out_dim, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GlobalProjectionHead(nn.Module):
    """Global average pooling followed by lightly's MoCo-v2 MLP (Chen et al. 2020, MoCo v2).

    Shapes:
        ``B×in_dim×h×w -> B×out_dim`` (not normalised).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = MoCoProjectionHead(in_dim, hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.pool(x).flatten(1))
