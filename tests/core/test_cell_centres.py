"""Where a feature cell really is, measured: the centroid of its receptive field (the input
gradient's magnitude, random-init encoder in eval mode, averaged over inits) against where
densessl.cells — and so the correspondence grid, the keys and RoIAlign — places it.

The image is big enough that the central cells' effective fields are not cut by the border
(a ResNet-18's c5 field spans ~435 px). Before the fix the grid put stride-s cell i at
s·i + (s − 1)/2, 3.5 px off at stride 8; torchvision's nearest FPN upsampling moves every p3
cell 7–10 px (measured here).
"""

from __future__ import annotations

import pytest
import torch
from helpers import field_centroids

from densessl.augment.correspondence import compose_correspondence, normalized_to_pixel
from densessl.losses.dense_contrast import keys_at
from densessl.models import DenseEncoder

TOLERANCE = 1.5  # px


def where_the_grid_puts(n: int, size: int) -> torch.Tensor:
    """Pixel (x, y) of each of view A's n×n cells as the correspondence places it (an
    identity pair, so grid_ab is the cell's own position): n×n×2."""
    eye = torch.eye(3)[None]
    valid = torch.ones(1, size, size, dtype=torch.bool)
    grid_ab, _, _ = compose_correspondence(eye, eye, (n, n), (size, size), (size, size),
                                           valid, valid)
    return normalized_to_pixel(grid_ab[0].double(), size, size)


def centroid_errors(neck: str, stride: int, size: int, upsample: str = "centred",
                    seeds: int = 2) -> torch.Tensor:
    """Signed (x, y) error of the central 2×2 block of cells (even and odd indices), averaged
    over ``seeds`` random inits: 4×2."""
    n = size // stride
    c = n // 2
    cells = [(i, j) for i in (c, c + 1) for j in (c, c + 1)]
    total = torch.zeros(len(cells), 2, dtype=torch.float64)
    for seed in range(seeds):
        torch.manual_seed(seed)
        encoder = DenseEncoder("resnet18", 3, neck=neck, dense_stride=stride, global_head=False,
                               fpn_upsample=upsample, pyramid="dense").eval()
        images = torch.randn(len(cells), 3, size, size)
        total += field_centroids(lambda x, encoder=encoder: encoder(x)["features"], images,
                                 cells)
    placed = where_the_grid_puts(n, size)
    expected = torch.stack([placed[i, j] for i, j in cells])
    return total / seeds - expected


@pytest.mark.parametrize("stride,size", [(8, 256), (16, 256), (32, 512)])
def test_backbone_cells_sit_where_the_grid_puts_them(stride, size):
    errors = centroid_errors("none", stride, size)
    assert errors.abs().max() <= TOLERANCE, errors


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_fpn_cells_sit_where_the_grid_puts_them(stride):
    """With the centred top-down upsampling. Cells that copy a coarse cell (even indices) are
    within the tolerance. An odd cell interpolates two coarse cells exactly at its position,
    but the two do not weigh the same: one copied a coarser cell, the other averaged two,
    which shrinks its gradient. Its field's centroid leans ≤ 3 px (< s/2) toward the heavier
    one; the mean over even and odd cells stays within the tolerance."""
    errors = centroid_errors("fpn", stride, 512)
    even = torch.tensor([True, False, False, False])  # (c, c) with c even
    assert errors[even].abs().max() <= TOLERANCE, errors
    assert errors.abs().max() <= 3.0, errors
    assert errors.mean(0).abs().max() <= TOLERANCE, errors


def test_fpn_nearest_upsampling_moves_cells():
    """The discriminating check: torchvision's nearest upsampling is far off."""
    errors = centroid_errors("fpn", 8, 512, upsample="nearest")
    assert errors.abs().max() > 5.0, errors


@pytest.mark.parametrize("neck", ["none", "fpn"])
def test_flip_only_pair_positive_is_the_same_point(neck):
    """View B is view A flipped left-right, nothing else. The query is view A's cell; its key
    is view B's map sampled where grid_ab says (keys_at). Mapped back through the flip, the
    key's receptive field must sit on the query cell. The old half-cell convention put the
    key s − 1 = 7 px away (a flip turns +3.5 px into −3.5 px)."""
    stride, size = 8, 256 if neck == "none" else 512  # the FPN reads c5's wide field
    n, c = size // stride, size // stride // 2
    cells = [(i, j) for i in (c, c + 1) for j in (c, c + 1)]
    flip = torch.tensor([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    batch = len(cells)
    valid = torch.ones(batch, size, size, dtype=torch.bool)
    grid_ab, valid_ab, _ = compose_correspondence(
        torch.eye(3).expand(batch, 3, 3), flip.expand(batch, 3, 3), (n, n), (size, size),
        (size, size), valid, valid)
    assert valid_ab[:, c, c].all()
    cell_index = torch.tensor([i * n + j for i, j in cells])
    errors = torch.zeros(batch, 2, dtype=torch.float64)
    for seed in range(2):
        torch.manual_seed(seed)
        encoder = DenseEncoder("resnet18", 3, neck=neck, dense_stride=stride,
                               global_head=False, pyramid="dense").eval()
        view_b = torch.randn(batch, 3, size, size).requires_grad_(True)
        keys = keys_at(encoder(view_b)["features"], grid_ab, cell_index[:, None], stride)
        keys.sum().backward()
        weight = view_b.grad.abs().sum(1).double()
        weight = weight / weight.sum((1, 2), keepdim=True)
        xs = torch.arange(size, dtype=torch.float64)
        x_b = (weight.sum(1) * xs).sum(1)
        y_b = (weight.sum(2) * xs).sum(1)
        at_a = torch.stack([size - 1 - x_b, y_b], 1)  # back through the flip
        placed = where_the_grid_puts(n, size)
        errors += at_a - torch.stack([placed[i, j] for i, j in cells])
    errors /= 2
    # same budget as above: the FPN's odd cells lean ≤ 3 px, the backbone's ≤ 1.5 px
    assert errors.abs().max() <= (TOLERANCE if neck == "none" else 3.0), errors
