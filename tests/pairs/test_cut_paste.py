"""Cut-paste pairs: correspondence checked by colour, before and after view augmentation.

Every segment pixel is painted with its own segment coordinates and a code for its segment,
every background pixel with its position and a code for its background. Wherever the builder
(and then the augmentation) says two points correspond, the colours must agree.
"""

import numpy as np
import pytest
import torch
from helpers import PAINTED_SIZE as SIZE
from helpers import painted_builder, painted_colours_agree, painted_segment

from densessl.augment import ViewAugmentation
from densessl.augment.correspondence import sample_at
from densessl.pairs import CutPastePairs, collate_pairs
from densessl.workflows.pretraining import collect_provenance


def test_base_correspondence_by_colour_and_occlusion():
    torch.manual_seed(0)
    builder = painted_builder()
    checked = overlapped = 0
    for i in range(32):
        s = builder[i]
        valid = s.base_valid
        seen_b = sample_at(s.source_b[None], s.base_grid[None])[0]
        diff = (s.source_a - seen_b).abs().amax(0)
        assert (diff[valid] < 1e-3).all(), f"pair {i}: colours differ at valid pixels"
        checked += int(valid.sum())
        # a pixel shown in A with an instance code is valid only if B shows the same code there
        codes_a = s.source_a[2]
        assert torch.isclose(codes_a[valid], seen_b[2][valid]).all()
        # occlusion: pixels of A whose instance is covered in B are never valid
        overlapped += int(((s.class_map_a >= 0) & ~valid).sum())
        # background corresponds only with the same background in both views
        if not s.meta["same_background"]:
            assert not (valid & (s.class_map_a < 0)).any()
        assert s.boxes_a.shape == s.boxes_b.shape and len(s.labels) == len(s.instance_ids)
        assert ((s.boxes_a >= 0) & (s.boxes_a <= SIZE)).all()
    assert checked > 10000 and overlapped > 0


def test_colours_agree_after_augmentation():
    torch.manual_seed(1)
    builder = painted_builder()
    batch = collate_pairs([builder[i] for i in range(16)])
    geometry = dict(crop_scale=(0.3, 1.0), hflip=0.5, vflip=0.5, rotation_degrees=30,
                    rotation_p=1.0)
    view = 48
    aug = ViewAugmentation(3, view_size=view, grid_stride=4, geometry=geometry,
                           photometry=None, mean=0.0, std=1.0)
    pair = aug(batch)
    colour_a, agree = painted_colours_agree(pair, view)
    valid = pair.valid_ab
    assert valid.sum() > 300
    assert agree[valid].float().mean() >= 0.99
    # the class map follows the views: a valid instance cell shows its class's code
    on_instance = valid & (pair.class_map_a > 0)
    assert on_instance.sum() > 50
    codes = (colour_a[:, 2] / 0.1).round().long()
    assert (codes[on_instance] == pair.class_map_a[on_instance]).float().mean() >= 0.99
    # boxes moved with the views (their centres: test_box_centres_follow_the_views)
    assert pair.boxes_a.shape[0] > 10 and pair.boxes_a.shape == pair.boxes_b.shape


def test_box_centres_follow_the_views():
    """An ellipse's box centre is its centre, and an affine view maps it to the centre of the
    moved box: with one paste per pair (no occlusion) and full-size crops (no clipping at the
    view's edge), the pixel at each box's centre shows its instance's code, in A and in B."""
    torch.manual_seed(11)
    builder = painted_builder(k=1)
    batch = collate_pairs([builder[i] for i in range(24)])
    view = 48
    aug = ViewAugmentation(3, view_size=view, grid_stride=4, photometry=None, mean=0.0, std=1.0,
                           geometry=dict(crop_scale=(1.0, 1.0), hflip=0.5, vflip=0.5,
                                         rotation_degrees=30, rotation_p=1.0))
    pair = aug(batch)
    assert pair.boxes_a.shape[0] >= 20 and pair.box_label.min() >= 1
    for view_image, boxes in ((pair.view_a, pair.boxes_a), (pair.view_b, pair.boxes_b)):
        x = ((boxes[:, 0] + boxes[:, 2]) / 2).floor().long().clamp(0, view - 1)
        y = ((boxes[:, 1] + boxes[:, 3]) / 2).floor().long().clamp(0, view - 1)
        code = (view_image[pair.box_batch, 2, y, x] / 0.1).round().long()
        assert (code == pair.box_label).float().mean() >= 0.95


def test_insloc_one_instance_two_backgrounds():
    torch.manual_seed(2)
    builder = painted_builder(mode="insloc", same_background=None)
    for i in range(8):
        s = builder[i]
        a, b = s.meta["backgrounds"]
        assert a != b and len(s.meta["segments"]) == 1
        assert not (s.base_valid & (s.class_map_a < 0)).any()
        assert s.base_valid.any() and s.boxes_a.shape[0] <= 1


def test_transmission_multiplies():
    torch.manual_seed(3)
    seg = painted_segment(20, 20, 1)
    seg["image"] = torch.full((3, 20, 20), 0.5)
    builder = CutPastePairs(k=1, blend="transmission", scale_range=(1, 1), rotate=False,
                            image_size=SIZE, segments=[seg],
                            backgrounds=[{"image": torch.full((3, SIZE, SIZE), 0.8)}])
    s = builder[0]
    inside = s.class_map_a == 1
    values = s.source_a[:, inside & s.base_valid]
    torch.testing.assert_close(values, torch.full_like(values, 0.4))
    assert torch.allclose(s.source_a[:, ~inside].max(), torch.tensor(0.8))


def test_synthetic_roots_cache_and_provenance(tmp_path):
    builder = CutPastePairs(cache_dir=str(tmp_path), image_size=SIZE, seed=0)
    # the synthetic X-ray set is generated once into the shared cache (densessl.data.cache)
    root = next((tmp_path / "synthetic").glob("xray-*"))
    marker = root / "pidray" / "annotations" / "xray_train.json"
    stamp = marker.stat().st_mtime_ns
    s = builder[0]
    assert s.source_a.shape == (3, SIZE, SIZE) and s.class_map_a.shape == (SIZE, SIZE)
    assert set(np.unique(s.class_map_a.numpy())) <= set(range(-1, 13))
    cards, skipped = collect_provenance(builder)
    assert {c["name"] for c in cards} == {"PIDray", "SIXray"} and skipped == []
    again = CutPastePairs(cache_dir=str(tmp_path), image_size=SIZE, seed=0)
    assert marker.stat().st_mtime_ns == stamp  # generated once
    assert again.segments.cache_file == builder.segments.cache_file
    assert len(again.segments) == len(builder.segments) > 0


def test_bad_options():
    from densessl.errors import RecipeError

    with pytest.raises(RecipeError, match="mode"):
        painted_builder(mode="mosaic")
