"""Device-side cut-paste (``device_composite``) against the host builder, the reference.

The same draws (seeded torch RNG → the builder's generator) go through both paths: the host
builder (cv2 warps, numpy blending, ``instance_correspondence``, ``np.nonzero`` boxes) and the
batched stage (``grid_sample``, fixed-shape gathers, ``masks_to_boxes``). Sources, base
correspondence, class map and boxes must agree up to interpolation; the correspondence is also
checked by colour without the reference, before and after view augmentation.
"""

import pytest
import torch
from helpers import coordinate_image
from test_cut_paste import SIZE, painted_background, painted_colours_agree, painted_segment

from densessl.augment import ViewAugmentation
from densessl.augment.correspondence import sample_at
from densessl.contract import PairSample, PastePlan
from densessl.errors import PairContractError, RecipeError
from densessl.pairs import CutPastePairs, NoisyPairs, collate_pairs
from densessl.pairs.cut_paste import paste_matrix
from densessl.pairs.device_paste import composite_pastes, composite_sample
from densessl.recipe import load_recipe


def builder(device_composite, blend="alpha", mode="segloc", uint8=False, k=3, size=SIZE,
            uint8_backgrounds=False):
    segments = [painted_segment(h, w, i + 1)
                for i, (h, w) in enumerate([(20, 34), (26, 26), (16, 30), (30, 18)])]
    for s in segments:
        s["source_size"] = size  # native scale 1: small items on a large canvas stay small
        if uint8:  # as the segment bank stores them
            s["image"] = (s["image"].clamp(0, 1) * 255).round().to(torch.uint8)
    backgrounds = [{"image": coordinate_image(size, code=c)} for c in (0.7, 0.8, 0.9)]
    if uint8_backgrounds:  # as SIXray's 8-bit JPEGs arrive (keep_uint8)
        for b in backgrounds:
            b["image"] = (b["image"] * 255).round().to(torch.uint8)
    return CutPastePairs(mode=mode, k=k, blend=blend, scale_range=(1.0, 1.8),
                         same_background=None if mode == "insloc" else 0.5, image_size=size,
                         segments=segments, backgrounds=backgrounds, num_pairs=32,
                         device_composite=device_composite)


def both(index, **options):
    """(reference PairSample, device-composited SourceBatch of one) from the same draws."""
    torch.manual_seed(1000 + index)
    reference = builder(False, **options)[index]
    torch.manual_seed(1000 + index)
    deferred = builder(True, **options)[index]
    assert deferred.paste is not None and deferred.base_grid is None
    return reference, composite_pastes(collate_pairs([deferred]))


@pytest.mark.parametrize("options", [
    {"blend": "alpha"}, {"blend": "transmission", "uint8": True}, {"mode": "insloc"},
    # a canvas large against the items: the stage works in paste windows, not the canvas
    {"size": 192}, {"size": 192, "blend": "transmission", "uint8_backgrounds": True}])
def test_same_pairs_as_the_host_builder(options):
    size = options.get("size", SIZE)
    if size > SIZE:  # the windowed path is really taken
        torch.manual_seed(1000)
        plan = collate_pairs([builder(True, **options)[0]]).paste
        assert plan.window_a[0] * plan.window_a[1] < 0.5 * size * size
    pixels = disagree_valid = disagree_class = kept = 0
    for i in range(12):
        ref, dev = both(i, **options)
        torch.testing.assert_close(dev.source_a[0], ref.source_a, atol=2e-3, rtol=0)
        torch.testing.assert_close(dev.source_b[0], ref.source_b, atol=2e-3, rtol=0)
        both_valid = ref.base_valid & dev.base_valid[0]
        # same map where both say valid (float32 vs float64 matrices)
        assert (dev.base_grid[0] - ref.base_grid)[both_valid].abs().max() < 1e-3
        # validity and classes may differ only where interpolation sits on a threshold
        pixels += size * size
        disagree_valid += int((ref.base_valid != dev.base_valid[0]).sum())
        disagree_class += int((ref.class_map_a != dev.class_map_a[0]).sum())
        # boxes: the instances kept and their boxes (COCO edges) agree
        keep = dev.box_valid
        assert dev.instance_ids[keep].tolist() == ref.instance_ids.tolist()
        assert dev.box_label[keep].tolist() == ref.labels.tolist()
        torch.testing.assert_close(dev.boxes_a[keep], ref.boxes_a, atol=1.0, rtol=0)
        torch.testing.assert_close(dev.boxes_b[keep], ref.boxes_b, atol=1.0, rtol=0)
        kept += int(keep.sum())
    assert disagree_valid <= 0.002 * pixels and disagree_class <= 0.002 * pixels
    assert kept >= 6


