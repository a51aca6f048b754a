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

import cv2
import numpy as np
import torch
from kornia.geometry.linalg import transform_points
from torch import Tensor

try:
    from kornia.geometry import create_meshgrid
except ImportError:  # older kornia has it only in kornia.utils (deprecated there since)
    from kornia.utils import create_meshgrid

#: kornia's projective division leaves a point with |w| at or below this undivided (OpenCV)
_W_EPS = 1e-8


def pixel_grid(height: int, width: int, device=None) -> Tensor:
    """H×W×2 float32 pixel coordinates (x, y) of every pixel: kornia's unnormalised meshgrid,
    whose integers are the pixel centres, as everywhere in densessl."""
    return create_meshgrid(height, width, normalized_coordinates=False, device=device,
                           dtype=torch.float32)[0]


def inside_image(xy: Tensor, size: tuple[int, int]) -> Tensor:
    """True where points ``xy`` (…×2, pixel x, y) lie on an image of ``size`` (height, width):
    its footprint runs from the first pixel's outer edge (−0.5) to the last one's (size − 0.5).
    NaN and ±inf fail one of the comparisons, so they are outside."""
    height, width = size
    x, y = xy[..., 0], xy[..., 1]
    return (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)


def identity_correspondence(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Same pixel grid. (Builders can also just leave ``base_grid=None``, the fast path.)"""
    return pixel_grid(height, width), torch.ones(height, width, dtype=torch.bool)


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
    pixels = pixel_grid(*size_a)
    grid = transform_points(matrix, pixels.reshape(-1, 2)).reshape(pixels.shape)
    # w ≤ 0: past the horizon, no image in B; kornia would return a mirrored point there
    in_front = pixels @ matrix[2, :2] + matrix[2, 2] > _W_EPS
    return grid, inside_image(grid, size_b) & in_front


#: coverage at or above which a pasted pixel shows the instance alone (bilinear alpha edges
#: mix it with what lies below)
OPAQUE = 0.999


def _stack(masks: Sequence[Tensor] | Tensor, size: tuple[int, int], name: str) -> np.ndarray:
    """K×H×W float32 coverage from a list or stack of H×W bool / [0, 1] float masks."""
    stack = [np.asarray(torch.as_tensor(m).detach().cpu(), dtype=np.float32) for m in masks]
    if not stack:
        return np.zeros((0, *size), np.float32)
    if any(m.shape != tuple(size) for m in stack):
        raise ValueError(f"instance_correspondence: {name} must be H×W masks of size "
                         f"{tuple(size)}, got {sorted({m.shape for m in stack})}")
    return np.stack(stack)


def _solid_and_bare(coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From K×H×W coverage in paste order: K×H×W bool, the pixel shows instance j alone and fully
    (opaque, no later instance over it), and H×W bool, no instance covers the pixel at all."""
    covered = coverage > 0
    # later[j]: some instance pasted after j covers the pixel
    later = np.zeros_like(covered)
    if len(covered) > 1:
        later[:-1] = np.logical_or.accumulate(covered[::-1], axis=0)[::-1][1:]
    return (coverage >= OPAQUE) & ~later, ~covered.any(0)


def _erode(mask: np.ndarray) -> np.ndarray:
    """3×3 erosion of an H×W bool mask, outside the image counting as False: a pixel stays only
    if resampling it (which reads its neighbours) sees the same content."""
    return cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8),
                     borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def _map(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """M×2 points through a 3×3 projective map (float64)."""
    points = np.concatenate([xy, np.ones_like(xy[:, :1])], axis=1) @ matrix.T
    with np.errstate(divide="ignore", invalid="ignore"):
        return points[:, :2] / points[:, 2:]


def _reads_only(mask: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """True where a bilinear read of ``mask``'s image at each point ``xy`` (M×2, pixel x, y)
    gives weight only to pixels inside the image where ``mask`` (H×W bool) is True."""
    height, width = mask.shape
    finite = np.isfinite(xy).all(1)
    xy = np.where(finite[:, None], xy, -1.0)
    floor = np.floor(xy)
    x0, y0 = floor[:, 0].astype(np.int64), floor[:, 1].astype(np.int64)
    dx, dy = (xy[:, 0] > floor[:, 0]).astype(np.int64), (xy[:, 1] > floor[:, 1]).astype(np.int64)
    ok = finite & (x0 >= 0) & (y0 >= 0) & (x0 + dx < width) & (y0 + dy < height)
    x0, y0 = np.clip(x0, 0, width - 1), np.clip(y0, 0, height - 1)
    x1, y1 = np.minimum(x0 + dx, width - 1), np.minimum(y0 + dy, height - 1)
    return ok & mask[y0, x0] & mask[y0, x1] & mask[y1, x0] & mask[y1, x1]


def instance_correspondence(size_a: tuple[int, int], size_b: tuple[int, int],
                            masks_a: Sequence[Tensor] | Tensor,
                            matrices: Sequence[Tensor] | Tensor,
                            masks_b: Sequence[Tensor] | Tensor,
                            background: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-instance transforms: pixels of instance i in A (``masks_a[i]``) map by ``matrices[i]``.

    Exact at instance boundaries (cut-paste pairs use this same code). Instances are listed in
    paste order in both sources: a later instance covers earlier ones. A pixel of instance i in
    A is valid only if

    * A shows instance i alone and fully there (coverage >= :data:`OPAQUE`, nothing pasted
      over it) and at its eight neighbours (the views are resampled bilinearly later, which
      mixes neighbours), and
    * its point lands in B where every pixel the bilinear read touches shows instance i alone
      and fully, with the same one-pixel margin (so it is not hidden by a later paste in B).

    ``background`` (3×3) maps the pixels no instance covers when both views show one
    background; they are valid under the same rule, against the pixels of B that no instance
    covers. Without it, background has no match.

    Args:
        size_a, size_b: (height, width) of the two sources.
        masks_a: each instance's mask in A: H×W bool, or float coverage (paste alpha) in [0, 1].
        matrices: 3×3 per instance, A pixel → B pixel (pixel centres at integers).
        masks_b: the same instances' masks in B, same order and kinds. Whole masks or only
            their visible parts give the same result (a later instance covers earlier ones).
        background: optional 3×3 A pixel → B pixel map of the shared background.

    Returns ``(grid, valid)``: grid holds, on each pixel, the map of the instance on top there
    (coverage > 0.5), the background map elsewhere (0 without one); valid is as above.
    """
    cov_a, cov_b = _stack(masks_a, size_a, "masks_a"), _stack(masks_b, size_b, "masks_b")
    mats = [np.asarray(torch.as_tensor(m, dtype=torch.float64)) for m in matrices]
    if not (len(mats) == len(cov_a) == len(cov_b)):
        raise ValueError(f"instance_correspondence: {len(cov_a)} masks_a, {len(mats)} matrices "
                         f"and {len(cov_b)} masks_b; expected one of each per instance")
    if any(m.shape != (3, 3) for m in mats):
        raise ValueError("instance_correspondence: every matrix must be 3×3")
    solid_a, bare_a = _solid_and_bare(cov_a)
    solid_b, bare_b = _solid_and_bare(cov_b)
    height, width = size_a
    ys, xs = np.mgrid[:height, :width]
    pixels = np.stack([xs, ys], axis=-1).astype(np.float64)  # H×W×2 (x, y)
    grid = np.zeros((height, width, 2))
    valid = np.zeros((height, width), bool)
    if background is not None:
        matrix = np.asarray(torch.as_tensor(background, dtype=torch.float64))
        grid = _map(matrix, pixels.reshape(-1, 2)).reshape(height, width, 2)
        inside = _erode(bare_a)
        valid[inside] = _reads_only(_erode(bare_b), grid[inside])
    for i, matrix in enumerate(mats):
        top = cov_a[i] > 0.5
        if not top.any():
            continue
        grid[top] = _map(matrix, pixels[top])
        inside = _erode(solid_a[i])  # a subset of ``top``
        valid[inside] = _reads_only(_erode(solid_b[i]), grid[inside])
    return torch.from_numpy(np.nan_to_num(grid).astype(np.float32)), torch.from_numpy(valid)


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
    ok = inside_image(grid, size_b)
    if valid is not None:
        ok &= torch.as_tensor(valid, dtype=torch.bool)
    return torch.nan_to_num(grid), ok
