"""Downstream metrics (torchmetrics): mIoU + per-class IoU; COCO box / mask AP and AR."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision


class SegmentationMetrics(Metric):
    """mIoU over a split: a K×K confusion matrix summed over batches (and, under DDP, over
    processes: every state is a sum, so ``sync`` adds them). ``compute()`` gives ``mIoU``,
    ``fg_mIoU`` (the mean over classes 1..K, i.e. without background, which a
    predict-background model scores 0 on) and ``IoU_<class>``.

    A class absent from both predictions and targets of the whole split has no IoU (NaN, left
    out of the mean) rather than 0, so rare classes do not drag mIoU down by convention alone.

    Shapes: ``update(preds: B×H×W long, target: B×H×W long)``; ``ignore_index`` pixels skipped.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, class_names: list[str], ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        k = len(self.class_names)
        # rows: target class, columns: predicted class
        self.add_state("confmat", torch.zeros(k, k, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        k = len(self.class_names)
        preds, target = preds.to(self.confmat.device), target.to(self.confmat.device)
        keep = target != self.ignore_index
        t, p = target[keep].long(), preds[keep].long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k or int(p.min()) < 0
                          or int(p.max()) >= k):
            raise ValueError(f"SegmentationMetrics: class ids must lie in 0..{k - 1} "
                             f"(or be ignore_index {self.ignore_index}); got targets "
                             f"{int(t.min())}..{int(t.max())}, predictions "
                             f"{int(p.min())}..{int(p.max())}")
        self.confmat += torch.bincount(t * k + p, minlength=k * k).view(k, k)

    def compute(self) -> dict[str, float]:
        cm = self.confmat.double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan).float()
        out = {"mIoU": _nanmean(iou), "fg_mIoU": _nanmean(iou[1:])}
        out.update({f"IoU_{name}": float(v) for name, v in zip(self.class_names, iou)})
        return out


def _nanmean(values: Tensor) -> float:
    return float(torch.nanmean(values)) if not torch.isnan(values).all() else math.nan


_COCO_KEYS = {"map": "mAP", "map_50": "AP50", "map_75": "AP75", "mar_100": "AR100"}


class DetectionMetrics(MeanAveragePrecision):
    """COCO AP/AR via torchmetrics' ``MeanAveragePrecision`` with the pycocotools backend.

    AP needs every detection of the split, so its states are lists that DDP concatenates
    (torchmetrics' own states, kept: a sum of counts cannot give AP).

    ``update(preds, targets)`` takes torchvision-style lists of dicts (``boxes`` N×4 xyxy,
    ``labels`` N, ``scores`` N, optional ``masks``: predictions N×1×H×W float probabilities or
    N×H×W bool; targets ``instance_masks`` N×H×W bool). ``compute()`` returns ``box_mAP``,
    ``box_AP50``, ``box_AP75``, ``box_AR100`` and, with ``masks=True``, the same as ``mask_*``.
    """

    # update only appends to the lists: the batch's value alone (forward) needs no full state,
    # and the states merge by concatenation (merge_state refuses full-state metrics)
    full_state_update = False

    def __init__(self, masks: bool = False, **kwargs) -> None:
        super().__init__(iou_type=("bbox", "segm") if masks else "bbox", backend="pycocotools",
                         **kwargs)
        self.masks = masks

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
        super().update(p_list, t_list)

    def compute(self) -> dict[str, float]:
        result = super().compute()
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
