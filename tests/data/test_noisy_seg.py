"""noisy-seg: the degree of change is exact, the files are real PNG + JSON, splits are usable."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.cli import main
from densessl.data.labeled.noisy_seg import noisy_seg_labeled
from densessl.data.noisy_seg import (
    NoisySegPairs,
    _new_object,
    change_objects,
    synthesize_noisy_seg,
)
from densessl.errors import DataError, RecipeError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthesize_noisy_seg(tmp_path_factory.mktemp("ns"), n=4, seed=0, image_size=32,
                                num_classes=4, objects=8, num_train=3, num_test=2)


def _signature(obj):
    return (obj["cls"], tuple(obj["colour"]), obj["phase"])


@pytest.mark.parametrize("count", range(9))
def test_change_events_are_exactly_count(count):
    rng = np.random.default_rng(count)
    scene = [_new_object(rng, 32, 4) for _ in range(8)]
    changed, events = change_objects(np.random.default_rng(100 + count), scene, count, 32, 4)
    # Count changes independently: match objects by place; new places are appearances.
    places_b = {(o["cx"], o["cy"]): o for o in changed}
    gone = sum((o["cx"], o["cy"]) not in places_b for o in scene)
    altered = sum((o["cx"], o["cy"]) in places_b and
                  _signature(places_b[(o["cx"], o["cy"])]) != _signature(o) for o in scene)
    appeared = len(changed) - (len(scene) - gone)
    assert gone + altered + appeared == count == len(events)
    class_changes = [e for e in events if e["event"] == "class"]
    for e in class_changes:
        assert places_b[(scene[e["object"]]["cx"], scene[e["object"]]["cy"])]["cls"] != \
            scene[e["object"]]["cls"]


def test_manifest_records_exact_degree_and_files_are_real(root):
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["levels"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for record in manifest["pairs"]:
        a = np.asarray(Image.open(root / record["a"]["image"]))
        label_a = np.asarray(Image.open(root / record["a"]["label"]))
        assert a.shape == (32, 32, 3) and label_a.max() <= 4
        for level, b in record["b"].items():
            assert b["changed_objects"] == round(float(level) * 8) == len(b["events"])
            assert b["change"] == float(level)
            img_b = np.asarray(Image.open(root / b["image"]))
            label_b = np.asarray(Image.open(root / b["label"]))
            assert b["changed_label_fraction"] == pytest.approx((label_a != label_b).mean())
            if float(level) == 0:  # no change: the same picture
                assert np.array_equal(img_b, a) and np.array_equal(label_b, label_a)
            else:
                assert not np.array_equal(img_b, a)
    assert len(manifest["train"]) == 3 and len(manifest["test"]) == 2


def test_source_and_labeled_splits(root):
    source = NoisySegPairs(path=str(root), change=0.5, image_size=32)
    item = source[1]
    assert item["image_t0"].shape == item["image_t1"].shape == (3, 32, 32)
    assert item["meta"]["changed_objects"] == 4
    with pytest.raises(RecipeError, match="not a level"):
        NoisySegPairs(path=str(root), change=0.3)
    data = noisy_seg_labeled(path=str(root), image_size=32)
    assert len(data.train) == 3 and len(data.val) == 2 and data.num_classes == 5
    sample = data.val[0]
    assert sample["mask"].shape == (32, 32) and int(sample["mask"].max()) <= 4
    assert len(sample["boxes"]) == len(sample["labels"]) > 0
    pairs_a = {source[i]["image_t0"].sum().item() for i in range(len(source))}
    assert all(data.val[i]["image"].sum().item() not in pairs_a for i in range(2))


def test_registries_and_cli(tmp_path):
    import densessl.data  # noqa: F401
    from densessl.data.labeled import EVAL_DATASETS  # densessl.data alone registers noisy-seg
    from densessl.data.registry import SOURCES, SYNTHESIZERS

    assert "noisy-seg" in SYNTHESIZERS and "noisy-seg" in SOURCES
    assert "noisy-seg" in EVAL_DATASETS
    assert main(["data", "synth", "noisy-seg", "--out", str(tmp_path / "d"), "--n", "2"]) == 0
    assert len(json.loads((tmp_path / "d" / "manifest.json").read_text())["pairs"]) == 2
    with pytest.raises(DataError, match="multiple of 1/8"):
        synthesize_noisy_seg(tmp_path / "bad", n=1, levels=(0.3,))


def test_changed_pixels_are_the_files_differences(root):
    """``changed_t0_t1`` against the PNGs read independently: exactly the pixels where the two
    dates' pictures differ, covering every pixel whose label changed; none at level 0."""
    manifest = json.loads((root / "manifest.json").read_text())
    for level in (0.0, 0.5):
        source = NoisySegPairs(path=str(root), change=level, image_size=32)
        for i, record in enumerate(manifest["pairs"]):
            b = next(v for k, v in record["b"].items() if float(k) == level)
            a_png = np.asarray(Image.open(root / record["a"]["image"]))
            b_png = np.asarray(Image.open(root / b["image"]))
            labels = [np.asarray(Image.open(root / r["label"])) for r in (record["a"], b)]
            changed = source[i]["changed_t0_t1"].numpy()
            assert np.array_equal(changed, (a_png != b_png).any(-1))
            assert not ((labels[0] != labels[1]) & ~changed).any()
            assert changed.any() == (level > 0)


def test_temporal_pairs_mark_the_changed_cells_and_noise_keeps_them(root):
    from densessl.pairs import NoisyPairs, TemporalPairs

    still = TemporalPairs(NoisySegPairs(path=str(root), change=0.0, image_size=32))[0]
    assert not still.noise_mask_a.any() and not still.noisy  # a mask, all False
    source = NoisySegPairs(path=str(root), change=0.5, image_size=32)
    torch.manual_seed(0)
    pair = TemporalPairs(source, swap_p=1.0)[2]  # either date order: one pixel grid
    assert pair.noisy and torch.equal(pair.noise_mask_a, source[2]["changed_t0_t1"])
    # injected noise on top: a mismatched pair is wrong everywhere; replaced patches add to
    # the pixels the source itself changed
    mismatched = NoisyPairs(TemporalPairs(source), "mismatch", 1.0)[2]
    assert mismatched.noise_mask_a.all()
    patched = NoisyPairs(TemporalPairs(source), "partial_change", 0.25, patch=8)[2]
    replaced = (patched.source_b != source[2]["image_t1"]).any(0)
    natural = source[2]["changed_t0_t1"]
    assert not ((natural | replaced) & ~patched.noise_mask_a).any()  # at least both
    # and no more: the patches' pixels whose donor content happens to equal the original
    assert (patched.noise_mask_a & ~natural & ~replaced).float().mean() < 0.01
