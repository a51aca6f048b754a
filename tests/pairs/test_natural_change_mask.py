"""noisy-seg's natural change as the robust monitors' ground truth (issue #26, item 4).

A pair of the ``noisy-seg`` source at change level d > 0 carries the pixels of source A whose
content differs in B as ``noise_mask_a`` (``noisy`` when any), through the temporal builder,
injected noise, collation and the view augmentation, so ``loss.robust.kind``'s cell precision /
recall score the criterion on the benchmark's own change. The references here are computed
from the written PNGs (a plain per-pixel loop) and from the generator's object model (which
objects the change events touched, where each is visible), never from the mask code.
"""

import json

import numpy as np
import pytest
import torch
from helpers import check_noise_mask_on_view_cells
from PIL import Image

from densessl.data.noisy_seg import (
    SHAPES,
    NoisySegPairs,
    _background,
    _new_object,
    change_objects,
    synthesize_noisy_seg,
)
from densessl.data.synthetic import shape_mask
from densessl.pairs import NoisyPairs, TemporalPairs

SIZE, OBJECTS, CLASSES, SEED = 32, 8, 4, 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthesize_noisy_seg(tmp_path_factory.mktemp("natural"), n=4, seed=SEED,
                                image_size=SIZE, num_classes=CLASSES, objects=OBJECTS,
                                levels=(0.0, 0.5), num_train=1, num_test=1)


def _png(root, rel):
    return np.asarray(Image.open(root / rel))


def _files(root, index, level):
    record = json.loads((root / "manifest.json").read_text())["pairs"][index]
    b = next(v for k, v in record["b"].items() if float(k) == level)
    return record["a"], b


def reference_from_pngs(root, index, level):
    """Per pixel: the label PNGs differ, or the RGB PNGs differ (a ``look`` change: same
    class, new colour / texture; or one object swapped for another of the same class)."""
    a, b = _files(root, index, level)
    label_a, label_b = _png(root, a["label"]), _png(root, b["label"])
    rgb_a, rgb_b = _png(root, a["image"]), _png(root, b["image"])
    out = np.zeros((SIZE, SIZE), dtype=bool)
    for y in range(SIZE):
        for x in range(SIZE):
            out[y, x] = (int(label_a[y, x]) != int(label_b[y, x])
                         or any(int(rgb_a[y, x, c]) != int(rgb_b[y, x, c]) for c in range(3)))
    return out


def reference_from_objects(index, level):
    """The generator's own account: pixels where a changed object is the topmost one in A or
    in B (the scene and the events re-drawn from the synthesizer's seeds)."""
    rng = np.random.default_rng([SEED, 0, index])
    _background(rng, SIZE)  # the same draws as the synthesizer, in the same order
    scene = [_new_object(rng, SIZE, CLASSES) for _ in range(OBJECTS)]
    count = round(level * OBJECTS)
    scene_b, events = change_objects(np.random.default_rng([SEED, 1, index, count]), scene,
                                     count, SIZE, CLASSES)
    assert len(events) == count

    def visible_changed(objects, others):
        top = np.full((SIZE, SIZE), -1)
        for j, o in enumerate(objects):
            top[shape_mask(SHAPES[o["cls"] % len(SHAPES)], SIZE, o["cx"], o["cy"], o["r"],
                           o["angle"])] = j
        changed = [not any(o == p for p in others) for o in objects]  # not in the other date
        return np.array([top[y, x] >= 0 and changed[top[y, x]]
                         for y in range(SIZE) for x in range(SIZE)]).reshape(SIZE, SIZE)

    return visible_changed(scene, scene_b) | visible_changed(scene_b, scene)


@pytest.mark.parametrize("swap_p", [0.0, 1.0])
def test_mask_is_the_changed_pixels_of_the_written_pngs(root, swap_p):
    source = NoisySegPairs(path=str(root), change=0.5, image_size=SIZE)
    builder = TemporalPairs(source, swap_p=swap_p)
    torch.manual_seed(0)
    for i in range(len(source)):
        pair = builder[i]
        want = reference_from_pngs(root, i, 0.5)
        assert want.any() and pair.noisy
        assert np.array_equal(pair.noise_mask_a.numpy(), want)  # one grid: either date order
        assert np.array_equal(want, reference_from_objects(i, 0.5))


