"""COCO box AP / AR as fine-tuning reports them (densessl.eval.metrics.DetectionMetrics) against
pycocotools' COCOeval run directly on the same predictions, on fixtures whose answer is known
by hand: perfect boxes, boxes shifted so that every IoU lies strictly between two of COCO's
thresholds (0.50, 0.55, ..., 0.95), and a mixed set with misses, duplicates and two classes."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from densessl.eval.metrics import DetectionMetrics

#: (DetectionMetrics key, index into COCOeval.stats)
STATS = {"box_mAP": 0, "box_AP50": 1, "box_AP75": 2, "box_AR100": 8}


def _gt(seed: int = 0, images: int = 4) -> list[dict]:
    """Per image: 2..3 disjoint boxes (20..40 px wide, 16..30 px high) with classes 1 and 2."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(images):
        boxes, labels = [], []
        for k in range(int(rng.integers(2, 4))):
            w, h = float(rng.integers(20, 41)), float(rng.integers(16, 31))
            x0, y0 = 5.0 + 60.0 * k, float(rng.integers(5, 40))  # columns never overlap
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(1 + k % 2)
        out.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)})
    return out


def _shifted(targets: list[dict], fraction: float) -> list[dict]:
    """Every target box moved right by ``fraction`` of its own width, one detection each."""
    preds = []
    for t in targets:
        boxes = t["boxes"].clone()
        shift = (boxes[:, 2] - boxes[:, 0]) * fraction
        boxes[:, 0] += shift
        boxes[:, 2] += shift
        preds.append({"boxes": boxes, "labels": t["labels"].clone(),
                      "scores": torch.linspace(0.9, 0.5, len(boxes))})
    return preds


def _ours(preds: list[dict], targets: list[dict]) -> dict[str, float]:
    metric = DetectionMetrics()
    metric.update(preds, targets)
    return metric.compute()


def _cocoeval(preds: list[dict], targets: list[dict]) -> np.ndarray:
    """COCOeval(bbox) on a COCO ground-truth dict and a detections list built here."""
    images, anns, dets = [], [], []
    for image_id, (p, t) in enumerate(zip(preds, targets), start=1):
        images.append({"id": image_id, "width": 256, "height": 256})
        for (x0, y0, x1, y1), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": label,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "iscrowd": 0})
        for (x0, y0, x1, y1), label, score in zip(p["boxes"].tolist(), p["labels"].tolist(),
                                                   p["scores"].tolist()):
            dets.append({"image_id": image_id, "category_id": label,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def _check_against_cocoeval(preds, targets) -> dict[str, float]:
    ours, stats = _ours(preds, targets), _cocoeval(preds, targets)
    for key, index in STATS.items():
        assert ours[key] == pytest.approx(float(stats[index]), abs=1e-6), key  # float32
    return ours


@pytest.mark.parametrize("fraction, expected", [
    # IoU 1: a match at every threshold
    (0.0, {"box_mAP": 1.0, "box_AP50": 1.0, "box_AP75": 1.0, "box_AR100": 1.0}),
    # a fifth of the width: IoU (4/5) / (6/5) = 2/3, a match at 0.50, 0.55, 0.60, 0.65 (4 of 10)
    (0.2, {"box_mAP": 0.4, "box_AP50": 1.0, "box_AP75": 0.0, "box_AR100": 0.4}),
    # half the width: IoU (1/2) / (3/2) = 1/3, below every threshold
    (0.5, {"box_mAP": 0.0, "box_AP50": 0.0, "box_AP75": 0.0, "box_AR100": 0.0}),
], ids=["perfect", "fifth_width_iou_2_3", "half_width_iou_1_3"])
def test_known_ious_give_known_ap_and_match_cocoeval(fraction, expected):
    targets = _gt()
    ours = _check_against_cocoeval(_shifted(targets, fraction), targets)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_a_mixed_set_matches_cocoeval():
    """Misses, low-scored duplicates, wrong-class and background detections, IoUs spread over
    the thresholds: whatever the value, it is COCOeval's."""
    rng = np.random.default_rng(3)
    targets = _gt(seed=1, images=6)
    preds = []
    for t in targets:
        boxes, labels, scores = [], [], []
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            if rng.random() < 0.2:  # missed
                continue
            jitter = rng.uniform(-4, 4, 4)
            boxes.append([b + j for b, j in zip(box, jitter)])
            labels.append(label)
            scores.append(float(rng.uniform(0.3, 1.0)))
            if rng.random() < 0.3:  # a duplicate, scored lower
                boxes.append([b + 2 for b in box])
                labels.append(label)
                scores.append(scores[-1] * 0.5)
            if rng.random() < 0.3:  # the other class on the same object
                boxes.append(box)
                labels.append(3 - label)
                scores.append(float(rng.uniform(0.1, 0.9)))
        boxes.append([200.0, 200.0, 230.0, 225.0])  # on background
        labels.append(1)
        scores.append(float(rng.uniform(0.1, 0.9)))
        preds.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels),
                      "scores": torch.tensor(scores)})
    ours = _check_against_cocoeval(preds, targets)
    assert 0.0 < ours["box_mAP"] < ours["box_AP50"] < 1.0  # a case that is not trivial
