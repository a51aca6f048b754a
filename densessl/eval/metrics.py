"""Downstream metrics (torchmetrics): mIoU + per-class IoU; COCO box / mask AP and AR."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision


class SegmentationMetrics:
    """Accumulates a confusion over batches; ``compute()`` gives ``mIoU``, ``fg_mIoU`` (the
    mean over classes 1..K, i.e. without background, which a predict-background model scores
    0 on) and ``IoU_<class>``.

    A class absent from both predictions and targets of the whole split has no IoU (NaN, left
    out of the mean) rather than 0, so rare classes do not drag mIoU down by convention alone.

    Shapes: ``update(preds: B×H×W long, target: B×H×W long)``; ``ignore_index`` pixels skipped.
    """

    def __init__(self, class_names: list[str], ignore_index: int = 255) -> None:
        self.class_names = class_names
        self.metric = MulticlassJaccardIndex(len(class_names), average="none",
                                             ignore_index=ignore_index,
                                             zero_division=float("nan"))

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.metric.update(preds.cpu(), target.cpu())

    def compute(self) -> dict[str, float]:
        iou = self.metric.compute().float()
        out = {"mIoU": _nanmean(iou), "fg_mIoU": _nanmean(iou[1:])}
        out.update({f"IoU_{name}": float(v) for name, v in zip(self.class_names, iou)})
        return out


def _nanmean(values: Tensor) -> float:
    return float(torch.nanmean(values)) if not torch.isnan(values).all() else math.nan


_COCO_KEYS = {"map": "mAP", "map_50": "AP50", "map_75": "AP75", "mar_100": "AR100"}


class DetectionMetrics:
    """COCO AP/AR via torchmetrics' ``MeanAveragePrecision`` with the pycocotools backend.

    ``update(preds, targets)`` takes torchvision-style lists of dicts (``boxes`` N×4 xyxy,
    ``labels`` N, ``scores`` N, optional ``masks``: predictions N×1×H×W float probabilities or
    N×H×W bool; targets ``instance_masks`` N×H×W bool). ``compute()`` returns ``box_mAP``,
    ``box_AP50``, ``box_AP75``, ``box_AR100`` and, with ``masks=True``, the same as ``mask_*``.
    """

    def __init__(self, masks: bool = False) -> None:
        self.masks = masks
        iou_type = ("bbox", "segm") if masks else "bbox"
        self.metric = MeanAveragePrecision(iou_type=iou_type, backend="pycocotools")

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        p_list, t_list = [], []
        for pred, target in zip(preds, targets):
            p = {k: pred[k].detach().cpu() for k in ("boxes", "scores", "labels")}
            t = {k: target[k].cpu() for k in ("boxes", "labels")}
            if self.masks:
                m = pred["masks"].detach().cpu()
                p["masks"] = (m[:, 0] > 0.5) if m.ndim == 4 else m.bool()
                t["masks"] = target["instance_masks"].cpu().bool()
            p_list.append(p)
            t_list.append(t)
        self.metric.update(p_list, t_list)

    def compute(self) -> dict[str, float]:
        result = self.metric.compute()
        out: dict[str, float] = {}
        prefixes = [("bbox", "box")] + ([("segm", "mask")] if self.masks else [])
        for iou_type, prefix in prefixes:
            for key, name in _COCO_KEYS.items():
                # With one iou_type torchmetrics names keys "map"; with two, "bbox_map" etc.
                value = result.get(f"{iou_type}_{key}", result.get(key)) if self.masks \
                    else result[key]
                v = float(value)
                out[f"{prefix}_{name}"] = v if v >= 0 else math.nan  # -1: nothing to score
        return out
