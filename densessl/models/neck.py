"""FPN neck (Lin et al. 2017, "Feature Pyramid Networks for Object Detection")."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn
from torch import Tensor
from torchvision.ops import FeaturePyramidNetwork


class FPNNeck(nn.Module):
    """Wraps ``torchvision.ops.FeaturePyramidNetwork`` with our level names.

    Dense pretraining benefits from a stride-8 map with high-level semantics, which an FPN gives
    (DenseCL / PixPro / SegLoc pretrain through one for the same reason).

    Args:
        in_channels: channels of each backbone level, e.g. ``{"c2": 64, …, "c5": 512}``.
        out_channels: channels of every output level.

    Shapes:
        ``forward({"cK": B×Ck×hK×wK}) -> {"pK": B×out_channels×hK×wK}`` for the same K.
    """

    def __init__(self, in_channels: dict[str, int], out_channels: int = 128) -> None:
        super().__init__()
        self.levels = list(in_channels)
        self.out_channels = out_channels
        self.fpn = FeaturePyramidNetwork([in_channels[k] for k in self.levels], out_channels)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        # torchvision expects levels ordered from high to low resolution
        out = self.fpn(OrderedDict((k, features[k]) for k in self.levels))
        return {"p" + k[1:]: v for k, v in out.items()}