def test_change_zero_is_clean(root):
    builder = TemporalPairs(NoisySegPairs(path=str(root), change=0.0, image_size=SIZE))
    for i in range(len(builder)):
        pair = builder[i]
        assert not reference_from_pngs(root, i, 0.0).any()
        assert pair.noise_mask_a is not None and not pair.noise_mask_a.any()
        assert not pair.noisy


def test_injected_noise_is_ored_with_the_natural_change(root):
    source = NoisySegPairs(path=str(root), change=0.5, image_size=SIZE)
    natural = torch.from_numpy(reference_from_pngs(root, 1, 0.5))
    # partial_change at rate 1: its replaced patches join the natural change
    patched = NoisyPairs(TemporalPairs(source, swap_p=0.0), "partial_change", 0.25, rate=1.0,
                         patch=8)[1]
    replaced = (patched.source_b != source[1]["image_t1"]).any(0)
    assert patched.noisy and not ((natural | replaced) & ~patched.noise_mask_a).any()
    # a clean pair the injector leaves alone keeps exactly the natural mask
    untouched = NoisyPairs(TemporalPairs(source, swap_p=0.0), "partial_change", 0.25,
                           rate=0.0)[1]
    assert torch.equal(untouched.noise_mask_a, natural) and untouched.noisy


def test_the_mask_reaches_the_view_cells(root):
    """Through collation and the view augmentation: each cell of view A is wrong exactly
    when the source-A pixel under it changed (nearest), as for partial_change."""
    from densessl.pairs import collate_pairs

    source = NoisySegPairs(path=str(root), change=0.5, image_size=SIZE)
    samples = [TemporalPairs(source, swap_p=0.5)[i] for i in range(len(source))]
    refs = [reference_from_pngs(root, i, 0.5) for i in range(len(source))]
    batch = collate_pairs(samples)
    assert batch.noisy.all() and batch.noise_mask_a.shape == (len(samples), SIZE, SIZE)
    pair, checked = check_noise_mask_on_view_cells(batch, refs, channels=3, size=SIZE)
    assert torch.equal(pair.noisy, batch.noisy)
    assert checked > 200 and pair.noise_mask_a.any() and not pair.noise_mask_a.all()


def test_no_loss_reads_the_truth():
    """Analysis only: the losses give the same values whatever ``noisy`` / ``noise_mask_a``
    say, and only the robust monitor reads them."""
    from helpers import pair_batch

    from densessl.bench.training import bench_recipe
    from densessl.methods.dense_pretraining import DensePretraining

    recipe = bench_recipe("resnet18", 64, 4, instance={"weight": 1.0, "queue_size": 8},
                          dense={"queue_size": 16}, robust={"kind": "rank"})
    results = []
    for truth in (False, True):
        torch.manual_seed(0)
        batch = pair_batch(recipe, torch.device("cpu"), with_instances=True)
        batch.noisy = torch.full((4,), truth)
        batch.noise_mask_a = torch.full(batch.valid_ab.shape, truth)
        torch.manual_seed(1)
        task = DensePretraining(recipe)
        torch.manual_seed(2)
        total, logs = task.compute_losses(batch)
        results.append((total.detach(), {k: v for k, v in logs.items()
                                         if k.startswith("loss")}, logs))
    (t0, l0, logs0), (t1, l1, logs1) = results
    assert torch.equal(t0, t1) and l0.keys() == l1.keys()
    assert all(torch.equal(l0[k], l1[k]) for k in l0)
    # the monitors do see it: nothing is wrong in the first, everything in the second
    assert logs0["dense_robust_cell_noisy_share"].item() == 0.0
    assert logs1["dense_robust_cell_noisy_share"].item() == 1.0
