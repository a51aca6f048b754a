"""Instance head: RoIAlign of each box on its FPN level, then a projection MLP (InsLoc).

Level assignment follows Lin et al. 2017 ("Feature Pyramid Networks for Object Detection",
eq. 1), as torchvision's ``LevelMapper``: ``k = ⌊k0 + log2(√(wh) / s0)⌋`` clamped to the
pyramid's levels, with canonical scale ``s0`` (224 for ImageNet-sized objects) at level ``k0``.
InsLoc: Yang et al. 2021, "Instance Localization for Self-supervised Detection Pretraining".
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.ops import roi_align


def assign_fpn_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224.0,
                      canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN level of each xyxy box (N×4) → N long in ``k_min … k_max``."""
    area = ((boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0))
    level = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_scale + eps))
    return level.clamp(k_min, k_max).long()


def multiscale_roi_align(pyramid: dict[str, Tensor], boxes: Tensor, box_batch: Tensor,
                         image_size: int, output_size: int = 7, sampling_ratio: int = 2,
                         canonical_scale: float = 224.0, canonical_level: int = 4,
                         sync_free: bool | None = None) -> Tensor:
    """Pool each box from the pyramid level its size selects.

    Args:
        pyramid: ``{"p2": B×C×H/4×W/4, …, "p5": …}`` (any ``pK``/``cK`` names with the same C).
        boxes: N×4 xyxy in input pixels, COCO edges (image spans [0, W]); hence
            ``aligned=True`` (a feature cell's centre sits half a stride into it).
        box_batch: N image index of each box.
        image_size: input side, to derive each level's stride.
        sync_free: pool every box on every level and keep its own level's result, so no
            count of boxes per level is read on the host (a GPU step never waits); the default
            does so off the CPU, where the 4× RoIAlign work is cheaper than a sync. On a CPU
            each level pools only its own boxes. Both give the same values.

    Returns:
        N×C×output_size×output_size.
    """
    names = sorted(pyramid, key=lambda n: int(n[1:]))
    levels = [int(n[1:]) for n in names]
    first = pyramid[names[0]]
    out = first.new_zeros(boxes.shape[0], first.shape[1], output_size, output_size)
    if boxes.shape[0] == 0:  # a shape, known on the host
        return out
    assigned = assign_fpn_levels(boxes, min(levels), max(levels), canonical_scale,
                                 canonical_level)
    rois = torch.cat([box_batch[:, None].to(boxes), boxes], dim=1)
    if sync_free is None:
        sync_free = boxes.device.type != "cpu"
    for name, level in zip(names, levels):
        feature = pyramid[name]
        scale = feature.shape[-1] / image_size
        if sync_free:
            pooled = roi_align(feature, rois.to(feature.dtype), output_size, scale,
                               sampling_ratio, aligned=True)
            out = torch.where((assigned == level)[:, None, None, None], pooled.to(out), out)
            continue
        idx = torch.nonzero(assigned == level, as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        out[idx] = roi_align(feature, rois[idx].to(feature.dtype), output_size, scale,
                             sampling_ratio, aligned=True)
    return out


class InstanceHead(nn.Module):
    """RoIAlign-pooled box features → instance embedding.

    Args:
        in_channels: channels of every pyramid level (FPN width).
        hidden_dim, out_dim: MLP sizes (flatten → Linear → ReLU → Linear; no BatchNorm so a
            batch with a single box works).
        output_size: RoIAlign output side.
        canonical_scale, canonical_level: FPN level assignment (see :func:`assign_fpn_levels`);
            for small views lower ``canonical_scale`` so boxes spread over the levels.
        sync_free: see :func:`multiscale_roi_align` (None: only off the CPU).

    Shapes:
        ``forward(pyramid, boxes N×4, box_batch N, image_size) -> N×out_dim`` (not normalised).
    """

    def __init__(self, in_channels: int, hidden_dim: int = 256, out_dim: int = 128,
                 output_size: int = 7, canonical_scale: float = 224.0,
                 canonical_level: int = 4, sync_free: bool | None = None) -> None:
        super().__init__()
        self.output_size = output_size
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level
        self.sync_free = sync_free
        self.mlp = nn.Sequential(nn.Flatten(),
                                 nn.Linear(in_channels * output_size**2, hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        nn.init.kaiming_uniform_(self.mlp[1].weight, a=math.sqrt(5))

    def pool(self, pyramid: dict[str, Tensor], boxes: Tensor, box_batch: Tensor,
             image_size: int) -> Tensor:
        return multiscale_roi_align(pyramid, boxes, box_batch, image_size, self.output_size,
                                    canonical_scale=self.canonical_scale,
                                    canonical_level=self.canonical_level,
                                    sync_free=self.sync_free)

    def forward(self, pyramid: dict[str, Tensor], boxes: Tensor, box_batch: Tensor,
                image_size: int) -> Tensor:
        return self.mlp(self.pool(pyramid, boxes, box_batch, image_size))
