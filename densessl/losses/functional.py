"""Pure contrastive maths (no state): InfoNCE with shared, per-query and masked negatives.

References:
    MoCo: He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning".
    DenseCL: Wang et al. 2021, "Dense Contrastive Learning for Self-Supervised Visual
        Pre-Training". PixPro: Xie et al. 2021, "Propagate Yourself".
    SegLoc: Halat et al. 2023 (security X-ray; per-class queues so no negative shares the
        query's class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_logits(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    temperature: float = 0.2,
    neg_mask: Tensor | None = None,
) -> Tensor:
    """Logits ``[q·k⁺, q·k⁻₁, …, q·k⁻_K] / T`` with disallowed negatives at ``-inf``.

    Args:
        query: ``N×D``, L2-normalised.
        positive: ``N×D``, L2-normalised; row i is the positive of query i.
        negatives: ``K×D`` shared by all queries, ``N×K×D`` per query, or None (no negatives).
        temperature: softmax temperature ``T``.
        neg_mask: optional ``N×K`` bool, True = negative allowed for that query. Disallowed
            entries get ``-inf`` so they have no influence on the loss or its gradient (used to
            drop same-image cells and same-class queue entries, which would be false negatives).

    Returns:
        ``N×(1+K)`` float32 logits (computed in float32: ``1/T`` amplifies fp16 rounding).
    """
    query, positive = query.float(), positive.float()
    pos = (query * positive).sum(dim=1, keepdim=True)
    if negatives is None:
        neg = query.new_zeros((query.shape[0], 0))
    elif negatives.dim() == 2:
        neg = query @ negatives.float().T
    elif negatives.dim() == 3:
        neg = torch.einsum("nd,nkd->nk", query, negatives.float())
    else:
        raise ValueError(f"negatives must be K×D or N×K×D, got shape {tuple(negatives.shape)}")
    if neg_mask is not None:
        if neg_mask.shape != neg.shape:
            raise ValueError(f"neg_mask shape {tuple(neg_mask.shape)} != {tuple(neg.shape)}")
        neg = neg.masked_fill(~neg_mask, float("-inf"))
    return torch.cat([pos, neg], dim=1) / temperature


def info_nce(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    temperature: float = 0.2,
    neg_mask: Tensor | None = None,
) -> Tensor:
    """InfoNCE: mean over queries of ``−log softmax(logits)[0]`` (MoCo eq. 1).

    Arguments as in :func:`contrastive_logits`. With no (allowed) negatives a query contributes
    0. With ``N == 0`` returns a zero that stays connected to ``query`` so ``backward`` works.

    Returns:
        scalar float32 loss.
    """
    if query.shape[0] == 0:
        return query.float().sum() * 0.0
    return info_nce_from_logits(
        contrastive_logits(query, positive, negatives, temperature, neg_mask)
    )


def info_nce_from_logits(logits: Tensor) -> Tensor:
    """Cross-entropy with the positive in column 0, for callers that also read the logits.

    Args:
        logits: ``N×(1+K)`` from :func:`contrastive_logits`, ``N ≥ 1``.

    Returns:
        scalar loss.
    """
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)
