"""Device-side cut-paste (``device_composite``) against the host builder, the reference.

The same draws (seeded torch RNG → the builder's generator) go through both paths: the host
builder (cv2 warps, numpy blending, ``instance_correspondence``, ``np.nonzero`` boxes) and the
batched stage (``grid_sample``, fixed-shape gathers, ``masks_to_boxes``). Sources, base
correspondence, class map and boxes must agree up to interpolation; the correspondence is also
checked by colour without the reference, before and after view augmentation.
"""

import pytest
import torch
from helpers import PAINTED_SIZE as SIZE
from helpers import coordinate_image, painted_background, painted_colours_agree, painted_segment

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
    # a canvas large against the items: each paste touches a few of the canvas's tiles
    {"size": 192}, {"size": 192, "blend": "transmission", "uint8_backgrounds": True},
    # a canvas that is not a whole number of tiles
    {"size": 100}])
def test_same_pairs_as_the_host_builder(options):
    size = options.get("size", SIZE)
    if size > SIZE:  # the tiles really are a part of the canvas
        torch.manual_seed(1000)
        plan = collate_pairs([builder(True, **options)[0]]).paste
        whole = plan.labels.shape[1] * (-(-size // plan.tile)) ** 2
        assert 0 < len(plan.tiles_a) < 0.5 * whole and 0 < len(plan.tiles_b) < 0.5 * whole
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


def test_paste_tiles_hold_every_footprint():
    """Every pixel a paste covers (the host builder's cv2 warp of its mask, alpha > 0) lies in
    one of that paste's tiles; tiles are listed in paste order, once per paste, and inside the
    source; one paste hangs over a corner, one lies wholly outside (no tiles)."""
    size = 200  # not a whole number of tiles
    pairs = builder(True, size=size, k=3)
    torch.manual_seed(3)
    samples = [pairs[i] for i in range(8)]
    for sample in samples:  # full rectangles: the footprint reaches the crop's corners
        sample.paste.masks = [torch.ones_like(m) for m in sample.paste.masks]
    samples[0].paste.matrix_a[0] = torch.from_numpy(paste_matrix(20, 34, 1.5, 0.3, 2.0, 198.0))
    samples[1].paste.matrix_b[2] = torch.from_numpy(paste_matrix(20, 34, 1.0, 0.0, 400.0, 50.0))
    paste = collate_pairs(samples).paste
    t, k = paste.tile, 3
    per_side = -(-size // t)
    for view, matrix, tiles, rounds in (("a", "matrix_a", paste.tiles_a, paste.rounds_a),
                                        ("b", "matrix_b", paste.tiles_b, paste.rounds_b)):
        assert len(rounds) == k + 1 and rounds[0] == 0 and rounds[-1] == len(tiles)
        assert tiles[:, 0].min() >= 0 and tiles[:, 0].max() < len(samples) * per_side ** 2
        for j in range(k):  # round j holds paste j's tiles, none twice
            part = tiles[rounds[j]:rounds[j + 1]]
            assert (part[:, 1] % k == j).all(), view
            assert len(set(part[:, 0].tolist())) == len(part), view
        for b, sample in enumerate(samples):
            for j, mask in enumerate(sample.paste.masks):
                m = getattr(sample.paste, matrix)[j].numpy()
                _, alpha = CutPastePairs._warp({"image": torch.zeros(1, *mask.shape),
                                                "mask": mask}, m, size)
                ys, xs = (alpha > 0).nonzero()
                mine = tiles[tiles[:, 1] == b * k + j, 0] - b * per_side ** 2
                listed = {(int(i) // per_side, int(i) % per_side) for i in mine}
                covered = {(int(y) // t, int(x) // t) for y, x in zip(ys, xs)}
                assert covered <= listed, (view, b, j)
                if (view, b, j) == ("a", 0, 0):  # over the bottom-left corner
                    assert xs.min() == 0 and ys.max() == size - 1
                    assert (per_side - 1, 0) in listed
                if (view, b, j) == ("b", 1, 2):
                    assert not covered and not listed


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


def test_a_larger_source_b_corresponds_by_colour():
    """Source B larger than A (the same bag, more of it, in a size that is not a whole number
    of tiles): the bag still maps to itself and instances to their pastes; B's extra rows and
    columns never correspond."""
    torch.manual_seed(7)
    build = builder(True)
    samples = [build[i] for i in range(8)]
    for sample in samples:
        wide = torch.full((3, SIZE + 21, SIZE + 9), 0.05, dtype=sample.source_b.dtype)
        wide[:, :SIZE, :SIZE] = sample.source_b
        sample.source_b = wide
        sample.valid_b = None
    batch = composite_pastes(collate_pairs(samples))
    assert batch.source_b.shape[-2:] == (SIZE + 21, SIZE + 9)
    seen_b = sample_at(batch.source_b, batch.base_grid)
    diff = (batch.source_a - seen_b).abs().amax(1)
    valid = batch.base_valid
    assert valid.sum() > 3000 and (diff[valid] < 1e-3).all()
    same = torch.tensor([m["same_background"] for m in batch.meta])
    bag = valid & (batch.class_map_a < 0)
    assert (bag & same[:, None, None]).any() and not (bag & ~same[:, None, None]).any()
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    own = torch.stack([xs, ys], -1).float().expand_as(batch.base_grid)
    assert torch.equal(batch.base_grid[bag], own[bag])  # the bag maps to itself


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

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / f"{name}.yaml")
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


def test_reads_only_against_a_loop():
    """One gather from the four read planes against a loop over the pixels each bilinear read
    gives weight to: integer positions (one pixel, or two along one axis), fractions, points
    on and past the edges."""
    from densessl.pairs.device_paste import _read_planes, _reads_only

    g = torch.Generator().manual_seed(0)
    batch, height, width = 2, 7, 9
    labels = torch.randint(1, 3, (batch, height, width), generator=g, dtype=torch.uint8)
    labels[:, 2:5, 3:7] = 1  # a block, so some reads do pass
    xy = torch.rand(batch, 400, 2, generator=g) * torch.tensor([width + 1.0, height + 1.0]) - 1
    xy[:, :150] = xy[:, :150].round()  # integers: one pixel (or two, or four) read
    xy[:, 150:200, 0] = xy[:, 150:200, 0].round()  # integer x only
    xy[:, 200:220] = torch.tensor([[float(width - 1), 3.0], [-0.5, 2.0], [4.0, float(height)],
                                   [1e9, 3.0]]).repeat(5, 1)
    planes = _read_planes(labels)
    image_of = torch.arange(batch)
    for want in (1, 2):
        got = _reads_only(planes, (height, width), batch, xy, image_of, want)
        for b in range(batch):
            for n, (x, y) in enumerate(xy[b].tolist()):
                x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                touched = [(yy, xx) for yy in {y0, y0 + (y > y0)} for xx in {x0, x0 + (x > x0)}]
                expected = all(0 <= yy < height and 0 <= xx < width
                               and int(labels[b, yy, xx]) == want for yy, xx in touched)
                assert bool(got[b, n]) == expected, (b, x, y, want)


def test_atlas_cells_never_overlap():
    from densessl.pairs.collate import pack_cells

    g = torch.Generator().manual_seed(1)
    sizes = [tuple(int(v) for v in torch.randint(3, 60, (2,), generator=g)) for _ in range(40)]
    cells = pack_cells(sizes)
    canvas = torch.zeros(int((cells[:, 1] + cells[:, 3]).max()),
                         int((cells[:, 0] + cells[:, 2]).max()), dtype=torch.long)
    for (x, y, w, h), (height, width) in zip(cells.tolist(), sizes):
        assert (h, w) == (height, width) and x >= 0 and y >= 0
        canvas[y:y + h, x:x + w] += 1
    assert canvas.max() == 1
    # near square, and not much larger than the cells themselves
    assert canvas.shape[1] <= 2 * canvas.shape[0] and canvas.shape[0] <= 2 * canvas.shape[1]
    assert canvas.numel() <= 2 * sum(h * w for h, w in sizes)
