"""Cell alignment (densessl.cells): ``"centre"`` cells (ResNets, stride-s cell i on pixel s·i)
and ``"block"`` cells (ConvNeXt's patchify stem, on s·i + (s − 1)/2).

Measured as in tests/core/test_cell_centres.py (the input gradient's centroid of a cell, random
init, averaged over inits) for a ConvNeXt, against where the correspondence grid now puts its
cells, and against where the old ResNet placement would (3.5 px off at stride 8); the offset,
the block-aligned FPN upsampling and RoIAlign's box shift against hand computations and
float64 loops; ResNet results unchanged bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from helpers import field_centroids
from torchvision.ops import roi_align

from densessl.augment.correspondence import compose_correspondence, normalized_to_pixel
from densessl.cells import (
    CELL_ALIGNMENTS,
    boxes_for_roi_align,
    cell_centre,
    cell_centres,
    cell_offset,
    image_to_feature_grid,
    pixel_to_normalized,
)
from densessl.losses.dense_contrast import DenseContrast, keys_at
from densessl.models import DenseEncoder, ResNetBackbone
from densessl.models.instance_head import all_level_roi_align, multiscale_roi_align
from densessl.models.neck import CentredFeaturePyramidNetwork, upsample_block, upsample_centred
from densessl.models.timm_backbone import TimmBackbone

CONVNEXT = "timm:convnext_atto"


# -- the offset and the functions that use it --------------------------------------------------

def test_cell_offset_by_hand():
    assert CELL_ALIGNMENTS == ("centre", "block")
    for s in (4, 8, 16, 32):
        assert cell_offset(s) == cell_offset(s, "centre") == 0.0
    # the middle of the first s×s block: pixels 0..s−1
    assert [cell_offset(s, "block") for s in (2, 4, 8, 16, 32)] == [0.5, 1.5, 3.5, 7.5, 15.5]
    assert cell_centre(3, 8, "block") == 27.5 and cell_centre(3, 8) == 24
    with pytest.raises(ValueError, match="alignment"):
        cell_offset(8, "corner")


def test_block_cell_centres_and_feature_grid_by_hand():
    centres = cell_centres(2, 3, 8, alignment="block")
    assert centres[1, 2].tolist() == [19.5, 11.5]  # x = 8·2 + 3.5, y = 8·1 + 3.5
    # image point on block cell (i, j) → the feature map's normalised coordinates of (i, j)
    size, stride, n = 64, 8, 8
    xy = torch.tensor([[8 * 5 + 3.5, 8 * 2 + 3.5]], dtype=torch.float64)
    grid = pixel_to_normalized(xy, size, size)
    feature = image_to_feature_grid(grid, (size, size), (n, n), stride, "block")
    expected = torch.tensor([[(5 + 0.5) * 2 / n - 1, (2 + 0.5) * 2 / n - 1]], dtype=torch.float64)
    assert torch.allclose(feature, expected, atol=1e-12)
    # the same point read with the ResNet placement lands 3.5/8 of a cell further on
    centre = image_to_feature_grid(grid, (size, size), (n, n), stride)
    assert torch.allclose((centre - feature) * n / 2, torch.full_like(feature, 3.5 / 8))


def test_centre_results_are_bit_identical_to_the_resnet_formulas():
    """The default (every ResNet caller) computes exactly what cells.py did before."""
    torch.manual_seed(0)
    for stride in (4, 8, 16, 32):
        xs = torch.arange(7, dtype=torch.float32) * stride
        assert torch.equal(cell_centres(5, 7, stride)[0, :, 0], xs)
        grid = torch.rand(3, 10, 2) * 2 - 1
        old = pixel_to_normalized(normalized_to_pixel(grid, 96, 96) / stride, 96 // stride,
                                  96 // stride)
        assert torch.equal(image_to_feature_grid(grid, (96, 96), (96 // stride,) * 2, stride),
                           old)
        boxes = torch.rand(6, 4) * 90
        assert torch.equal(boxes_for_roi_align(boxes, stride), boxes + (stride / 2.0 - 0.5))


# -- which backbone has which cells ------------------------------------------------------------

def test_backbones_expose_their_alignment():
    assert TimmBackbone(CONVNEXT).cell_alignment == "block"
    assert TimmBackbone("timm:regnetx_002").cell_alignment == "centre"
    assert TimmBackbone("timm:mobilenetv3_small_050").cell_alignment == "centre"
    assert ResNetBackbone("resnet18").cell_alignment == "centre"
    encoder = DenseEncoder(CONVNEXT, 3, global_head=False, pyramid="dense")
    assert encoder.cell_alignment == "block" and encoder.neck.fpn.alignment == "block"
    assert encoder.neck.fpn.upsample == "centred"  # "centred for the backbone's cells"
    assert DenseEncoder("resnet18", 3, global_head=False).cell_alignment == "centre"
    # the detector's FPN computes what the pretraining neck did
    from densessl.eval.detection import build_fpn_backbone

    assert build_fpn_backbone(CONVNEXT, 3, 16).fpn.alignment == "block"
    assert build_fpn_backbone("resnet18", 3, 16).fpn.alignment == "centre"


def test_pretraining_threads_the_encoders_alignment():
    """The augmentation, the dense keys and RoIAlign take the trained encoder's alignment."""
    from densessl.methods import DensePretraining
    from densessl.recipe import parse_recipe

    for backbone, expected in ((CONVNEXT, "block"), ("resnet18", "centre")):
        recipe = parse_recipe({
            "name": "t", "data": {"image_size": 80, "options": {"num_images": 4}},
            "augment": {"view_size": 64}, "model": {"backbone": backbone},
            "loss": {"instance": {"weight": 1.0}}, "train": {"batch_size": 2}}, "<test>")
        task = DensePretraining(recipe)
        assert task.encoder.cell_alignment == expected
        assert task.augment.cell_alignment == expected
        assert task.dense_loss.alignment == expected
        assert task.encoder.instance_head.alignment == expected
        assert task.model.momentum.instance_head.alignment == expected


