"""Instance head: RoIAlign of each box on its FPN level (or on every level), then a projection
(an MLP, or InsLoc's 4conv-1fc box head with BatchNorm and a projector).

Level assignment follows Lin et al. 2017 ("Feature Pyramid Networks for Object Detection",
eq. 1), as torchvision's ``LevelMapper``: ``k = ⌊k0 + log2(√(wh) / s0)⌋`` clamped to the
pyramid's levels, with canonical scale ``s0`` (224 for ImageNet-sized objects) at level ``k0``.
InsLoc: Yang et al. 2021, "Instance Localization for Self-supervised Detection Pretraining".
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper

from densessl.cells import CELL_ALIGNMENTS, boxes_for_roi_align


def assign_fpn_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224.0,
                      canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN level of each xyxy box (N×4) → N long in ``k_min … k_max``: torchvision's
    ``LevelMapper`` (which counts from ``k_min``), on the device, with no host read."""
    # an inverted box (x2 < x1) has zero area, not a negative one (whose √ is NaN → any level)
    boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2])], dim=1)
    mapper = LevelMapper(k_min, k_max, canonical_scale, canonical_level, eps)
    return mapper([boxes]) + k_min


def multiscale_roi_align(pyramid: dict[str, Tensor], boxes: Tensor, box_batch: Tensor,
                         output_size: int = 7, sampling_ratio: int = 2,
                         canonical_scale: float = 224.0, canonical_level: int = 4,
                         sync_free: bool | None = None, alignment: str = "centre") -> Tensor:
    """Pool each box from the pyramid level its size selects.

    Args:
        pyramid: ``{"p2": B×C×H/4×W/4, …, "p5": …}`` (any ``pK``/``cK`` names with the same C).
        boxes: N×4 xyxy in input pixels, COCO edges (image spans [0, W]); each level's
            cells are placed as :mod:`densessl.cells` says for ``alignment``.
        box_batch: N image index of each box.
        sync_free: pool every box on every level and keep its own level's result, so no
            count of boxes per level is read on the host (a GPU step never waits); the default
            does so off the CPU, where the 4× RoIAlign work is cheaper than a sync. On a CPU
            each level pools only its own boxes. Both give the same values.
        alignment: the backbone's cell alignment (:mod:`densessl.cells`), which places each
            level's cells.

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
    if sync_free is None:
        sync_free = boxes.device.type != "cpu"
    for name, level in zip(names, levels):
        feature = pyramid[name]
        stride = 2 ** level  # pK / cK has stride 2^K, whatever the input size
        rois = torch.cat([box_batch[:, None].to(boxes),
                          boxes_for_roi_align(boxes, stride, alignment)], 1)
        scale = 1.0 / stride
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


def all_level_roi_align(pyramid: dict[str, Tensor], boxes: Tensor, box_batch: Tensor,
                        output_size: int = 7, sampling_ratio: int = 2,
                        alignment: str = "centre") -> Tensor:
    """Pool every box on every level (InsLoc: one RoI feature, and one loss, per level).

    Args:
        pyramid: as :func:`multiscale_roi_align`; levels are taken finest first.
        boxes: N×4 (the same boxes on every level) or L×N×4 (row l on the l-th level, e.g. the
            query's jittered box on the coarsest level only), xyxy input pixels, COCO edges.
        box_batch: N image index of each box.
        alignment: as :func:`multiscale_roi_align`.

    Returns:
        L×N×C×output_size×output_size. Fixed shapes, no host read.
    """
    names = sorted(pyramid, key=lambda n: int(n[1:]))
    if boxes.dim() == 2:
        boxes = boxes.expand(len(names), *boxes.shape)
    if boxes.dim() != 3 or boxes.shape[0] != len(names) or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be N×4 or L×N×4 with L = {len(names)} levels, got "
                         f"{tuple(boxes.shape)}")
    pooled = []
    for name, level_boxes in zip(names, boxes):
        feature = pyramid[name]
        stride = 2 ** int(name[1:])  # pK / cK has stride 2^K
        rois = torch.cat([box_batch[:, None].to(level_boxes),
                          boxes_for_roi_align(level_boxes, stride, alignment)], 1)
        pooled.append(roi_align(feature, rois.to(feature.dtype), output_size, 1.0 / stride,
                                sampling_ratio, aligned=True))
    return torch.stack(pooled)


class InstanceHead(nn.Module):
    """RoIAlign-pooled box features → instance embedding.

    Two pooling modes: ``by_size`` pools each box once, on the level its size selects
    (:func:`multiscale_roi_align`); ``all`` pools it on every level (InsLoc,
    :func:`all_level_roi_align`) and embeds all levels' RoIs in one batch, as InsLoc does.

    Two heads:

    * ``mlp``: flatten → Linear → ReLU → Linear (attribute ``mlp``; no BatchNorm, so any number
      of boxes works).
    * ``conv``: InsLoc's 4conv-1fc box head with BatchNorm, torchvision's
      :class:`~torchvision.models.detection.faster_rcnn.FastRCNNConvFCHead` as attribute
      ``box_head`` (4 conv 3×3 of the FPN width + BN + ReLU, one fc of ``fc_dim`` + ReLU: the
      same module, key for key, as a torchvision detector's ``roi_heads.box_head``), then
      ``projector`` = Linear → ReLU → Linear to ``out_dim`` (InsLoc's second shared fc and its
      ``fc_cls``). BatchNorm needs at least 2 boxes per batch in training to estimate
      anything: its statistics run over boxes × RoI cells, so one box normalises with its own
      cells' statistics (``output_size ≥ 2`` is required so that this does not raise), and a
      batch with 0 boxes passes through (empty output; running statistics unchanged).

    Args:
        in_channels: channels of every pyramid level (FPN width).
        hidden_dim, out_dim: MLP hidden size (``mlp`` head) and embedding size.
        output_size: RoIAlign output side.
        canonical_scale, canonical_level: FPN level assignment for ``by_size`` (see
            :func:`assign_fpn_levels`); for small views lower ``canonical_scale`` so boxes
            spread over the levels.
        sync_free: see :func:`multiscale_roi_align` (None: only off the CPU); ``all`` is
            always sync-free.
        levels: ``by_size`` or ``all``.
        head: ``mlp`` or ``conv``.
        fc_dim: width of the ``conv`` head's fc (torchvision's and InsLoc's 1024).
        alignment: the encoder's ``cell_alignment`` (:mod:`densessl.cells`): where the
            pyramid's cells sit, so that RoIAlign samples the cells centred on each box.

    Shapes:
        ``forward(pyramid, boxes, box_batch N)``: ``by_size``: boxes N×4 → N×out_dim;
        ``all``: boxes N×4 or L×N×4 (per level) → L×N×out_dim (not normalised).
    """

    def __init__(self, in_channels: int, hidden_dim: int = 256, out_dim: int = 128,
                 output_size: int = 7, canonical_scale: float = 224.0,
                 canonical_level: int = 4, sync_free: bool | None = None,
                 levels: Literal["by_size", "all"] = "by_size",
                 head: Literal["mlp", "conv"] = "mlp", fc_dim: int = 1024,
                 alignment: str = "centre") -> None:
        super().__init__()
        if levels not in ("by_size", "all"):
            raise ValueError(f"levels must be 'by_size' or 'all', got {levels!r}")
        if head not in ("mlp", "conv"):
            raise ValueError(f"head must be 'mlp' or 'conv', got {head!r}")
        if head == "conv" and output_size < 2:
            raise ValueError(f"the conv head's BatchNorm needs output_size >= 2 (one box must "
                             f"give it 2 values per channel), got {output_size}")
        if alignment not in CELL_ALIGNMENTS:
            raise ValueError(f"unknown cell alignment {alignment!r}; valid: "
                             f"{list(CELL_ALIGNMENTS)}")
        self.alignment = alignment
        self.output_size = output_size
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level
        self.sync_free = sync_free
        self.levels, self.head = levels, head
        if head == "mlp":
            self.mlp = nn.Sequential(nn.Flatten(),
                                     nn.Linear(in_channels * output_size**2, hidden_dim),
                                     nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
            nn.init.kaiming_uniform_(self.mlp[1].weight, a=math.sqrt(5))
        else:
            self.box_head = FastRCNNConvFCHead((in_channels, output_size, output_size),
                                               [in_channels] * 4, [fc_dim],
                                               norm_layer=nn.BatchNorm2d)
            self.projector = nn.Sequential(nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=True),
                                           nn.Linear(fc_dim, out_dim))

    def pool(self, pyramid: dict[str, Tensor], boxes: Tensor, box_batch: Tensor) -> Tensor:
        """RoI features: N×C×S×S (``by_size``) or L×N×C×S×S (``all``)."""
        if self.levels == "all":
            return all_level_roi_align(pyramid, boxes, box_batch, self.output_size,
                                       alignment=self.alignment)
        return multiscale_roi_align(pyramid, boxes, box_batch, self.output_size,
                                    canonical_scale=self.canonical_scale,
                                    canonical_level=self.canonical_level,
                                    sync_free=self.sync_free, alignment=self.alignment)

    def embed(self, pooled: Tensor) -> Tensor:
        """RoI features M×C×S×S → M×out_dim."""
        if self.head == "mlp":
            return self.mlp(pooled)
        return self.projector(self.box_head(pooled))

    def forward(self, pyramid: dict[str, Tensor], boxes: Tensor, box_batch: Tensor) -> Tensor:
        pooled = self.pool(pyramid, boxes, box_batch)
        if self.levels == "by_size":
            return self.embed(pooled)
        # every level's RoIs in one batch through the head (one set of BN statistics, InsLoc)
        levels, n = pooled.shape[:2]
        return self.embed(pooled.flatten(0, 1)).unflatten(0, (levels, n))
