"""The eval metrics are torchmetrics ``Metric``s whose states merge as DDP's sync would: a
split scored by two instances and merged equals one instance over everything, and both equal
references computed here pixel by pixel."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.utilities.data import dim_zero_sum

from densessl.data.labeled.xbd import DamageXView2
from densessl.data.labeled.xview2 import XView2Score
from densessl.eval.metrics import DetectionMetrics, SegmentationMetrics

NAMES = ["bg", "a", "b", "c", "never"]  # "never" occurs in no prediction and no target


def _seg_batches(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        target = torch.randint(0, 4, (2, 7, 5), generator=gen)
        target[torch.rand(target.shape, generator=gen) < 0.1] = 255
        pred = torch.where(torch.rand(target.shape, generator=gen) < 0.6, target.clamp(max=3),
                           torch.randint(0, 4, target.shape, generator=gen))
        out.append((pred, target))
    return out


def _iou_by_pixel_loop(batches, k, ignore=255):
    """IoU per class from a confusion matrix filled one pixel at a time."""
    cm = np.zeros((k, k), np.int64)
    for pred, target in batches:
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
            if t != ignore:
                cm[t, p] += 1
    ious = []
    for c in range(k):
        tp, fn, fp = cm[c, c], cm[c].sum() - cm[c, c], cm[:, c].sum() - cm[c, c]
        ious.append(tp / (tp + fn + fp) if tp + fn + fp else math.nan)
    return ious


def test_segmentation_states_are_sums_and_merge_like_one_pass():
    batches = _seg_batches()
    whole, first, second = (SegmentationMetrics(NAMES) for _ in range(3))
    for i, (pred, target) in enumerate(batches):
        whole.update(pred, target)
        (first if i % 2 else second).update(pred, target)
    assert all(fx is dim_zero_sum for fx in whole._reductions.values())
    summed = first.confmat + second.confmat  # what DDP's all-reduce sum hands every process
    first.merge_state(second)
    assert torch.equal(first.confmat, whole.confmat) and torch.equal(summed, whole.confmat)

    merged, out = first.compute(), whole.compute()
    reference = _iou_by_pixel_loop(batches, len(NAMES))
    for name, ref in zip(NAMES, reference):
        for got in (merged, out):
            assert (math.isnan(got[f"IoU_{name}"]) if math.isnan(ref)
                    else got[f"IoU_{name}"] == pytest.approx(ref))
    assert math.isnan(out["IoU_never"])
    assert out["mIoU"] == pytest.approx(np.nanmean(reference))
    assert out["fg_mIoU"] == pytest.approx(np.nanmean(reference[1:]))
    assert merged == pytest.approx(out, nan_ok=True)

    # torchmetrics' own Jaccard index agrees (absent class: NaN there too)
    jaccard = MulticlassJaccardIndex(len(NAMES), average="none", ignore_index=255,
                                     zero_division=float("nan"))
    for pred, target in batches:
        jaccard.update(pred, target)
    assert [out[f"IoU_{n}"] for n in NAMES] == pytest.approx(
        jaccard.compute().tolist(), nan_ok=True)


def test_segmentation_refuses_ids_outside_the_class_list():
    m = SegmentationMetrics(["bg", "a"])
    with pytest.raises(ValueError, match=r"class ids must lie in 0..1.*targets 0..2"):
        m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 2]]))


def _xview_images(seed=0, n=7):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        target = rng.integers(0, 5, (6, 6)) * (rng.random((6, 6)) < 0.7)
        target[rng.random((6, 6)) < 0.05] = 255
        damage_pred = rng.integers(0, 5, (6, 6))
        loc_pred = (rng.random((6, 6)) < 0.6).astype(np.int64)
        images.append((loc_pred, damage_pred, target))
    return images


def _xview2_by_pixel_loop(images, ignore=255):
    """The official scorer's rules, restated pixel by pixel (module docstring of
    densessl.data.labeled.xview2): counts summed over images, then F1s and the harmonic mean."""
    loc = [0, 0, 0]
    dmg = [[0, 0, 0] for _ in range(4)]
    for loc_pred, damage_pred, target in images:
        present = set()
        for t in target.flatten().tolist():
            if t not in (0, ignore):
                present.add(t)
        for lp, dp, t in zip(loc_pred.flatten().tolist(), damage_pred.flatten().tolist(),
                             target.flatten().tolist()):
            built, found = t > 0, lp > 0  # the ignored class still is a building
            loc[0] += built and found
            loc[1] += built and not found
            loc[2] += found and not built
            if t in (0, ignore):
                continue
            credited = dp if found else 0
            for c in present:
                dmg[c - 1][0] += credited == c and t == c
                dmg[c - 1][1] += credited != c and t == c
                dmg[c - 1][2] += credited == c and t != c

    def f1(tp, fn, fp):
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fn + fp)

    f1s = [f1(*row) for row in dmg]
    damage_f1 = 4 / sum(1 / (f + 1e-6) for f in f1s)
    loc_f1 = f1(*loc)
    return {"localization_f1": loc_f1, "damage_f1": damage_f1,
            "score": 0.3 * loc_f1 + 0.7 * damage_f1}, loc, dmg


def test_xview2_states_are_sums_and_merge_like_one_pass():
    images = _xview_images()
    whole, first, second = (XView2Score(ignore_index=255) for _ in range(3))
    for i, (loc_pred, damage_pred, target) in enumerate(images):
        whole.update(loc_pred, damage_pred, None, target)
        (first if i < 3 else second).update(torch.from_numpy(loc_pred),
                                            torch.from_numpy(damage_pred), None,
                                            torch.from_numpy(target))
    assert all(fx is dim_zero_sum for fx in whole._reductions.values())
    first.merge_state(second)
    reference, loc, dmg = _xview2_by_pixel_loop(images)
    assert first.loc.tolist() == whole.loc.tolist() == loc
    assert first.damage.tolist() == whole.damage.tolist() == dmg
    assert reference["localization_f1"] > 0 and reference["damage_f1"] > 0
    for result in (first.compute(), whole.compute()):
        for key, value in reference.items():
            assert result[key] == pytest.approx(value, abs=1e-9)


def test_damage_segmentation_score_merges_across_processes():
    images = _xview_images(seed=3, n=4)
    preds = torch.tensor(np.stack([np.where(lp > 0, dp, 0) for lp, dp, _ in images]))
    targets = torch.tensor(np.stack([t for *_, t in images]))
    whole, first, second = DamageXView2(), DamageXView2(), DamageXView2()
    whole.update(preds, targets)
    first.update(preds[:1], targets[:1])
    second.update(preds[1:], targets[1:])
    first.merge_state(second)
    reference, _, _ = _xview2_by_pixel_loop([((p > 0).numpy(), p.numpy(), t.numpy())
                                             for p, t in zip(preds, targets)])
    merged = first.compute()
    assert merged == whole.compute()
    assert merged["xview2_score"] == pytest.approx(reference["score"], abs=1e-9)


def _boxes(seed):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(3, 2, generator=gen) * 40
    wh = 8 + torch.rand(3, 2, generator=gen) * 16
    return torch.cat([xy, xy + wh], 1)


def test_detection_states_concatenate_like_one_pass():
    samples = []
    for i in range(4):
        target_boxes = _boxes(i)
        pred_boxes = target_boxes + torch.randn(3, 4, generator=torch.Generator().manual_seed(
            10 + i)) * (2.0 + i)
        labels = torch.tensor([1, 2, 1])
        samples.append(({"boxes": pred_boxes, "labels": labels,
                         # distinct scores: COCO breaks score ties by order, and a merge
                         # puts the incoming images first
                         "scores": torch.tensor([0.9, 0.6, 0.3]) - 0.05 * i},
                        {"boxes": target_boxes, "labels": labels}))
    whole, first, second = DetectionMetrics(), DetectionMetrics(), DetectionMetrics()
    for i, (pred, target) in enumerate(samples):
        whole.update([pred], [target])
        (first if i < 2 else second).update([pred], [target])
    first.merge_state(second)
    merged, out = first.compute(), whole.compute()
    assert 0 < out["box_mAP"] < 1
    assert merged == pytest.approx(out)
