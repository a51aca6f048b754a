"""Exact correspondence between two augmented views, composed from 3×3 transforms.

A cell of view A maps back to source A through the inverse of view A's transform, through the
base correspondence to source B, and forward through view B's transform. Nothing is estimated:
``valid_ab`` is True only where every step lands on real data.

Conventions: pixel coordinates have pixel centres at integers; normalised coordinates follow
``grid_sample(..., align_corners=False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry.bbox import transform_bbox
from kornia.geometry.linalg import transform_points
from torch import Tensor

# the coordinate conversions live with the cell convention; re-exported here for callers
from densessl.cells import cell_centres, normalized_to_pixel, pixel_to_normalized  # noqa: F401
from densessl.pairs.correspondence import inside_image

# Bilinear samples of a 0/1 mask below this mean some neighbour was invalid.
_STRICT = 0.999


def apply_homography(matrix: Tensor, xy: Tensor) -> Tensor:
    """matrix B×3×3 applied to points B×...×2 (projective division included): kornia's
    ``transform_points`` on the points flattened to B×N×2."""
    return transform_points(matrix, xy.reshape(xy.shape[0], -1, 2)).reshape(xy.shape)


def sample_at(image: Tensor, xy: Tensor, mode: str = "bilinear") -> Tensor:
    """Sample B×C×H×W ``image`` at pixel points B×h×w×2 → B×C×h×w (zeros outside)."""
    height, width = image.shape[-2:]
    grid = pixel_to_normalized(xy, width, height)
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)


def sample_mask(mask: Tensor, xy: Tensor) -> Tensor:
    """True where all pixels that a bilinear sample of the bool mask B×H×W at xy touches are
    True (conservative: no point next to invalid data counts as valid)."""
    return sample_at(mask[:, None].float(), xy)[:, 0] >= _STRICT


def compose_correspondence(
    matrix_a: Tensor,
    matrix_b: Tensor,
    grid_size: tuple[int, int],
    view_size_a: tuple[int, int],
    view_size_b: tuple[int, int],
    valid_a: Tensor,
    valid_b: Tensor,
    base_grid: Tensor | None = None,
    base_valid: Tensor | None = None,
    alignment: str = "centre",
) -> tuple[Tensor, Tensor, Tensor]:
    """Correspondence of view A's cell grid in view B.

    Args:
        matrix_a, matrix_b: B×3×3, source pixel → view pixel for each view.
        grid_size: (h, w) feature cells over view A; the stride is ``H / h`` and each cell
            sits where :mod:`densessl.cells` says for ``alignment``.
        view_size_a, view_size_b: (H, W) of each view.
        valid_a, valid_b: B×Ha×Wa / B×Hb×Wb bool data masks of the sources.
        base_grid: B×Ha×Wa×2 pixel positions in source B of each source-A pixel, None = identity.
        base_valid: B×Ha×Wa bool, where the base correspondence exists.
        alignment: the encoder's ``cell_alignment``: ``"centre"`` (a ResNet's cell i at pixel
            ``s·i``) or ``"block"`` (ConvNeXt's at ``s·i + (s − 1)/2``).

    Returns:
        grid_ab (B×h×w×2 normalised positions in view B), valid_ab (B×h×w bool),
        src_a (B×h×w×2 pixel positions of the cells in source A, for sampling class maps).
    """
    batch = matrix_a.shape[0]
    h, w = grid_size
    (view_h_a, view_w_a), (view_h_b, view_w_b) = view_size_a, view_size_b
    height_a, width_a = valid_a.shape[-2:]
    height_b, width_b = valid_b.shape[-2:]
    if view_h_a * w != view_w_a * h:
        raise ValueError(f"grid {grid_size} and view {view_size_a} need one stride on both axes")
    cells = cell_centres(h, w, view_h_a / h, device=matrix_a.device, alignment=alignment)
    cells = cells.expand(batch, h, w, 2)

    src_a = apply_homography(torch.linalg.inv(matrix_a.float()), cells)
    valid = inside_image(src_a, (height_a, width_a)) & sample_mask(valid_a, src_a)
    if base_grid is None:
        src_b = src_a
    else:
        src_b = sample_at(base_grid.permute(0, 3, 1, 2), src_a).permute(0, 2, 3, 1)
    if base_valid is not None:
        valid &= sample_mask(base_valid, src_a)
    valid &= inside_image(src_b, (height_b, width_b)) & sample_mask(valid_b, src_b)

    in_b = apply_homography(matrix_b.float(), src_b)
    valid &= inside_image(in_b, (view_h_b, view_w_b))
    grid_ab = pixel_to_normalized(in_b, view_w_b, view_h_b)
    return grid_ab, valid, src_a


def transform_boxes(boxes: Tensor, matrix: Tensor) -> Tensor:
    """Axis-aligned hull of xyxy boxes N×4 under per-box matrices N×3×3.

    Boxes use the COCO / torchvision convention (the image spans [0, W] × [0, H]); the matrices
    use pixel centres at integers, hence the half-pixel shifts. All four corners go through
    kornia's ``transform_bbox`` (as N×1×4×2 polygons): under a rotation the two ``xyxy``
    endpoints alone would miss the hull.
    """
    x0, y0, x1, y1 = (boxes - 0.5).unbind(-1)
    corners = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                           torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], dim=1)
    moved = transform_bbox(matrix, corners[:, None])[:, 0]  # N×4×2
    return torch.cat([moved.amin(dim=1), moved.amax(dim=1)], dim=-1) + 0.5
