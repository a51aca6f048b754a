"""Helpers that state a base correspondence correctly, for builders of any kind.

A base correspondence says, for every pixel of source A, where the same scene point is in source
B: ``base_grid`` (Ha×Wa×2, pixel x, y in source B; pixel centres at integers) and ``base_valid``
(Ha×Wa bool). Each helper returns that pair, already marked invalid where the point falls outside
source B, so the result always passes :func:`~densessl.pairs.validation.validate_pair_sample`.

* :func:`identity_correspondence` — same pixel grid (same image, co-registered dates/sensors);
* :func:`homography_correspondence` — a known 3×3 map between the sources (camera motion,
  planar scenes, a georeferenced warp);
* :func:`instance_correspondence` — per-instance affine transforms over instance masks
  (cut-paste: each pasted segment moves on its own, later pastes occlude earlier ones);
* :func:`flow_correspondence` — a dense displacement field with its own validity (optical
  flow, deformable registration).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pixel_grid(height: int, width: int, device=None) -> Tensor:
    """H×W×2 pixel coordinates (x, y) of every pixel."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device),
                            indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def _inside(grid: Tensor, size_b: tuple[int, int]) -> Tensor:
    height, width = size_b
    x, y = grid[..., 0], grid[..., 1]
    return (torch.isfinite(x) & torch.isfinite(y) & (x >= -0.5) & (x <= width - 0.5)
            & (y >= -0.5) & (y <= height - 0.5))


def identity_correspondence(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Same pixel grid. (Builders can also just leave ``base_grid=None``, the fast path.)"""
    return pixel_grid(height, width), torch.ones(height, width, dtype=torch.bool)


def _apply(matrix: Tensor, grid: Tensor) -> Tensor:
    points = torch.cat([grid, torch.ones_like(grid[..., :1])], dim=-1) @ matrix.T
    return points[..., :2] / points[..., 2:].clamp_min(1e-8)


def homography_correspondence(matrix: Tensor, size_a: tuple[int, int],
                              size_b: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``matrix`` (3×3) maps source-A pixels to source-B pixels: ``p_b ~ matrix @ [x, y, 1]``.

    Args:
        matrix: 3×3 homography, pixel centres at integers (kornia / OpenCV convention).
        size_a, size_b: (height, width) of the two sources.
    """
    matrix = torch.as_tensor(matrix, dtype=torch.float32)
    if matrix.shape != (3, 3):
        raise ValueError(f"homography must be 3×3, got {tuple(matrix.shape)}")
    grid = _apply(matrix, pixel_grid(*size_a))
    return grid, _inside(grid, size_b)


def instance_correspondence(size_a: tuple[int, int], size_b: tuple[int, int],
                            masks_a: Sequence[Tensor] | Tensor,
                            matrices: Sequence[Tensor] | Tensor,
                            masks_b: Sequence[Tensor] | Tensor | None = None,
                            background: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-instance transforms: pixels of instance i in A (``masks_a[i]``) map by ``matrices[i]``.

    Instances are listed in paste order: a later instance covers earlier ones in A. If
    ``masks_b`` (the *visible* part of each instance in B) is given, points that land on an
    occluded part of their instance in B are invalid too. ``background`` (3×3) maps the
    remaining pixels when both views share one background; otherwise they get no match.
    """
    height, width = size_a
    grid = torch.zeros(height, width, 2)
    valid = torch.zeros(height, width, dtype=torch.bool)
    pixels = pixel_grid(height, width)
    if background is not None:
        grid = _apply(torch.as_tensor(background, dtype=torch.float32), pixels)
        valid = _inside(grid, size_b)
    for i, (mask, matrix) in enumerate(zip(masks_a, matrices)):
        mask = torch.as_tensor(mask, dtype=torch.bool)
        moved = _apply(torch.as_tensor(matrix, dtype=torch.float32), pixels)
        grid[mask] = moved[mask]
        ok = _inside(moved, size_b)
        if masks_b is not None:
            visible_b = torch.as_tensor(masks_b[i], dtype=torch.bool)
            xb = moved[..., 0].round().long().clamp(0, size_b[1] - 1)
            yb = moved[..., 1].round().long().clamp(0, size_b[0] - 1)
            ok &= visible_b[yb, xb]
        valid[mask] = ok[mask]
    return torch.nan_to_num(grid), valid


def flow_correspondence(flow: Tensor, size_b: tuple[int, int],
                        valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A dense displacement field: the point at A pixel (x, y) is at (x + u, y + v) in B.

    Args:
        flow: H×W×2 displacements (u, v) in pixels, from A to B.
        size_b: (height, width) of source B.
        valid: optional H×W bool, where the flow is trustworthy (occlusions, nodata).
    """
    flow = torch.as_tensor(flow, dtype=torch.float32)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be H×W×2, got {tuple(flow.shape)}")
    grid = pixel_grid(flow.shape[0], flow.shape[1]) + flow
    ok = _inside(grid, size_b)
    if valid is not None:
        ok &= torch.as_tensor(valid, dtype=torch.bool)
    return torch.nan_to_num(grid), ok
