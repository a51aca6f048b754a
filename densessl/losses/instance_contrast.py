"""Instance-level contrast over pasted boxes (InsLoc, Yang et al. 2021), with a single or a
per-class MoCo queue (SegLoc, Halat et al. 2023)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from densessl.losses.functional import (
    pairwise_negatives,
    ring_negatives,
    weighted_info_nce,
)
from densessl.losses.per_class_queue import PerClassQueue
from densessl.losses.queue import MoCoQueue
from densessl.losses.robust import RobustPositives


class InstanceContrast(nn.Module):
    """InfoNCE between the two views' embeddings of the same instance.

    The query is the online embedding of box i in view A, its positive the momentum embedding
    of box i in view B; negatives are the queue plus the other boxes' keys of the batch. With
    ``queue="per_class"`` no negative (queued or in-batch) shares the query's class; unknown
    (−1) queries and keys are never masked.

    Args:
        dim: embedding size ``D``.
        queue_size: ``K`` (per class with ``per_class``).
        temperature: InfoNCE temperature.
        queue: ``single`` (:class:`MoCoQueue`) or ``per_class`` (:class:`PerClassQueue`).
        num_classes: class ids ``0 … num_classes − 1`` (per-class queue only).
        robust: robust positives per box (:mod:`densessl.losses.robust`: RINCE, Chuang et al.
            2022, or loss truncation, Kang & Hashimoto 2020); None = InfoNCE.

    Shapes:
        ``forward(q N×D, k N×D, labels N, update_queue, step, pair_weight N) -> (loss scalar,
        stats)``; ``k`` is enqueued with its labels after the loss, by default only in training
        mode; ``step`` (host int) ramps in the truncation; ``pair_weight`` (optional, the weight
        of the pair each box comes from) scales each box's term (see
        :func:`~densessl.losses.functional.weighted_info_nce`). With an enabled ``robust``
        the stats also hold ``robust_fraction`` (share of the boxes down-weighted).
    """

    def __init__(self, dim: int = 128, queue_size: int = 4096, temperature: float = 0.2,
                 queue: Literal["single", "per_class"] = "single", num_classes: int = 13,
                 robust: RobustPositives | None = None) -> None:
        super().__init__()
        if queue not in ("single", "per_class"):
            raise ValueError(f"queue must be 'single' or 'per_class', got {queue!r}")
        self.temperature, self.per_class = temperature, queue == "per_class"
        self.robust = robust
        self.queue = (PerClassQueue(num_classes, queue_size, dim) if self.per_class
                      else MoCoQueue(queue_size, dim))

    def forward(self, q: Tensor, k: Tensor, labels: Tensor | None = None,
                update_queue: bool | None = None, step: int = 0,
                pair_weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if q.shape != k.shape or q.dim() != 2:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be N×D")
        if labels is None:
            labels = torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
        if update_queue is None:
            update_queue = self.training
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        n = q.shape[0]
        labels = labels.to(q.device).long()
        weight = q.new_ones(n, dtype=torch.float32)
        keys, valid = self.queue.snapshot()
        rings = PerClassQueue.negatives_mask(labels, self.queue.ring_labels)
        if self.per_class:
            same_class = ~PerClassQueue.negatives_mask(labels, labels)
        else:
            same_class = torch.zeros(n, n, dtype=torch.bool, device=q.device)
        not_self = ~torch.eye(n, dtype=torch.bool, device=q.device)
        terms = [ring_negatives(q, keys, valid, rings, self.temperature, weight),
                 pairwise_negatives(q, k, not_self & ~same_class, self.temperature, weight)]
        loss, stats = weighted_info_nce(q, k, terms, self.temperature, weight, self.robust, step,
                                        pair_weight)
        for per_box in ("down_weighted", "rank_fraction"):  # only the dense term is analysed
            stats.pop(per_box, None)
        stats["boxes"] = stats.pop("pairs")
        stats["queue_filled"] = self.queue.filled.sum().detach().clone()
        if update_queue:
            if self.per_class:
                self.queue.enqueue(k.detach(), labels)
            else:
                self.queue.enqueue(k.detach())
        return loss, stats


class LevelwiseInstanceContrast(nn.Module):
    """InsLoc's all-level objective: one :class:`InstanceContrast`, with its own queue, per FPN
    level; the loss is the mean over levels.

    InsLoc sums its per-level losses (``level_loss_weights`` all 1.0 in
    ``insloc_fpn_200ep.py``); the mean is that sum over ``L``, so ``loss.instance.weight`` keeps
    one meaning whichever ``roi_levels`` is chosen.

    Args:
        levels: level names, finest first (``["p2", …, "p5"]``): row l of ``q``/``k`` is level l.
        **kwargs: of :class:`InstanceContrast`, shared by the levels.

    Shapes:
        ``forward(q L×N×D, k L×N×D, labels N) -> (loss scalar, stats)``; stats: ``loss_<level>``
        per level, and ``boxes``, ``queue_filled``, ``pos_cos``, ``neg_cos`` as means over levels.
    """

    def __init__(self, levels: list[str], **kwargs) -> None:
        super().__init__()
        if not levels:
            raise ValueError("levels must name at least one FPN level")
        self.level = nn.ModuleDict({name: InstanceContrast(**kwargs) for name in levels})

    def forward(self, q: Tensor, k: Tensor, labels: Tensor | None = None,
                update_queue: bool | None = None, step: int = 0,
                pair_weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if q.shape != k.shape or q.dim() != 3 or q.shape[0] != len(self.level):
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be L×N×D "
                             f"with L = {len(self.level)} levels")
        losses, per_level = [], []
        stats: dict[str, Tensor] = {}
        for (name, contrast), q_level, k_level in zip(self.level.items(), q, k):
            loss, level_stats = contrast(q_level, k_level, labels, update_queue, step,
                                         pair_weight)
            losses.append(loss)
            per_level.append(level_stats)
            stats[f"loss_{name}"] = loss.detach()
        for key in per_level[0]:
            stats[key] = torch.stack([s[key].float() for s in per_level]).mean()
        return torch.stack(losses).mean(), stats