# -- measured: where a ConvNeXt cell really is --------------------------------------------------

def placed(n: int, size: int, alignment: str) -> torch.Tensor:
    """Pixel (x, y) of view A's n×n cells as the correspondence puts them (identity pair)."""
    eye = torch.eye(3)[None]
    valid = torch.ones(1, size, size, dtype=torch.bool)
    grid_ab, _, _ = compose_correspondence(eye, eye, (n, n), (size, size), (size, size),
                                           valid, valid, alignment=alignment)
    return normalized_to_pixel(grid_ab[0].double(), size, size)


def convnext(neck: str, stride: int, seed: int) -> DenseEncoder:
    torch.manual_seed(seed)
    encoder = DenseEncoder(CONVNEXT, 3, neck=neck, dense_stride=stride, global_head=False,
                           pyramid="dense").eval()
    # timm inits layer scale at 1e-6, which leaves the blocks' 7×7 convs out of the field;
    # at 1 they take part (as after training)
    for name, p in encoder.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(1.0)
    return encoder


def convnext_centroids(neck: str, stride: int, size: int = 128, seeds: int = 2):
    """Measured (x, y) of the 2×2 cells around the image centre (a symmetric set, so the
    border's pull toward the middle cancels in their mean), averaged over inits, and the
    cells: (4×2, cells)."""
    n = size // stride
    c = n // 2
    cells = [(i, j) for i in (c - 1, c) for j in (c - 1, c)]
    total = torch.zeros(len(cells), 2, dtype=torch.float64)
    for seed in range(seeds):
        encoder = convnext(neck, stride, seed)
        images = torch.randn(len(cells), 3, size, size)
        total += field_centroids(lambda x, e=encoder: e(x)["features"], images, cells)
    return total / seeds, cells


