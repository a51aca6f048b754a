"""FPN neck (Lin et al. 2017, "Feature Pyramid Networks for Object Detection")."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F
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

    def forward(self, features: dict[str, Tensor],
                outputs: set[str] | None = None) -> dict[str, Tensor]:
        """FPN levels ``pK``; with ``outputs`` (e.g. ``{"p3"}``) only those, and the top-down
        path stops at the finest one asked for: levels nobody reads would get no gradient and
        only cost time (p2 alone is about a quarter of a ResNet-18's forward)."""
        if outputs is None:
            # torchvision expects levels ordered from high to low resolution
            out = self.fpn(OrderedDict((k, features[k]) for k in self.levels))
            return {"p" + k[1:]: v for k, v in out.items()}
        names = ["p" + k[1:] for k in self.levels]
        unknown = set(outputs) - set(names)
        if unknown:
            raise ValueError(f"unknown FPN levels {sorted(unknown)}; valid: {names}")
        finest = min(names.index(n) for n in outputs)
        # torchvision's own top-down pass (lateral 1×1, nearest upsampling, 3×3 output), run
        # from the coarsest level down to ``finest`` only; same weights, same results
        fpn, top = self.fpn, len(self.levels) - 1
        inner = fpn.get_result_from_inner_blocks(features[self.levels[top]], top)
        result = {}
        for idx in range(top, finest - 1, -1):
            if idx < top:
                lateral = fpn.get_result_from_inner_blocks(features[self.levels[idx]], idx)
                inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            if names[idx] in outputs:
                result[names[idx]] = fpn.get_result_from_layer_blocks(inner, idx)
        return result
