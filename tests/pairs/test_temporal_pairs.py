"""Temporal correspondence by colour: both dates carry a unique colour per ground point (its
coordinates); after TemporalPairs and ViewAugmentation the colour at a cell of view A must be the
colour at ``grid_ab`` in view B, and cells on nodata are never valid."""

import geo_fixtures as g
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densessl.augment import ViewAugmentation
from densessl.augment.correspondence import apply_homography, pixel_to_normalized
from densessl.cells import cell_centres
from densessl.data.geotiff import GeoTiffPairs
from densessl.data.xbd import XBDTiles
from densessl.errors import PairContractError
from densessl.pairs import TemporalPairs, collate_pairs, get_pair_builder

SIZE, VIEW, CELLS = 128, 48, 12


def augmentation(channels):
    geometry = dict(crop_scale=(0.2, 1.0), hflip=0.5, vflip=0.5, rotation_degrees=40,
                    rotation_p=1.0)
    return ViewAugmentation(channels, view_size=VIEW, grid_stride=VIEW // CELLS,
                            geometry=geometry, photometry=None, mean=0.0, std=1.0)


def colours(pair):
    centres = pixel_to_normalized(cell_centres(CELLS, CELLS, VIEW / CELLS), VIEW, VIEW)
    grid_a = centres[None].expand(pair.batch_size, -1, -1, -1)
    at_a = F.grid_sample(pair.view_a, grid_a, align_corners=False, padding_mode="border")
    at_b = F.grid_sample(pair.view_b, pair.grid_ab, align_corners=False, padding_mode="border")
    return at_a, at_b


def write_coordinate_pngs(root, count=4):
    """Pre/post PNGs with R = 2x, G = 2y (exact in 8 bits); B differs between dates (the
    content changes); the post image has a black (no imagery) block at x, y < 40."""
    images = root / "train" / "images"
    images.mkdir(parents=True)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    for k in range(count):
        for phase, blue in (("pre", 255), ("post", 120)):
            rgb = np.stack([2 * xs, 2 * ys, np.full_like(xs, blue)], -1).astype(np.uint8)
            if phase == "post":
                rgb[:40, :40] = 0
            Image.fromarray(rgb).save(images / f"place-{k}_{k:08d}_{phase}_disaster.png")


def check_pairs(batch, channels, decode, nodata, pixel_units=1.0):
    """No valid cell sees nodata; colours agree (≤ 0.5 px) on ≥ 99 % of the valid cells.

    ``nodata(points, margin)`` says which source points lie in a nodata region grown by
    ``margin`` px. Cells within 3 px of nodata are left out of the colour check only: their
    *colours* are mixed with the nodata fill by the two bilinear resamplings that render the
    views (source → view B, view B → grid_ab), which says nothing about the correspondence.
    """
    torch.manual_seed(0)
    pair = augmentation(channels)(batch)
    at_a, at_b = colours(pair)
    xy_a, xy_b = decode(at_a), decode(at_b)  # B×2×h×w source pixel coordinates
    valid = pair.valid_ab
    # where each cell of view A comes from in the full image / raster: the view's geometry
    # plus the tile's window (the colours near nodata are mixed with the fill, see above)
    offsets = torch.tensor([m["window"][:2] for m in pair.meta], dtype=torch.float32)
    centres = cell_centres(CELLS, CELLS, VIEW / CELLS).expand(pair.batch_size, -1, -1, -1)
    points = apply_homography(torch.linalg.inv(pair.matrix_a), centres) + offsets[:, None, None]
    assert not nodata(points[valid], 0.0).any()
    clean = valid & ~nodata(points, 3.0)
    assert clean.sum() > 0.8 * valid.sum() > 300
    error = (xy_a - xy_b).abs().amax(1) / pixel_units
    assert (error[clean] < 0.5).float().mean() >= 0.99
    return pair


def test_xbd_dates_by_colour(tmp_path):
    write_coordinate_pngs(tmp_path)
    builder = TemporalPairs(XBDTiles(tmp_path, image_size=96, tiles_per_pair=6, seed=0),
                            swap_p=0.5)
    samples = [builder[i] for i in range(len(builder))]
    assert {s.meta["swapped"] for s in samples} == {True, False}
    assert all(s.base_grid is None for s in samples)

    def in_black_block(points, margin):  # the post image's black block: pixels 0..39
        return (points[..., 0] < 39.5 + margin) & (points[..., 1] < 39.5 + margin)

    pair = check_pairs(collate_pairs(samples), 3, lambda c: c[:, :2] * 255 / 2, in_black_block)
    # the content differs between the dates: blue is 1.0 in pre views, 120/255 in post views
    blue_a = pair.view_a[:, 2].amax((1, 2))
    swapped = torch.tensor([m["swapped"] for m in pair.meta])
    assert torch.allclose(blue_a[~swapped], torch.ones(1), atol=1e-3)


def test_geotiff_dates_by_colour(tmp_path):
    g.write_series(tmp_path / "d", size=96)
    dataset = GeoTiffPairs(str(tmp_path / "d"), image_size=64, channels=2, pattern=g.PATTERN,
                           tiles_per_pair=12, min_valid=0.3, cache_dir=str(tmp_path / "c"))
    builder = get_pair_builder("temporal")(dataset, swap_p=0.5)
    batch = collate_pairs([builder[i] for i in range(len(builder))])
    mean = torch.tensor(dataset.mean.ravel(), dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(dataset.std.ravel(), dtype=torch.float32)[None, :, None, None]
    # metres relative to the origin → early-grid pixels (x = east / 10 - 0.5, y = -north / 10
    # - 0.5); nodata: the early date's columns 0..9, the later date's strip north of -200 m
    to_pixels = torch.tensor([1 / g.RES, -1 / g.RES])[None, :, None, None]
    decode = lambda c: ((c - 0.5) / 0.25 * std + mean) * to_pixels - 0.5  # noqa: E731

    def nodata(points, margin):
        return (points[..., 0] < 9.5 + margin) | (points[..., 1] < 19.5 + margin)

    check_pairs(batch, 2, decode, nodata)


def test_swap_and_missing_temporal_keys():
    item = {"image_t0": torch.zeros(3, 8, 8), "image_t1": torch.ones(3, 8, 8),
            "valid_t1": torch.zeros(8, 8, dtype=torch.bool)}
    always = TemporalPairs([item], swap_p=1.0)[0]
    assert always.source_a.mean() == 1 and not always.valid_a.any() and always.valid_b is None
    never = TemporalPairs([item], swap_p=0.0)[0]
    assert never.source_a.mean() == 0 and never.meta["swapped"] is False
    with pytest.raises(PairContractError, match="image_t0"):
        TemporalPairs([{"image": torch.zeros(3, 8, 8)}])[0]
    with pytest.raises(PairContractError, match="swap_p"):
        TemporalPairs([item], swap_p=2.0)
