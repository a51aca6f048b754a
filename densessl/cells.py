"""Where a feature cell sits in its image: the one place that knows it.

A torchvision ResNet pads every strided layer symmetrically (conv1 7×7/2 pad 3, maxpool 3×3/2
pad 1, 3×3/2 pad 1, 1×1/2 pad 0), so the stride-``s`` output cell ``i`` is centred on input
pixel ``s·i`` (pixel centres at integers), not on the middle of the ``s×s`` block it "covers"
(``s·i + (s − 1)/2``). The FPN keeps that as long as its top-down upsampling puts coarse cell
``j`` on fine cell ``2j`` (see :func:`densessl.models.neck.upsample_centred`).

Everything that places a feature cell reads it from here: the correspondence grid and the class
map (cell centres in view A), the dense keys (sampling view B's feature map at ``grid_ab``) and
RoIAlign (box edges → feature coordinates).

Conventions: pixel coordinates have pixel centres at integers; normalised coordinates follow
``grid_sample(..., align_corners=False)``; boxes use COCO edges (an image spans ``[0, W]``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cell_centre(index: Tensor | float, stride: float) -> Tensor | float:
    """Input pixel on which stride-``stride`` feature cell ``index`` is centred."""
    return index * stride


def cell_centres(h: int, w: int, stride: float, device=None) -> Tensor:
    """Pixel (x, y) of the centres of an h×w feature grid of the given stride: h×w×2."""
    ys = cell_centre(torch.arange(h, device=device, dtype=torch.float32), stride)
    xs = cell_centre(torch.arange(w, device=device, dtype=torch.float32), stride)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def pixel_to_normalized(xy: Tensor, width: int, height: int) -> Tensor:
    """(x, y) pixel → grid_sample coordinates (align_corners=False)."""
    scale = torch.tensor([2.0 / width, 2.0 / height], device=xy.device, dtype=xy.dtype)
    return (xy + 0.5) * scale - 1.0


def normalized_to_pixel(xy: Tensor, width: int, height: int) -> Tensor:
    """grid_sample coordinates (align_corners=False) → (x, y) pixel."""
    scale = torch.tensor([width / 2.0, height / 2.0], device=xy.device, dtype=xy.dtype)
    return (xy + 1.0) * scale - 0.5


def image_to_feature_grid(grid: Tensor, image_size: tuple[int, int],
                          feature_size: tuple[int, int], stride: float) -> Tensor:
    """Normalised image coordinates (…×2, x then y) → normalised coordinates of the stride-``s``
    feature map of that image, both ``align_corners=False``: what ``grid_sample`` on the
    feature map needs to read the feature of the cell centred on that image point."""
    (height, width), (fh, fw) = image_size, feature_size
    pixel = normalized_to_pixel(grid, width, height)
    return pixel_to_normalized(pixel / stride, fw, fh)  # cell index: pixel / stride


def boxes_for_roi_align(boxes: Tensor, stride: float) -> Tensor:
    """COCO-edge xyxy boxes shifted so that ``roi_align(..., spatial_scale=1/stride,
    aligned=True)`` samples the cells that are centred on them.

    ``aligned=True`` maps an input coordinate ``x`` to feature coordinate ``x/s − 0.5``, which
    puts cell ``i`` at the middle of its block; the cell is at pixel ``s·i`` i.e. edge coordinate
    ``s·i + 0.5``, so ``x`` must become ``x − 0.5 + s/2``.
    """
    return boxes + (stride / 2.0 - 0.5)
