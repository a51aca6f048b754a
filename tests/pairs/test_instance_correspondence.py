"""``instance_correspondence`` (the helper cut-paste and custom builders share) against a
brute-force per-pixel reference.

Two sources are rendered pixel by pixel: three overlapping textured instances pasted in order
on a textured background, each instance placed differently in A and B (rotation, zoom in and
out), the background moved too. Every texture colour encodes its own coordinates and the
instance, so wherever the helper says a pixel is valid, a bilinear read of B at the grid point
must give A's colour; and every valid pixel must be away from any boundary in A and read only
pixels of the same instance (with the same margin) in B.
"""

import math

import numpy as np
import pytest
import torch

from densessl.pairs import instance_correspondence

SIZE_A, SIZE_B = (40, 44), (46, 38)  # (height, width), different on purpose
SHAPES = [(22, 16, "rect"), (18, 24, "ellipse"), (20, 20, "ellipse")]  # local (h, w, kind)
CODES = [0.3, 0.5, 0.7]
BG_CODE = 0.05


def placement(scale, angle_deg, cx, cy, h, w):
    """3×3 local → source pixel map (rotate + scale about the local centre, move it)."""
    c, s = math.cos(math.radians(angle_deg)) * scale, math.sin(math.radians(angle_deg)) * scale
    ox, oy = (w - 1) / 2, (h - 1) / 2
    return np.array([[c, -s, cx - c * ox + s * oy], [s, c, cy - s * ox - c * oy], [0, 0, 1.0]])


PLACE_A = [placement(1.0, 10, 14, 15, *SHAPES[0][:2]), placement(1.2, -25, 24, 21, *SHAPES[1][:2]),
           placement(0.9, 40, 20, 28, *SHAPES[2][:2])]
PLACE_B = [placement(1.3, -15, 22, 20, *SHAPES[0][:2]), placement(0.7, 30, 12, 13, *SHAPES[1][:2]),
           placement(1.0, 5, 24, 34, *SHAPES[2][:2])]
BACKGROUND = placement(1.0, 6, 20.5, 21, SIZE_A[0], SIZE_A[1])  # A pixel → B pixel


def inside_shape(j, u, v):
    h, w, kind = SHAPES[j]
    if kind == "rect":
        return -0.5 <= u <= w - 0.5 and -0.5 <= v <= h - 0.5
    return ((u - (w - 1) / 2) / (w / 2)) ** 2 + ((v - (h - 1) / 2) / (h / 2)) ** 2 <= 1.0


def render(size, places, to_background):
    """Brute force, pixel by pixel: colours (3×H×W), top id (−1 background) and the full mask
    of every instance."""
    height, width = size
    image = np.zeros((3, height, width))
    top = np.full((height, width), -1)
    masks = np.zeros((len(places), height, width), bool)
    inverses = [np.linalg.inv(p) for p in places]
    for y in range(height):
        for x in range(width):
            bx, by, _ = to_background @ [x, y, 1.0]
            image[:, y, x] = (bx / 64, by / 64, BG_CODE)
            for j, inv in enumerate(inverses):  # paste order: later instances cover earlier
                u, v, _ = inv @ [x, y, 1.0]
                if inside_shape(j, u, v):
                    masks[j, y, x] = True
                    top[y, x] = j
                    image[:, y, x] = (u / 64, v / 64, CODES[j])
    return image, top, masks


def bilinear(image, x, y):
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    out = 0.0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            if wx * wy > 0:
                out = out + wx * wy * image[:, y0 + dy, x0 + dx]
    return out


def interior(top, x, y):
    """Pixel (x, y) and its eight neighbours are inside the image and share one id."""
    height, width = top.shape
    if not (1 <= x < width - 1 and 1 <= y < height - 1):
        return False
    return bool((top[y - 1:y + 2, x - 1:x + 2] == top[y, x]).all())


def support(x, y, tol):
    """Pixels a bilinear read at (x, y) weighs (a column/row counts if its weight > tol)."""
    x0, y0 = math.floor(x), math.floor(y)
    xs = [x0] + ([x0 + 1] if x - x0 > tol else [])
    ys = [y0] + ([y0 + 1] if y - y0 > tol else [])
    return [(px, py) for py in ys for px in xs]


def reference_ok(top_a, top_b, x, y, point, tol):
    """The rule, brute force: interior in A, and every pixel the read touches in B is an
    interior pixel of the same id (background only with a shared background)."""
    height, width = top_b.shape
    if not interior(top_a, x, y) or not np.isfinite(point).all():
        return False
    for px, py in support(point[0], point[1], tol):
        if not (0 <= px < width and 0 <= py < height):
            return False
        if top_b[py, px] != top_a[y, x] or not interior(top_b, px, py):
            return False
    return True