@pytest.mark.parametrize("neck,stride", [("none", 8), ("none", 16), ("fpn", 8)])
def test_convnext_cells_sit_where_the_grid_puts_them(neck, stride):
    measured, cells = convnext_centroids(neck, stride)
    n = 128 // stride
    errors = {a: measured - torch.stack([placed(n, 128, a)[i, j] for i, j in cells])
              for a in ("block", "centre")}
    # the mean over the symmetric cells: the placement alone; each cell: plus the border pull
    # (≤ 2 px here: c4/c5 fields are wider than the image)
    assert errors["block"].mean(0).abs().max() <= 0.5, errors["block"]
    assert errors["block"].abs().max() <= (1.0 if (neck, stride) == ("none", 8) else 2.5), errors
    # the ResNet placement is (s − 1)/2 off: the test can tell the two apart
    assert (errors["centre"].mean(0) - (stride - 1) / 2).abs().max() <= 0.5, errors["centre"]


def test_convnext_fpn_needs_the_block_upsampling():
    """The same ConvNeXt FPN with the ResNet top-down upsampling (coarse j on fine 2j) moves
    its p3 cells off the block grid; the block one keeps them on it."""
    size, stride = 128, 8
    n, c = size // stride, size // stride // 2
    cells = [(i, j) for i in (c - 1, c) for j in (c - 1, c)]
    expected = torch.stack([placed(n, size, "block")[i, j] for i, j in cells])
    mean_error = {}
    for upsampling in ("block", "centre"):
        total = torch.zeros(len(cells), 2, dtype=torch.float64)
        for seed in range(2):
            encoder = convnext("fpn", stride, seed)
            encoder.neck.fpn.alignment = upsampling
            images = torch.randn(len(cells), 3, size, size)
            total += field_centroids(lambda x, e=encoder: e(x)["features"], images, cells)
        mean_error[upsampling] = (total / 2 - expected).mean(0).abs().max().item()
    assert mean_error["block"] <= 0.5, mean_error
    assert mean_error["centre"] >= 1.0, mean_error