def test_paste_windows_hold_every_footprint():
    """Every pixel a paste covers (the host builder's cv2 warp of its mask, alpha > 0) lies in
    that paste's window, and windows stay inside the source; one paste hangs over a corner.
    A paste larger than the source makes the window the source."""
    size = 192
    pairs = builder(True, size=size, k=3)
    torch.manual_seed(3)
    samples = [pairs[i] for i in range(8)]
    for sample in samples:  # full rectangles: the footprint reaches the crop's corners
        sample.paste.masks = [torch.ones_like(m) for m in sample.paste.masks]
    samples[0].paste.matrix_a[0] = torch.from_numpy(paste_matrix(20, 34, 1.5, 0.3, 2.0, 190.0))
    paste = collate_pairs(samples).paste
    for view, matrix, origin, window in (("a", "matrix_a", paste.origin_a, paste.window_a),
                                         ("b", "matrix_b", paste.origin_b, paste.window_b)):
        assert window[0] * window[1] < 0.5 * size * size, view  # windows, not the source
        for b, sample in enumerate(samples):
            for j, mask in enumerate(sample.paste.masks):
                m = getattr(sample.paste, matrix)[j].numpy()
                _, alpha = CutPastePairs._warp({"image": torch.zeros(1, *mask.shape),
                                                "mask": mask}, m, size)
                ys, xs = (alpha > 0).nonzero()
                x0, y0 = origin[b, j].tolist()
                assert 0 <= x0 <= size - window[1] and 0 <= y0 <= size - window[0], view
                assert xs.min() >= x0 and xs.max() < x0 + window[1], (view, b, j)
                assert ys.min() >= y0 and ys.max() < y0 + window[0], (view, b, j)
    samples[1].paste.matrix_b[1] = torch.from_numpy(paste_matrix(26, 26, 12.0, 0.0, 96.0, 96.0))
    paste = collate_pairs(samples).paste
    assert paste.window_b == (size, size) and int(paste.origin_b.abs().sum()) == 0


def test_device_pairs_correspond_by_colour():
    """Without the reference: valid pixels of A show the colour B shows at base_grid, pixels
    whose instance is covered in B are invalid, and other bags never correspond."""
    torch.manual_seed(5)
    build = builder(True)
    batch = composite_pastes(collate_pairs([build[i] for i in range(16)]))
    seen_b = sample_at(batch.source_b, batch.base_grid)
    diff = (batch.source_a - seen_b).abs().amax(1)
    valid = batch.base_valid
    assert valid.sum() > 10000 and (diff[valid] < 1e-3).all()
    different_bag = torch.tensor([not m["same_background"] for m in batch.meta])
    assert not (valid & (batch.class_map_a < 0) & different_bag[:, None, None]).any()
    # the class map shows the code painted into each segment (0.1 × label) where it is solid
    solid = valid & (batch.class_map_a > 0)
    assert ((batch.source_a[:, 2] / 0.1).round().long()[solid] == batch.class_map_a[solid]).all()


def test_colours_agree_after_augmentation():
    torch.manual_seed(6)
    build = builder(True)
    view = 48
    aug = ViewAugmentation(3, view_size=view, grid_stride=4, photometry=None, mean=0.0, std=1.0,
                           geometry=dict(crop_scale=(0.3, 1.0), hflip=0.5, vflip=0.5,
                                         rotation_degrees=30, rotation_p=1.0))
    pair = aug(collate_pairs([build[i] for i in range(16)]))
    colour_a, agree = painted_colours_agree(pair, view)
    valid = pair.valid_ab
    assert valid.sum() > 300 and agree[valid].float().mean() >= 0.99
    on_instance = valid & (pair.class_map_a > 0)
    codes = (colour_a[:, 2] / 0.1).round().long()
    assert (codes[on_instance] == pair.class_map_a[on_instance]).float().mean() >= 0.99
    # only the instances the compositing kept reach the views, still paired row by row
    assert 0 < pair.boxes_a.shape[0] <= 16 * 3 and pair.boxes_a.shape == pair.boxes_b.shape


def test_noise_composites_on_the_host_first():
    torch.manual_seed(7)
    reference = builder(False)[3]
    torch.manual_seed(7)
    noisy = NoisyPairs(builder(True), kind="misregistration", amount=0.0, rate=1.0)[3]
    assert noisy.paste is None and noisy.base_grid is not None
    torch.testing.assert_close(noisy.source_a, reference.source_a, atol=2e-3, rtol=0)
    assert (noisy.base_valid != reference.base_valid).float().mean() < 0.01
    assert composite_sample(reference) is reference  # nothing deferred, nothing to do


def test_bad_plans_and_mixed_batches():
    torch.manual_seed(8)
    deferred = builder(True)[0]
    with pytest.raises(PairContractError, match="mixes samples"):
        collate_pairs([deferred, builder(False)[1]])
    plan = deferred.paste
    bad = PastePlan(crops=plan.crops, masks=plan.masks, matrix_a=plan.matrix_a[:2],
                    matrix_b=plan.matrix_b, labels=plan.labels, same_background=True,
                    blend="alpha", min_visible=0.3)
    from densessl.pairs.validation import validate_pair_sample

    with pytest.raises(PairContractError, match=r"paste\.matrix_a.*\(3, 3, 3\)"):
        validate_pair_sample(PairSample(deferred.source_a, deferred.source_b, paste=bad))
    with pytest.raises(RecipeError, match="device_composite"):
        CutPastePairs(segments=[painted_segment(8, 8, 1)] * 3,
                      backgrounds=[painted_background(0.5)], image_size=SIZE,
                      device_composite="yes")


@pytest.mark.parametrize("name", ["xray_segloc", "xray_insloc", "demo"])
def test_xray_recipes_composite_on_the_device(name):
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
    assert recipe.pairs.builder == "cut_paste"
    assert recipe.pairs.options["device_composite"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_on_the_gpu():
    torch.manual_seed(9)
    build = builder(True, blend="transmission", uint8=True)
    batch = collate_pairs([build[i] for i in range(8)])
    cpu, gpu = composite_pastes(batch), composite_pastes(batch.to("cuda"))
    torch.testing.assert_close(gpu.source_a.cpu(), cpu.source_a, atol=1e-4, rtol=0)
    assert (gpu.base_valid.cpu() != cpu.base_valid).float().mean() < 0.002
    assert torch.equal(gpu.box_valid.cpu(), cpu.box_valid)