@pytest.fixture(scope="module")
def scene():
    image_a, top_a, masks_a = render(SIZE_A, PLACE_A, np.eye(3))
    image_b, top_b, masks_b = render(SIZE_B, PLACE_B, np.linalg.inv(BACKGROUND))
    matrices = [torch.tensor(pb @ np.linalg.inv(pa)) for pa, pb in zip(PLACE_A, PLACE_B)]
    return image_a, top_a, masks_a, image_b, top_b, masks_b, matrices


@pytest.mark.parametrize("shared_background", [True, False])
def test_matches_brute_force_by_colour(scene, shared_background):
    image_a, top_a, masks_a, image_b, top_b, masks_b, matrices = scene
    # overlaps in both sources, so occlusion is exercised on both sides
    assert (masks_a.sum(0) > 1).any() and (masks_b.sum(0) > 1).any()
    grid, valid = instance_correspondence(
        SIZE_A, SIZE_B, [torch.from_numpy(m) for m in masks_a], matrices,
        [torch.from_numpy(m) for m in masks_b],
        background=torch.tensor(BACKGROUND) if shared_background else None)
    grid, valid = grid.double().numpy(), valid.numpy()
    checked = {j: 0 for j in (-1, 0, 1, 2)}
    strict = 0
    for y in range(SIZE_A[0]):
        for x in range(SIZE_A[1]):
            j = top_a[y, x]
            mapped = (BACKGROUND if j < 0 else matrices[j].numpy()) @ [x, y, 1.0]
            point = mapped[:2] / mapped[2]
            if j < 0 and not shared_background:
                assert not valid[y, x], f"background pixel {(x, y)} valid without a shared bag"
                continue
            # reference with every neighbour counted (strict) or only weighted ones (lenient)
            if reference_ok(top_a, top_b, x, y, point, tol=-1.0):
                strict += 1
                assert valid[y, x], f"pixel {(x, y)} of {j} should be valid"
            if not valid[y, x]:
                continue
            assert reference_ok(top_a, top_b, x, y, point, tol=1e-6), (
                f"pixel {(x, y)} of {j}: on a boundary in A or reads other content in B")
            np.testing.assert_allclose(grid[y, x], point, atol=1e-4)
            seen = bilinear(image_b, *grid[y, x])
            np.testing.assert_allclose(seen, image_a[:, y, x], atol=1e-4,
                                       err_msg=f"pixel {(x, y)} of {j}: colours differ")
            checked[j] += 1
    assert strict > 150
    assert all(checked[j] > 20 for j in (0, 1, 2)), checked
    assert (checked[-1] > 100) == shared_background, checked


def test_covered_pixels_follow_the_later_paste(scene):
    _, top_a, masks_a, _, _, masks_b, matrices = scene
    grid, _ = instance_correspondence(SIZE_A, SIZE_B, list(torch.from_numpy(masks_a)),
                                      matrices, list(torch.from_numpy(masks_b)))
    both = masks_a[0] & masks_a[1] & ~masks_a[2]
    assert both.any() and (top_a[both] == 1).all()
    y, x = np.argwhere(both)[0]
    expected = matrices[1].numpy() @ [x, y, 1.0]
    np.testing.assert_allclose(grid[y, x].double().numpy(), expected[:2], atol=1e-4)


def test_visible_parts_in_b_give_the_same_answer(scene):
    _, _, masks_a, _, top_b, masks_b, matrices = scene
    visible_b = [torch.from_numpy(top_b == j) for j in range(3)]
    full = instance_correspondence(SIZE_A, SIZE_B, list(torch.from_numpy(masks_a)), matrices,
                                   list(torch.from_numpy(masks_b)))
    visible = instance_correspondence(SIZE_A, SIZE_B, list(torch.from_numpy(masks_a)),
                                      matrices, visible_b)
    assert torch.equal(full[1], visible[1]) and full[1].any()


def test_bad_inputs_name_the_argument():
    mask = torch.ones(8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="masks_b must be H×W masks of size"):
        instance_correspondence((8, 8), (9, 9), [mask], [torch.eye(3)], [mask])
    with pytest.raises(ValueError, match="1 masks_a, 2 matrices and 1 masks_b"):
        instance_correspondence((8, 8), (8, 8), [mask], [torch.eye(3)] * 2, [mask])
    with pytest.raises(ValueError, match="3×3"):
        instance_correspondence((8, 8), (8, 8), [mask], [torch.eye(2)], [mask])


def test_points_leaving_source_b_are_invalid():
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[2:10, 2:10] = True
    moved = torch.zeros(12, 12, dtype=torch.bool)
    moved[2:10, 6:12] = True                     # moved 4 px right, cut by B's right edge
    shift = torch.tensor([[1.0, 0, 4], [0, 1, 0], [0, 0, 1]])
    grid, valid = instance_correspondence((12, 12), (12, 12), [mask], [shift], [moved])
    cols = valid.any(0).nonzero().flatten().tolist()
    assert cols == [3, 4, 5, 6]                  # x + 4 <= 10: B's last column is an edge too
    assert (grid[valid][:, 0] <= 10).all()
