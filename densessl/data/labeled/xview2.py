"""The xView2 challenge score, defined as the official scorer (DIUx-xView/xView2_scoring) does.

Per image, with ``loc_*`` building maps (> 0 = building) and ``damage_*`` maps (1 no-damage,
2 minor, 3 major, 4 destroyed, 0 background):

* localization: TP / FN / FP of the binarized prediction against the binarized target;
* damage: the predicted damage is zeroed where the localization prediction has no building
  (``damage_pred · [loc_pred > 0]``), then only pixels where the *damage target* has a building
  are scored; per class c in 1..4, TP / FN / FP of ``pred == c`` against ``target == c``.
  Like the official scorer, an image contributes to class c only if c occurs in its scored
  target pixels (its false positives of an absent class are not counted).

Counts are summed over the dataset; F1 is 0 when TP is 0; the damage F1 is the harmonic mean
``4 / Σ (f1_c + 1e-6)⁻¹``; the score is ``0.3 · loc F1 + 0.7 · damage F1``.

``ignore_index`` (default None, as the official scorer) drops target pixels with that value,
e.g. 255 for un-classified buildings rasterized by :class:`densessl.data.xbd.XBDDataset`.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

DAMAGE_CLASSES = ("no_damage", "minor_damage", "major_damage", "destroyed")


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def tp_fn_fp(pred: np.ndarray, target: np.ndarray, c: int) -> np.ndarray:
    """[TP, FN, FP] of class ``c`` (int64 array of 3)."""
    p, t = pred == c, target == c
    return np.array([(p & t).sum(), (~p & t).sum(), (p & ~t).sum()], dtype=np.int64)


def image_counts(loc_pred, damage_pred, loc_target, damage_target,
                 ignore_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Counts of one image (or a batch, any shape): localization ``[TP, FN, FP]`` and damage
    ``4×3`` (rows: classes 1..4; a class absent from the scored target gives a zero row)."""
    loc_pred, damage_pred = _numpy(loc_pred), _numpy(damage_pred)
    loc_target, damage_target = _numpy(loc_target), _numpy(damage_target)
    keep_loc = np.ones(loc_target.shape, bool)
    keep_dmg = np.ones(damage_target.shape, bool)
    if ignore_index is not None:
        keep_loc &= loc_target != ignore_index
        keep_dmg &= damage_target != ignore_index
    loc = tp_fn_fp((loc_pred > 0)[keep_loc], (loc_target > 0)[keep_loc], True)
    credited = np.where(loc_pred > 0, damage_pred, 0)  # damage only counts where localized
    scored = keep_dmg & (damage_target > 0)
    pred, target = credited[scored], damage_target[scored]
    present = set(np.unique(target).tolist())
    damage = np.stack([tp_fn_fp(pred, target, c) if c in present else np.zeros(3, np.int64)
                       for c in range(1, 5)])
    return loc, damage


def f1_from_counts(tp: int, fn: int, fp: int) -> float:
    """F1 as the official scorer computes it: 0 when TP (hence precision or recall) is 0."""
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def harmonic_mean(values, eps: float = 1e-6) -> float:
    """``n / Σ (x + eps)⁻¹`` (the official damage-F1 aggregation)."""
    values = list(values)
    return len(values) / sum(1.0 / (v + eps) for v in values)


def score_from_counts(loc: np.ndarray, damage: np.ndarray) -> dict[str, float]:
    """Score dict from dataset-summed counts (``loc`` [TP, FN, FP], ``damage`` 4×3)."""
    loc_f1 = f1_from_counts(*loc.tolist())
    f1s = [f1_from_counts(*row.tolist()) for row in damage]
    damage_f1 = harmonic_mean(f1s)
    result = {"score": 0.3 * loc_f1 + 0.7 * damage_f1, "localization_f1": loc_f1,
              "damage_f1": damage_f1}
    result.update({f"damage_f1_{name}": f for name, f in zip(DAMAGE_CLASSES, f1s)})
    return result


def xview2_score(loc_preds, damage_preds, loc_targets, damage_targets,
                 ignore_index: int | None = None) -> dict[str, float]:
    """The score over sequences of per-image maps (counts summed before any F1)."""
    metric = XView2Score(ignore_index)
    for args in zip(loc_preds, damage_preds, loc_targets, damage_targets):
        metric.update(*args)
    return metric.compute()


class XView2Score(Metric):
    """Accumulates xView2 counts image by image; :meth:`compute` gives the score dict.

    The states are the dataset-summed counts (``loc`` [TP, FN, FP], ``damage`` 4×3), so DDP's
    sum of every process's counts gives the score of the whole split.

    ``update`` takes one image (H×W) or a batch (B×H×W) of numpy arrays or tensors. Pass
    ``loc_target=None`` to use ``damage_target > 0`` (xBD's pre/post footprints coincide;
    un-classified buildings stay buildings for localization).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, ignore_index: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("loc", torch.zeros(3, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("damage", torch.zeros(4, 3, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loc_pred, damage_pred, loc_target, damage_target) -> None:
        damage_target = _numpy(damage_target)
        if loc_target is None:  # un-classified (ignored for damage) still is a building
            loc_target = damage_target > 0
        loc_pred, damage_pred, loc_target = (_numpy(loc_pred), _numpy(damage_pred),
                                             _numpy(loc_target))
        if loc_pred.ndim == 2:
            loc_pred, damage_pred = loc_pred[None], damage_pred[None]
            loc_target, damage_target = loc_target[None], damage_target[None]
        loc_sum, damage_sum = np.zeros(3, np.int64), np.zeros((4, 3), np.int64)
        for i in range(loc_pred.shape[0]):  # the presence rule is per image
            loc, damage = image_counts(loc_pred[i], damage_pred[i], loc_target[i],
                                       damage_target[i], self.ignore_index)
            loc_sum += loc
            damage_sum += damage
        self.loc += torch.from_numpy(loc_sum).to(self.loc.device)
        self.damage += torch.from_numpy(damage_sum).to(self.damage.device)

    def compute(self) -> dict[str, float]:
        return score_from_counts(self.loc.cpu().numpy(), self.damage.cpu().numpy())
