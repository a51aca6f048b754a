"""The point maps densessl takes from kornia (``transform_points``, ``transform_bbox``,
``create_meshgrid``) and the one footprint test, against plain float64 loops: the conventions
(pixel centres at integers, COCO box edges, x then y) are densessl's, so they are checked here."""

import math

import pytest
import torch

from densessl.augment.correspondence import apply_homography, transform_boxes
from densessl.contract import PairSample
from densessl.errors import PairContractError
from densessl.pairs.correspondence import homography_correspondence, inside_image, pixel_grid
from densessl.pairs.validation import validate_pair_sample


def project(matrix, x, y):
    """One point through a 3×3 list-of-lists matrix, in float64."""
    u, v, w = (row[0] * x + row[1] * y + row[2] for row in matrix)
    return u / w, v / w


def random_matrices(n, seed):
    """Rotations, scales, shifts and a mild perspective (w stays near 1 on the test points)."""
    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=gen) * 2 * math.pi
    scale = 0.5 + torch.rand(n, generator=gen)
    m = torch.zeros(n, 3, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1] = scale * angle.cos(), -scale * angle.sin()
    m[:, 1, 0], m[:, 1, 1] = scale * angle.sin(), scale * angle.cos()
    m[:, :2, 2] = torch.randn(n, 2, generator=gen, dtype=torch.float64) * 10
    m[:, 2, :2] = torch.randn(n, 2, generator=gen, dtype=torch.float64) * 1e-3
    m[:, 2, 2] = 1.0
    return m


def test_pixel_grid_is_x_then_y_at_integer_centres():
    grid = pixel_grid(3, 5)
    assert grid.shape == (3, 5, 2) and grid.dtype == torch.float32
    for y in range(3):
        for x in range(5):
            assert grid[y, x].tolist() == [x, y]
    assert pixel_grid(2, 2, device="meta").device.type == "meta"


def test_apply_homography_matches_a_float64_loop():
    matrices = random_matrices(4, seed=0)
    points = torch.rand(4, 3, 5, 2, generator=torch.Generator().manual_seed(1)) * 60 - 10
    moved = apply_homography(matrices.float(), points)
    assert moved.shape == points.shape and moved.dtype == torch.float32
    for b in range(4):
        mat = matrices[b].tolist()
        for i in range(3):
            for j in range(5):
                want = project(mat, *points[b, i, j].double().tolist())
                assert moved[b, i, j].tolist() == pytest.approx(want, abs=1e-3)


def test_transform_boxes_is_the_hull_of_the_four_moved_corners():
    matrices = random_matrices(6, seed=2)
    boxes = torch.tensor([[2, 3, 10, 20], [0, 0, 64, 48], [5, 5, 6, 6], [30, 1, 33, 40],
                          [7, 9, 8, 30], [0, 0, 1, 1.0]])
    hull = transform_boxes(boxes, matrices.float())
    for box, mat, got in zip(boxes.tolist(), matrices.tolist(), hull.tolist()):
        # COCO edges → pixel coordinates (centres at integers) and back
        x0, y0, x1, y1 = (v - 0.5 for v in box)
        corners = [project(mat, x, y) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        want = [min(xs) + 0.5, min(ys) + 0.5, max(xs) + 0.5, max(ys) + 0.5]
        assert got == pytest.approx(want, abs=1e-3)
    assert transform_boxes(torch.zeros(0, 4), torch.zeros(0, 3, 3)).shape == (0, 4)


def test_inside_image_is_the_pixel_footprint():
    points = torch.tensor([[-0.5, -0.5], [11.5, 7.5], [-0.51, 3], [11.51, 3], [3, 7.51],
                           [float("nan"), 1], [1, float("nan")], [float("inf"), 1],
                           [-float("inf"), 1]])
    assert inside_image(points, (8, 12)).tolist() == [True, True] + [False] * 7


def test_homography_points_behind_the_camera_have_no_match():
    # w = 1 − x/4 < 0 for x > 4, where u and v change sign with w: dividing by w (kornia keeps
    # its sign) would put those points back inside B, mirrored through the horizon
    matrix = [[-10.0, 0, 41], [-10, 1, 40], [-0.25, 0, 1]]
    grid, valid = homography_correspondence(torch.tensor(matrix), (6, 10), (100, 100))
    mirrored = 0
    for y in range(6):
        for x in range(10):
            w = 1 - x / 4
            u, v = (row[0] * x + row[1] * y + row[2] for row in matrix[:2])
            lands = -0.5 <= u / w <= 99.5 and -0.5 <= v / w <= 99.5 if w else False
            mirrored += w < 0 and lands
            assert bool(valid[y, x]) == (w > 0 and lands), (x, y)
            if w > 0:
                assert grid[y, x].tolist() == pytest.approx([u / w, v / w], abs=1e-4)
    assert mirrored > 0 and valid.any()  # the test has points of both kinds


def test_validation_rejects_a_nan_row_marked_valid():
    # y NaN with x fine: the footprint test catches it (NaN fails every comparison)
    image = torch.zeros(3, 4, 4)
    grid = pixel_grid(4, 4)
    grid[1, 2, 1] = float("nan")
    with pytest.raises(PairContractError, match="1 positions outside"):
        validate_pair_sample(PairSample(source_a=image, source_b=image, base_grid=grid))
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[1, 2] = False
    validate_pair_sample(PairSample(source_a=image, source_b=image, base_grid=grid,
                                    base_valid=valid))
