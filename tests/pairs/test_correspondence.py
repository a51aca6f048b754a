"""Correspondence by colour: every source pixel gets a unique colour (its own x, y coordinates,
a linear code that bilinear resampling preserves), then the colour seen at a cell of view A must
be the colour found at ``grid_ab`` in view B."""

import pytest
import torch
from helpers import cell_colours, colours_agree, coordinate_image

from densessl.augment import ViewAugmentation
from densessl.augment.correspondence import pixel_to_normalized
from densessl.cells import cell_centres
from densessl.contract import PairSample
from densessl.pairs import collate_pairs

SIZE = 64


def strong_augmentation(channels=3, view=48, stride=4):
    geometry = dict(crop_scale=(0.15, 1.0), hflip=0.5, vflip=0.5, rotation_degrees=35,
                    rotation_p=1.0)
    return ViewAugmentation(channels, view_size=view, grid_stride=stride, geometry=geometry,
                            photometry=None, mean=0.0, std=1.0)


@pytest.mark.parametrize("channels", [3, 5])
def test_colours_agree_at_corresponding_cells(channels):
    torch.manual_seed(0)
    image = coordinate_image(channels=channels)
    batch = collate_pairs([PairSample(source_a=image, source_b=image) for _ in range(16)])
    pair = strong_augmentation(channels)(batch)
    _, agree = colours_agree(pair, 48, cells=12, size=SIZE)
    valid = pair.valid_ab
    assert valid.sum() > 500  # strong augmentation still leaves plenty of overlap
    assert agree[valid].float().mean() >= 0.99


def test_no_cell_outside_the_overlap_is_valid():
    """Independent of the matrices: decode the source pixel seen at each valid cell of view A
    and look for it, by brute force, among the pixels that view B really shows."""
    torch.manual_seed(1)
    image = coordinate_image()
    batch = collate_pairs([PairSample(source_a=image, source_b=image) for _ in range(12)])
    view = 48
    pair = strong_augmentation(view=view)(batch)
    colour_a, _ = cell_colours(pair, view, cells=12)
    checked = 0
    for b in range(pair.batch_size):
        shown_b = pair.view_b[b, :2].reshape(2, -1).T * SIZE       # source xy shown by view B
        has_data = pair.view_b[b, 2].reshape(-1) > 0.999           # pixel came from the source
        shown_b = shown_b[has_data]
        seen_a = colour_a[b, :2].permute(1, 2, 0) * SIZE           # 12×12×2 source xy at cells
        nearest = torch.cdist(seen_a.reshape(-1, 2), shown_b).amin(dim=1).reshape(12, 12)
        valid = pair.valid_ab[b]
        # view B samples the source at most ~1.4 px apart, so a point it shows is < 1.5 px away
        assert (nearest[valid] < 1.5).all(), f"image {b}: valid cell with no match in view B"
        checked += int(valid.sum())
        # and cells deep inside view B's footprint are not thrown away
        assert ((nearest < 0.25) & ~valid).float().mean() < 0.1
    assert checked > 300


def test_identity_without_augmentation():
    image = coordinate_image()
    batch = collate_pairs([PairSample(source_a=image, source_b=image)])
    aug = ViewAugmentation(3, view_size=SIZE, grid_stride=8,
                           geometry=dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0),
                           photometry=None, mean=0.0, std=1.0)
    pair = aug(batch)
    assert pair.valid_ab.all()
    centres = pixel_to_normalized(cell_centres(8, 8, SIZE / 8), SIZE, SIZE)
    torch.testing.assert_close(pair.grid_ab[0], centres, atol=1e-4, rtol=0)
    torch.testing.assert_close(pair.view_a, image[None], atol=1e-4, rtol=0)


def test_nodata_and_base_correspondence_are_respected():
    """A known shift between sources (base_grid) plus a nodata stripe in source B."""
    torch.manual_seed(2)
    image = coordinate_image()
    shift = 5
    source_b = torch.roll(image, shifts=-shift, dims=2)       # B shows A's pixel x at x - shift
    xs, ys = image[0] * SIZE, image[1] * SIZE                 # the painted pixel positions
    base_grid = torch.stack([xs - shift, ys], dim=-1)
    base_valid = xs >= shift
    valid_b = torch.ones(SIZE, SIZE, dtype=torch.bool)
    valid_b[:, :10] = False
    sample = PairSample(source_a=image, source_b=source_b, valid_b=valid_b,
                        base_grid=base_grid, base_valid=base_valid)
    batch = collate_pairs([sample] * 8)
    pair = strong_augmentation()(batch)
    colour_a, agree = colours_agree(pair, 48, cells=12, size=SIZE)
    assert pair.valid_ab.sum() > 100
    assert agree[pair.valid_ab].float().mean() >= 0.99
    # every valid cell sees source-A x >= 10 + shift (source B's nodata stripe, mapped back)
    assert (colour_a[:, 0][pair.valid_ab] * SIZE >= 10 + shift - 1).all()


def test_boxes_follow_the_views():
    image = coordinate_image()
    box = torch.tensor([[16.0, 20.0, 40.0, 44.0]])
    sample = PairSample(source_a=image, source_b=image, boxes_a=box, boxes_b=box,
                        instance_ids=torch.tensor([7]), labels=torch.tensor([2]))
    aug = ViewAugmentation(3, view_size=SIZE, grid_stride=8,
                           geometry=dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0),
                           photometry=None)
    pair = aug(collate_pairs([sample]))
    # a horizontal flip of a 64-wide image maps x to 64 - x in box (edge) coordinates
    torch.testing.assert_close(pair.boxes_a, torch.tensor([[24.0, 20.0, 48.0, 44.0]]),
                               atol=1e-3, rtol=0)
    assert pair.instance_ids.tolist() == [7] and pair.box_label.tolist() == [2]
