"""Where a feature cell sits in its image: the one place that knows it.

Two alignments (:data:`CELL_ALIGNMENTS`), chosen by the backbone (its ``cell_alignment``):

* ``"centre"``: a torchvision ResNet pads every strided layer symmetrically (conv1 7×7/2 pad 3,
  maxpool 3×3/2 pad 1, 3×3/2 pad 1, 1×1/2 pad 0), so the stride-``s`` output cell ``i`` is
  centred on input pixel ``s·i`` (pixel centres at integers), not on the middle of the ``s×s``
  block it "covers". The FPN keeps that as long as its top-down upsampling puts coarse cell
  ``j`` on fine cell ``2j`` (see :func:`densessl.models.neck.upsample_centred`).
* ``"block"``: a patchify stem (ConvNeXt: 4×4/4 pad 0, then 2×2/2 pad 0 downsamples) makes cell
  ``i`` cover pixels ``s·i … s·i + s − 1``, centred on ``s·i + (s − 1)/2`` (3.5 px further at
  stride 8). The FPN keeps it with bilinear ``align_corners=False`` upsampling (fine cells
  ``2j``, ``2j + 1`` at coarse ``j ∓ 1/4``, :func:`densessl.models.neck.upsample_block`).

Cell ``i`` sits on pixel ``s·i + cell_offset(s, alignment)``. Everything that places a feature
cell reads it from here, with the trained encoder's ``cell_alignment``: the correspondence grid
and the class map (cell centres in view A), the dense keys (sampling view B's feature map at
``grid_ab``) and RoIAlign (box edges → feature coordinates). Every function defaults to
``"centre"``.

Conventions: pixel coordinates have pixel centres at integers; normalised coordinates follow
``grid_sample(..., align_corners=False)``; boxes use COCO edges (an image spans ``[0, W]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: where a backbone's cells sit: ``"centre"`` (pixel ``s·i``, symmetric padding: ResNets) or
#: ``"block"`` (pixel ``s·i + (s − 1)/2``, unpadded patchify / k = s convs: ConvNeXt)
CELL_ALIGNMENTS = ("centre", "block")


def cell_offset(stride: float, alignment: str = "centre") -> float:
    """Pixel of cell 0 of a stride-``stride`` map: 0 (``"centre"``) or ``(stride − 1)/2``
    (``"block"``, the middle of the first ``stride×stride`` block)."""
    if alignment == "centre":
        return 0.0
    if alignment == "block":
        return (stride - 1) / 2.0
    raise ValueError(f"unknown cell alignment {alignment!r}; valid: {list(CELL_ALIGNMENTS)}")


def cell_centre(index: Tensor | float, stride: float,
                alignment: str = "centre") -> Tensor | float:
    """Input pixel on which stride-``stride`` feature cell ``index`` is centred."""
    offset = cell_offset(stride, alignment)
    # no "+ 0.0" for centre: ResNet results stay bit-identical
    return index * stride + offset if offset else index * stride


def cell_centres(h: int, w: int, stride: float, device=None, alignment: str = "centre") -> Tensor:
    """Pixel (x, y) of the centres of an h×w feature grid of the given stride: h×w×2."""
    ys = cell_centre(torch.arange(h, device=device, dtype=torch.float32), stride, alignment)
    xs = cell_centre(torch.arange(w, device=device, dtype=torch.float32), stride, alignment)
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
                          feature_size: tuple[int, int], stride: float,
                          alignment: str = "centre") -> Tensor:
    """Normalised image coordinates (…×2, x then y) → normalised coordinates of the stride-``s``
    feature map of that image, both ``align_corners=False``: what ``grid_sample`` on the
    feature map needs to read the feature of the cell centred on that image point."""
    (height, width), (fh, fw) = image_size, feature_size
    pixel = normalized_to_pixel(grid, width, height)
    offset = cell_offset(stride, alignment)
    if offset:
        pixel = pixel - offset
    return pixel_to_normalized(pixel / stride, fw, fh)  # cell index: (pixel − offset) / stride


def boxes_for_roi_align(boxes: Tensor, stride: float, alignment: str = "centre") -> Tensor:
    """COCO-edge xyxy boxes shifted so that ``roi_align(..., spatial_scale=1/stride,
    aligned=True)`` samples the cells that are centred on them.

    ``aligned=True`` maps an input coordinate ``x`` to feature coordinate ``x/s − 0.5``, which
    puts cell ``i`` at the middle of its block (edge coordinate ``s·i + s/2``); the cell is at
    pixel ``s·i + offset``, i.e. edge coordinate ``s·i + offset + 0.5``, so ``x`` must become
    ``x − 0.5 − offset + s/2``: ``+ s/2 − 0.5`` for ``"centre"``, no shift for ``"block"``.
    """
    return boxes + (stride / 2.0 - 0.5 - cell_offset(stride, alignment))
