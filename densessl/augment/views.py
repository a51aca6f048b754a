"""The device-side stage that turns a SourceBatch into a PairBatch (docs/architecture.md).

Runs on whatever device the batch is on (called from the Lightning task's
``on_after_batch_transfer``, like torchgeo's datamodules): composites deferred cut-paste
(:func:`~densessl.pairs.device_paste.composite_pastes`), samples each view's geometry and
photometry independently, warps boxes, and composes the exact correspondence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_area

from densessl.augment.correspondence import compose_correspondence, sample_at, transform_boxes
from densessl.augment.geometry import ViewGeometry
from densessl.augment.photometric import ViewPhotometry
from densessl.cells import CELL_ALIGNMENTS
from densessl.contract import PairBatch, SourceBatch
from densessl.pairs.device_paste import composite_pastes


def _per_channel(value: float | Sequence[float], channels: int, name: str) -> Tensor:
    values = [float(value)] * channels if isinstance(value, (int, float)) else list(value)
    if len(values) != channels:
        raise ValueError(f"augment.{name} has {len(values)} values but the data has {channels} "
                         "channels")
    return torch.tensor(values).view(1, channels, 1, 1)


class ViewAugmentation(nn.Module):
    """SourceBatch → PairBatch with views of ``view_size`` and a correspondence grid of
    ``view_size // grid_stride`` cells per side (match it to the encoder's dense stride).

    Args:
        channels: number of image channels.
        view_size: side of the square views.
        grid_stride: pixels per correspondence cell.
        cell_alignment: where the encoder's cells sit (its ``cell_alignment``,
            :mod:`densessl.cells`): ``"centre"`` (ResNets) or ``"block"`` (ConvNeXt).
        geometry: keyword arguments of :class:`ViewGeometry` (crop scale, flips, rotation).
        photometry: keyword arguments of :class:`ViewPhotometry`, or None for none.
        mean, std: per-channel normalisation applied last (scalar or one value per channel).
        min_box_visible: a box pair is kept only if at least this fraction of each box survives
            the crops (rows of A and B are dropped together, so row i stays a positive pair).
    """

    def __init__(self, channels: int, view_size: int = 96, grid_stride: int = 8,
                 geometry: dict | None = None, photometry: dict | None = None,
                 mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.25,
                 min_box_visible: float = 0.3, cell_alignment: str = "centre") -> None:
        super().__init__()
        if view_size % grid_stride:
            raise ValueError(f"augment.view_size ({view_size}) must be a multiple of the grid "
                             f"stride ({grid_stride})")
        if cell_alignment not in CELL_ALIGNMENTS:
            raise ValueError(f"unknown cell alignment {cell_alignment!r}; valid: "
                             f"{list(CELL_ALIGNMENTS)}")
        self.view_size, self.grid_stride = view_size, grid_stride
        self.cell_alignment = cell_alignment
        self.geometry_a = ViewGeometry(view_size, **(geometry or {}))
        self.geometry_b = ViewGeometry(view_size, **(geometry or {}))
        self.photometry = (ViewPhotometry(channels, **photometry)
                           if photometry is not None else None)
        self.register_buffer("mean", _per_channel(mean, channels, "mean"), persistent=False)
        self.register_buffer("std", _per_channel(std, channels, "std"), persistent=False)
        self.min_box_visible = min_box_visible

    def normalize(self, views: Tensor) -> Tensor:
        return (views - self.mean.to(views)) / self.std.to(views)

    @torch.no_grad()
    def forward(self, batch: SourceBatch, photometric: bool = True) -> PairBatch:
        # deferred cut-paste is composited first, on this device (see pairs.device_paste)
        batch = composite_pastes(batch)
        view_a, matrix_a = self.geometry_a(batch.source_a)
        view_b, matrix_b = self.geometry_b(batch.source_b)
        if photometric and self.photometry is not None:
            view_a, view_b = self.photometry(view_a), self.photometry(view_b)
        cells = self.view_size // self.grid_stride
        size = (self.view_size, self.view_size)
        grid_ab, valid_ab, src_a = compose_correspondence(
            matrix_a, matrix_b, (cells, cells), size, size, batch.valid_a, batch.valid_b,
            batch.base_grid, batch.base_valid, alignment=self.cell_alignment)
        class_map = None
        if batch.class_map_a is not None:
            # Shift by one so that "outside" (zero padding) decodes to -1 like "unknown".
            shifted = (batch.class_map_a + 1).float()[:, None]
            class_map = sample_at(shifted, src_a, mode="nearest")[:, 0].long() - 1
        noise_mask = None
        if batch.noise_mask_a is not None:
            # the source-A pixel each cell sits on (outside the source: not replaced)
            noise_mask = sample_at(batch.noise_mask_a.float()[:, None], src_a,
                                   mode="nearest")[:, 0] > 0.5
        boxes_a, boxes_b, keep = self._move_boxes(batch, matrix_a, matrix_b)
        return PairBatch(
            view_a=self.normalize(view_a), view_b=self.normalize(view_b),
            grid_ab=grid_ab, valid_ab=valid_ab,
            boxes_a=boxes_a, boxes_b=boxes_b, box_batch=batch.box_batch[keep],
            box_label=batch.box_label[keep], instance_ids=batch.instance_ids[keep],
            class_map_a=class_map, noisy=batch.noisy, matrix_a=matrix_a, matrix_b=matrix_b,
            meta=batch.meta, noise_mask_a=noise_mask, pair_weight=batch.pair_weight)

    def _move_boxes(self, batch: SourceBatch, matrix_a: Tensor, matrix_b: Tensor):
        if batch.boxes_a.numel() == 0:
            empty = batch.boxes_a.new_zeros(0, 4)
            return empty, empty.clone(), torch.zeros(0, dtype=torch.bool,
                                                      device=batch.boxes_a.device)
        keep = torch.ones(batch.boxes_a.shape[0], dtype=torch.bool, device=batch.boxes_a.device)
        if batch.box_valid is not None:  # instances the compositing found mostly hidden
            keep &= batch.box_valid
        moved = []
        for boxes, matrix in ((batch.boxes_a, matrix_a), (batch.boxes_b, matrix_b)):
            hull = transform_boxes(boxes, matrix[batch.box_batch])
            clipped = hull.clamp(0, self.view_size)  # x2 >= x1 still: clamping keeps order
            keep &= box_area(clipped) >= self.min_box_visible * box_area(hull).clamp_min(1e-6)
            keep &= ((clipped[:, 2] - clipped[:, 0]) >= 2) & ((clipped[:, 3] - clipped[:, 1]) >= 2)
            moved.append(clipped)
        return moved[0][keep], moved[1][keep], keep
