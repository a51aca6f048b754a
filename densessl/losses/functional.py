"""Pure contrastive maths (no state): InfoNCE with shared, per-query and masked negatives.

References:
    MoCo: He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning".
    DenseCL: Wang et al. 2021, "Dense Contrastive Learning for Self-Supervised Visual
        Pre-Training". PixPro: Xie et al. 2021, "Propagate Yourself".
    SegLoc: Halat et al. 2023 (security X-ray; per-class queues so no negative shares the
        query's class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.losses.robust import RobustPositives, robust_loss_terms


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


# ------------------------------------------------------------------ fused, sync-free InfoNCE
#
# The training losses below never build the N×(1+K) logits-with-mask matrix of
# :func:`contrastive_logits`: each group of negatives reduces to one log-sum-exp per query, a
# disallowed negative is pushed to ``MASKED_LOGIT`` by a bias added to the product, and nothing
# depends on a tensor's value on the host, so a GPU step never waits for the device.

#: Added to a disallowed logit: exp() of it underflows to exactly 0 in float32, so it has no
#: influence on the loss or its gradient, yet a row with nothing allowed stays finite (an
#: all ``-inf`` row would give NaN gradients).
MASKED_LOGIT = -1e4


class NegativeTerm(NamedTuple):
    """One group of negatives, reduced per query.

    ``lse``: N, ``log Σ exp(q·k/T)`` over the allowed negatives (≈ ``MASKED_LOGIT`` if none);
    ``cos_sum``, ``count``: detached sums of the allowed cosines and their number over the
    weighted queries (for the ``neg_cos`` monitor); ``rank_counts``: given the N positive
    cosines, ``(above N, allowed N)`` — per query, how many allowed negatives of this group are
    strictly more similar than the positive, and how many are allowed (``loss.robust.kind: rank``;
    called only then, so the other objectives pay nothing for it).
    """

    lse: Tensor
    cos_sum: Tensor
    count: Tensor
    rank_counts: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None


def _float32(device: torch.device):
    # 1/T amplifies bf16 rounding: the contrastive maths runs in float32 under autocast too
    return torch.autocast(device.type, enabled=False)


class _GroupedLogSumExp(torch.autograd.Function):
    """``logsumexp`` over each group of ``K`` columns of ``bias + scale · query @ keys.T``.

    Autograd's own version walks the N×M logits three more times in backward (subtract, exp,
    multiply, each into a new buffer); here backward makes one small buffer per block of rows
    and works in place. On a CPU the rows go in blocks of about 4 MB, so every pass after the
    product runs in cache: with N×M in the tens of millions (2,048 query cells × 10,000 keys)
    these passes are most of the dense objective's cost. On a GPU there is one block.
    """

    @staticmethod
    def forward(ctx, query: Tensor, keys: Tensor, bias: Tensor, scale: float,
                groups: int) -> Tensor:
        n, m = query.shape[0], keys.shape[0]
        rows = n if query.device.type != "cpu" else max(1, _CPU_BLOCK // max(m, 1))
        logits = query.new_empty(n, m)
        lse = query.new_empty(n, groups)
        bias = bias.expand(n, m)
        scaled = query * scale  # N×D: cheaper than scaling N×M logits
        for start in range(0, n, rows):
            block = slice(start, start + rows)
            # product, then the bias added in place while the block is in cache (addmm would
            # first copy the broadcast bias into the whole output)
            torch.mm(scaled[block], keys.T, out=logits[block]).add_(bias[block])
            lse[block] = logits[block].reshape(-1, groups, m // groups).logsumexp(dim=2)
        ctx.save_for_backward(query, keys, logits, lse)
        ctx.scale, ctx.groups, ctx.rows = scale, groups, rows
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        query, keys, logits, lse = ctx.saved_tensors
        n, m = logits.shape
        want_query, want_keys = ctx.needs_input_grad[:2]
        grad_query = torch.empty_like(query) if want_query else None
        grad_keys = torch.zeros_like(keys) if want_keys else None
        for start in range(0, n, ctx.rows):
            block = slice(start, start + ctx.rows)
            # d lse / d logit = softmax within the group, times the incoming gradient
            weights = logits[block].reshape(-1, ctx.groups, m // ctx.groups)
            weights = weights.sub(lse[block, :, None]).exp_().mul_(grad[block, :, None])
            weights = weights.reshape(-1, m)
            if want_query:
                torch.mm(weights, keys, out=grad_query[block]).mul_(ctx.scale)
            if want_keys:
                grad_keys.addmm_(weights.T, query[block], alpha=ctx.scale)
        return grad_query, grad_keys, None, None, None


#: elements per block of logits on a CPU (4 MB of float32: stays in cache between passes)
_CPU_BLOCK = 2**20


def _count_above(query: Tensor, keys: Tensor, pos_cos: Tensor, allowed: Tensor,
                 groups: int = 1) -> Tensor:
    """Per query and group of ``M / groups`` columns, the number of allowed keys with
    ``q·k > pos_cos``: query N×D, keys M×D, pos_cos N, allowed bool broadcastable to N×M →
    N×groups float. No autograd; on a CPU in blocks of rows like :class:`_GroupedLogSumExp`."""
    n, m = query.shape[0], keys.shape[0]
    rows = n if query.device.type != "cpu" else max(1, _CPU_BLOCK // max(m, 1))
    out = query.new_zeros(n, groups, dtype=torch.float32)
    allowed = allowed.expand(n, m)
    with torch.no_grad():
        for start in range(0, n, rows):
            block = slice(start, start + rows)
            above = (query[block] @ keys.T > pos_cos[block, None]) & allowed[block]
            out[block] = above.reshape(-1, groups, m // groups).sum(dim=2).float()
    return out


def grouped_logsumexp(query: Tensor, keys: Tensor, bias: Tensor, temperature: float,
                      groups: int = 1) -> Tensor:
    """``logsumexp`` of ``bias + query @ keys.T / T`` over each of ``groups`` equal column
    blocks: query N×D, keys M×D, bias broadcastable to N×M (``MASKED_LOGIT`` drops a key)
    → N×groups."""
    return _GroupedLogSumExp.apply(query, keys, bias, 1.0 / temperature, groups)


def ring_negatives(query: Tensor, keys: Tensor, key_valid: Tensor, ring_allowed: Tensor,
                   temperature: float, weight: Tensor) -> NegativeTerm:
    """Negatives from ``R`` rings (queues) of ``K`` keys, each ring allowed or not per query.

    Args:
        query: N×D, L2-normalised.
        keys: R×K×D, L2-normalised (one MoCo queue is ``R = 1``; per-class queues one ring per
            class).
        key_valid: R×K bool, False for slots never written.
        ring_allowed: N×R bool, False where ring r would give query n false negatives.
        temperature: ``T``.
        weight: N float, 0 for padding queries (stats only).
    """
    r, k, dim = keys.shape
    if k == 0:  # queue of size 0: nothing to add (shapes are static, no sync)
        zero = query.new_zeros((), dtype=torch.float32)
        none = query.new_zeros(query.shape[0], dtype=torch.float32)
        return NegativeTerm(query.new_full((query.shape[0],), MASKED_LOGIT,
                                           dtype=torch.float32), zero, zero,
                            lambda pos_cos: (none, none))
    with _float32(query.device):
        query, keys = query.float(), keys.float()
        bias = torch.where(key_valid, 0.0, MASKED_LOGIT).reshape(1, r * k)
        per_ring = grouped_logsumexp(query, keys.reshape(r * k, dim), bias, temperature, r)
        lse = per_ring.masked_fill(~ring_allowed, MASKED_LOGIT).logsumexp(dim=1)
        with torch.no_grad():
            # Σ over allowed (query, key) of q·k without the N×RK matrix: q · Σ_ring keys
            valid = key_valid.float()
            ring_sum = torch.einsum("rkd,rk->rd", keys, valid)
            use = ring_allowed.float() * weight[:, None]
            cos_sum = (query.detach() @ ring_sum.T * use).sum()
            count = (use * valid.sum(1)[None]).sum()
    flat_keys, flat_valid = keys.detach().reshape(r * k, dim), key_valid.reshape(1, r * k)
    query_d = query.detach()

    def rank_counts(pos_cos: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            rings = ring_allowed.float()
            above = (_count_above(query_d, flat_keys, pos_cos, flat_valid, r) * rings).sum(1)
            return above, rings @ key_valid.float().sum(1)

    return NegativeTerm(lse, cos_sum, count, rank_counts)


def pairwise_negatives(query: Tensor, keys: Tensor, allowed: Tensor, temperature: float,
                       weight: Tensor) -> NegativeTerm:
    """Negatives with a per-query mask, e.g. the other images' keys of the batch.

    Args:
        query: N×D; keys: M×D (both L2-normalised); allowed: N×M bool; weight: N float.
    """
    with _float32(query.device):
        query, keys = query.float(), keys.float()
        bias = torch.where(allowed, 0.0, MASKED_LOGIT)
        lse = grouped_logsumexp(query, keys, bias, temperature)[:, 0]
        with torch.no_grad():
            # Σ_n Σ_m use_nm q_n·k_m as Σ_n q_n · (use @ keys)_n: a product, not a mask pass
            use = allowed.float() * weight[:, None]
            cos_sum = (query.detach() * (use @ keys.detach())).sum()
            count = use.sum()
    query_d, keys_d = query.detach(), keys.detach()

    def rank_counts(pos_cos: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return (_count_above(query_d, keys_d, pos_cos, allowed)[:, 0],
                    allowed.float().sum(1))

    return NegativeTerm(lse, cos_sum, count, rank_counts)


def weighted_info_nce(query: Tensor, positive: Tensor, terms: list[NegativeTerm],
                      temperature: float, weight: Tensor | None = None,
                      robust: RobustPositives | None = None, step: int = 0,
                      pair_weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """InfoNCE from the positives and pre-reduced negative groups (MoCo eq. 1).

    Args:
        query, positive: N×D, L2-normalised; row i of ``positive`` is the positive of query i.
        terms: groups of negatives from :func:`ring_negatives` / :func:`pairwise_negatives`.
        weight: N float (default all 1): each query's share of the mean; 0 drops padding rows
            kept so shapes do not depend on data. With nothing weighted the loss is a zero
            still connected to ``query``.
        robust: optional robust positives (:mod:`densessl.losses.robust`: RINCE, loss
            truncation, or the positive's rank), built from the same positive logit and total
            log-sum-exp; ``rank`` also from each term's ``rank_counts`` (the positive's rank
            among exactly the negatives each term lets into the log-sum-exp).
        step: the training step (host int), for the truncation / rank warm-up.
        pair_weight: optional N float, a factor on each query's term that is *not* part of
            the mean's denominator: ``Σ w·p·ℓ / max(Σ w, 1)`` with ``w`` the (robust) weight
            and ``p`` this factor, so a pair with weight 0.5 pulls (and pushes) half as hard
            as a full positive whatever else is in the batch (far-in-time dates, see
            :class:`densessl.pairs.temporal.TemporalPairs`). Stats and the robust ranking
            ignore it.

    Returns:
        scalar float32 loss and detached ``stats``: ``pairs`` (Σ weight), ``pos_cos``,
        ``neg_cos`` (means over weighted queries / their allowed negatives). With an enabled
        ``robust`` also ``robust_fraction`` (share of the weight down-weighted) and
        ``down_weighted``, the one per-query entry (N bool), for callers to pop; with ``rank``
        also ``rank_fraction`` (N float, popped the same way): the share of each query's
        allowed negatives more similar to it than its positive, the score ``rank`` thresholds.
    """
    if weight is None:
        weight = query.new_ones(query.shape[0], dtype=torch.float32)
    weight = weight.float()
    with _float32(query.device):
        pos_cos = (query.float() * positive.float()).sum(dim=1)
        pos = pos_cos / temperature
        lse = torch.stack([pos, *(t.lse for t in terms)], dim=1).logsumexp(dim=1)
        total = weight.sum()
        rank = None
        if robust is not None and robust.enabled:
            if robust.kind == "rank":
                if any(t.rank_counts is None for t in terms):
                    raise ValueError("loss.robust.kind rank needs every negative term's "
                                     "rank_counts (from ring_negatives / pairwise_negatives)")
                counts = [t.rank_counts(pos_cos.detach()) for t in terms]
                zero = pos.new_zeros(pos.shape, dtype=torch.float32).detach()
                rank = (sum((c[0] for c in counts), zero), sum((c[1] for c in counts), zero))
            per_query, mean_weight, down = robust_loss_terms(pos, lse, weight, robust, step,
                                                             rank)
        else:
            per_query, mean_weight, down = lse - pos, weight, None
        scaled = mean_weight if pair_weight is None else mean_weight * pair_weight.float()
        loss = (per_query * scaled).sum() / mean_weight.sum().clamp_min(1.0)
        with torch.no_grad():
            cos_sum = sum((t.cos_sum for t in terms), pos.new_zeros(()))
            count = sum((t.count for t in terms), pos.new_zeros(()))
            stats = {"pairs": total.detach(),
                     "pos_cos": (pos.detach() * temperature * weight).sum() / total.clamp_min(1),
                     "neg_cos": cos_sum / count.clamp_min(1)}
            if down is not None:
                stats["robust_fraction"] = (down.float() * weight).sum() / total.clamp_min(1)
                stats["down_weighted"] = down
            if rank is not None:  # per query: the share of its allowed negatives above its positive
                stats["rank_fraction"] = rank[0] / rank[1].clamp_min(1)
    return loss, stats