@pytest.mark.parametrize("alignment,within", [("block", 1.0), ("centre", None)])
def test_convnext_flip_pair_key_is_the_query_point(alignment, within):
    """View B is view A flipped left-right. The key (view B's map read at grid_ab by keys_at,
    the dense loss's sampling) must have its field on the query cell once mapped back; with
    the ResNet placement it is 2·3.5 = 7 px off in x (a flip turns +3.5 into −3.5)."""
    size, stride = 128, 8
    n, c = size // stride, size // stride // 2
    cells = [(i, j) for i in (c - 1, c) for j in (c - 1, c)]
    flip = torch.tensor([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    batch = len(cells)
    valid = torch.ones(batch, size, size, dtype=torch.bool)
    grid_ab, valid_ab, _ = compose_correspondence(
        torch.eye(3).expand(batch, 3, 3), flip.expand(batch, 3, 3), (n, n), (size, size),
        (size, size), valid, valid, alignment=alignment)
    assert valid_ab[:, c, c].all()
    index = torch.tensor([i * n + j for i, j in cells])[:, None]
    truth = torch.stack([placed(n, size, "block")[i, j] for i, j in cells])
    errors = torch.zeros(batch, 2, dtype=torch.float64)
    for seed in range(2):
        encoder = convnext("none", stride, seed)
        view_b = torch.randn(batch, 3, size, size).requires_grad_(True)
        keys_at(encoder(view_b)["features"], grid_ab, index, stride, alignment).sum().backward()
        weight = view_b.grad.abs().sum(1).double()
        weight = weight / weight.sum((1, 2), keepdim=True)
        xs = torch.arange(size, dtype=torch.float64)
        at_a = torch.stack([size - 1 - (weight.sum(1) * xs).sum(1), (weight.sum(2) * xs).sum(1)],
                           1)
        errors += (at_a - truth) / 2
    if within is not None:
        assert errors.abs().max() <= within, errors
    else:
        assert (errors[:, 0].mean() + 7.0).abs() <= 1.0, errors


# -- the block FPN upsampling against explicit interpolation -----------------------------------

def block_reference(coarse: torch.Tensor) -> torch.Tensor:
    """Fine cell i at coarse position i/2 − 1/4 (clamped to the grid), linear in each axis,
    by explicit loops in float64."""
    b, ch, h, w = coarse.shape
    x = coarse.double()

    def weights(n_fine: int, n: int) -> torch.Tensor:
        m = torch.zeros(n_fine, n, dtype=torch.float64)
        for i in range(n_fine):
            p = min(max(i / 2 - 0.25, 0.0), n - 1.0)
            lo = int(p)
            hi = min(lo + 1, n - 1)
            m[i, lo] += 1 - (p - lo)
            m[i, hi] += p - lo
        return m

    wy, wx = weights(2 * h, h), weights(2 * w, w)
    return torch.einsum("yh,bchw,xw->bcyx", wy, x, wx)


def test_block_upsampling_matches_the_explicit_interpolation():
    coarse = torch.randn(2, 3, 4, 5)
    ref = block_reference(coarse)
    assert torch.allclose(upsample_block(coarse, (8, 10)).double(), ref, atol=1e-6)
    fpn = CentredFeaturePyramidNetwork([3, 3], 3, alignment="block")
    assert torch.allclose(fpn._up(coarse, (8, 10)).double(), ref, atol=1e-6)
    # the ResNet one puts coarse j on fine 2j: not the same thing
    assert not torch.allclose(upsample_centred(coarse, (8, 10)).double(), ref, atol=1e-2)
    with pytest.raises(ValueError, match="2×"):
        upsample_block(coarse, (7, 10))


# -- RoIAlign samples the cells centred on a box -----------------------------------------------

def bilinear(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Interior bilinear sample of C×h×w at feature coordinates (y, x), float64."""
    y0, x0 = int(y // 1), int(x // 1)
    dy, dx = y - y0, x - x0
    f = feature.double()
    return ((1 - dy) * (1 - dx) * f[:, y0, x0] + (1 - dy) * dx * f[:, y0, x0 + 1]
            + dy * (1 - dx) * f[:, y0 + 1, x0] + dy * dx * f[:, y0 + 1, x0 + 1])


@pytest.mark.parametrize("alignment", ["block", "centre"])
def test_roi_align_samples_the_cells_centred_on_the_box(alignment):
    """Each output bin (sampling_ratio 1: one sample at its centre) must equal the feature
    interpolated at the pixel the bin centre is on, with cell i on pixel s·i + offset."""
    torch.manual_seed(0)
    stride, size, out = 8, 128, 2
    feature = torch.randn(2, 3, size // stride, size // stride)
    boxes = torch.tensor([[20.0, 30.0, 70.0, 61.0], [33.5, 17.0, 90.0, 100.0],
                          [41.0, 44.0, 58.0, 52.0]])
    box_batch = torch.tensor([0, 1, 1])
    rois = torch.cat([box_batch[:, None].float(), boxes_for_roi_align(boxes, stride, alignment)],
                     1)
    pooled = roi_align(feature, rois, out, 1.0 / stride, 1, aligned=True)
    offset = cell_offset(stride, alignment)
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        for by in range(out):
            for bx in range(out):
                # bin centre in COCO edges → pixel (centres at integers) → cell index
                px = x0 + (bx + 0.5) * (x1 - x0) / out - 0.5
                py = y0 + (by + 0.5) * (y1 - y0) / out - 0.5
                expected = bilinear(feature[box_batch[k]], (py - offset) / stride,
                                    (px - offset) / stride)
                assert torch.allclose(pooled[k, :, by, bx].double(), expected, atol=1e-5)
    # the head's own pooling passes the alignment down (one level: same boxes)
    pyramid = {"p3": feature}
    assert torch.allclose(all_level_roi_align(pyramid, boxes, box_batch, out, 1,
                                              alignment=alignment)[0], pooled, atol=1e-6)
    assert torch.allclose(multiscale_roi_align(pyramid, boxes, box_batch, out, 1,
                                               alignment=alignment), pooled, atol=1e-6)


def test_dense_contrast_rejects_an_unknown_alignment():
    with pytest.raises(ValueError, match="alignment"):
        DenseContrast(dim=4, queue_size=8, alignment="middle")
