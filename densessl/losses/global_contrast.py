"""Image-level MoCo v2 loss (He et al. 2020; Chen et al. 2020, "Improved Baselines with MoCo")."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from densessl.losses.functional import ring_negatives, weighted_info_nce
from densessl.losses.queue import MoCoQueue


class GlobalContrast(nn.Module):
    """InfoNCE between online and momentum image embeddings, negatives from a queue.

    Args:
        dim: embedding size ``D``.
        queue_size: number of past keys kept as negatives.
        temperature: InfoNCE temperature (0.2 in MoCo v2).

    Shapes:
        ``forward(q B×D, k B×D) -> (loss scalar, stats)``; ``k`` is enqueued (detached) after
        the loss, by default only in training mode. A fresh queue has no negatives (see
        :class:`MoCoQueue`), so the very first loss is 0.
    """

    def __init__(self, dim: int = 128, queue_size: int = 4096, temperature: float = 0.2) -> None:
        super().__init__()
        self.temperature = temperature
        self.queue = MoCoQueue(queue_size, dim)

    def forward(
        self, q: Tensor, k: Tensor, update_queue: bool | None = None,
        pair_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``pair_weight`` (B float, optional) scales each image's term (see
        :func:`~densessl.losses.functional.weighted_info_nce`)."""
        if q.shape != k.shape or q.dim() != 2:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be B×D")
        if update_queue is None:
            update_queue = self.training
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        keys, valid = self.queue.snapshot()
        every_ring = torch.ones(q.shape[0], 1, dtype=torch.bool, device=q.device)
        weight = q.new_ones(q.shape[0], dtype=torch.float32)
        negatives = ring_negatives(q, keys, valid, every_ring, self.temperature, weight)
        loss, stats = weighted_info_nce(q, k, [negatives], self.temperature, weight,
                                        pair_weight=pair_weight)
        del stats["pairs"]
        stats["queue_filled"] = self.queue.filled.detach().clone()
        if update_queue:
            self.queue.enqueue(k.detach(), same_shape=True)  # equal local batches
        return loss, stats
