"""Per-query robust positives: objectives that allow for a positive pair being wrong.

Both forms are written from what the fused InfoNCE already has per query (see
:func:`densessl.losses.functional.weighted_info_nce`): the positive logit ``s⁺ = q·k⁺/T`` and the
log-sum-exp over the positive and every allowed negative, ``lse = log(e^{s⁺} + Σ e^{s⁻})``.

* ``rince`` — Robust InfoNCE (Chuang et al., CVPR 2022, "Robust Contrastive Learning against
  Noisy Views", arXiv 2201.04309)::

      L = −e^{q·s⁺}/q + (λ·(e^{s⁺} + Σ e^{s⁻}))^q / q
        = (expm1(q·(log λ + lse)) − expm1(q·s⁺)) / q

  The ``expm1`` form is the same number (the two ``1/q`` cancel) without the cancellation of
  two ``≈ 1/q`` terms when q is small; as q → 0 it tends to InfoNCE ``lse − s⁺`` plus the
  constant ``log λ``. With q = 1 the positive's gradient is scaled by ``e^{s⁺}``, so a positive
  the encoder finds dissimilar (a probably wrong pair) pulls less than under InfoNCE.
* ``truncate`` — loss truncation (Kang & Hashimoto, ACL 2020, "Improved Natural Language
  Generation via Loss Truncation"): the given fraction of the weighted queries whose positive
  similarity is lowest in the batch get weight 0 (their InfoNCE neither trains nor counts in
  the mean). Kang & Hashimoto drop the highest-loss examples; here the ranking is by the
  positive alone, so a query is not dropped for having hard negatives. The fraction is ramped
  in linearly over ``truncate_warmup_steps`` (their "hot start": a random encoder's
  similarities say nothing about which pairs are wrong).
* ``rank`` — the positive's rank among the query's *own* allowed negatives (issue #26): a
  query gets weight 0 when the fraction of its allowed negatives (queue and batch, the very
  logits of its InfoNCE; masked ones — same image, same-class ring, unwritten queue slots —
  never count) that are more similar to it than its positive is above ``rank_threshold``. The
  threshold is ramped in over ``truncate_warmup_steps`` from 1 (nothing dropped) down to
  ``rank_threshold``.

  Why a threshold on a relative rank rather than truncation's batch-wide similarity: a raw
  similarity (or loss) mixes "this query is hard" (a textured cell, far from everything, whose
  correct positive is far too) with "this positive is wrong"; the rank against the query's own
  negatives is scale-free and cancels the query's difficulty. A wrong positive (a cell of
  another image) is distributed like one more negative, so its rank fraction is about uniform
  on [0, 1], while a learned correct positive sits near 0: a threshold drops what looks like a
  random negative, and how many are dropped follows the noise actually present (few on clean
  data), where a fixed fraction drops ``truncate_fraction`` of the cells whatever the noise.

"Down-weighted" queries, for the ``robust_fraction`` monitor and the precision / recall against
the benchmark's true noise: ``truncate`` and ``rank`` — the dropped ones; ``rince`` — those
whose relative positive-gradient weight ``e^{q·s⁺}`` is below half its weighted batch mean
(half the pull of an average query).

Nothing here reads a tensor on the host: the truncation threshold is a rank from one sort with
a tensor count, the rank criterion a comparison of per-query counts, so shapes never depend on
data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ROBUST_KINDS = ("none", "rince", "truncate", "rank")

#: rince: a query is counted as down-weighted when its ``e^{q·s⁺}`` is below this share of the
#: weighted batch mean
RINCE_DOWN_SHARE = 0.5


@dataclass(frozen=True)
class RobustPositives:
    """Which robust form to use, with its parameters (the recipe's ``loss.robust`` section).

    Args:
        kind: ``none`` (InfoNCE), ``rince``, ``truncate`` or ``rank``.
        rince_q: RINCE's q in (0, 1]; → 0 is InfoNCE, 1 is the most robust (the paper uses
            0.1–0.5 with negatives, 1 is its "symmetric" limit).
        rince_lambda: RINCE's λ in (0, 1], the weight of the negatives' density (paper:
            0.01–0.025 for ImageNet-scale queues); 0 would be negative-free and is not offered
            (without a predictor it collapses).
        truncate_fraction: fraction in [0, 1) of weighted queries dropped once warmed up.
        truncate_warmup_steps: steps over which the dropped fraction ramps linearly from 0
            (``truncate``), or the rank threshold down from 1 (``rank``).
        rank_threshold: ``rank``: a query is dropped once more than this fraction in (0, 1) of
            its allowed negatives are more similar to it than its positive.
    """

    kind: str = "none"
    rince_q: float = 0.5
    rince_lambda: float = 0.01
    truncate_fraction: float = 0.1
    truncate_warmup_steps: int = 0
    rank_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ROBUST_KINDS:
            raise ValueError(f"robust kind must be one of {', '.join(ROBUST_KINDS)}, got "
                             f"{self.kind!r}")
        if not 0.0 < self.rince_q <= 1.0:
            raise ValueError(f"rince_q must be in (0, 1], got {self.rince_q}")
        if not 0.0 < self.rince_lambda <= 1.0:
            raise ValueError(f"rince_lambda must be in (0, 1], got {self.rince_lambda}")
        if not 0.0 <= self.truncate_fraction < 1.0:
            raise ValueError(f"truncate_fraction must be in [0, 1), got "
                             f"{self.truncate_fraction}")
        if not 0.0 < self.rank_threshold < 1.0:
            raise ValueError(f"rank_threshold must be in (0, 1), got {self.rank_threshold}")
        if self.truncate_warmup_steps < 0:
            raise ValueError(f"truncate_warmup_steps must be >= 0, got "
                             f"{self.truncate_warmup_steps}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


def rince_per_query(pos: Tensor, lse: Tensor, q: float, lam: float) -> Tensor:
    """RINCE per query from the positive logit ``pos`` (N) and the log-sum-exp over the
    positive and the negatives ``lse`` (N): ``(expm1(q·(log λ + lse)) − expm1(q·pos)) / q``."""
    return (torch.expm1(q * (lse + math.log(lam))) - torch.expm1(q * pos)) / q


def truncation_fraction_at(step: int, fraction: float, warmup_steps: int) -> float:
    """Fraction dropped at ``step`` (0-based): ``fraction · min(1, step / warmup_steps)``, the
    whole fraction from the start when ``warmup_steps`` is 0. ``step`` is the host's step
    counter (a Python int), so no device value is read."""
    if warmup_steps <= 0:
        return float(fraction)
    return float(fraction) * min(1.0, max(int(step), 0) / warmup_steps)


def rank_threshold_at(step: int, threshold: float, warmup_steps: int) -> float:
    """Rank threshold at ``step`` (0-based): ``1 − (1 − threshold) · min(1, step /
    warmup_steps)``, ``threshold`` from the start when ``warmup_steps`` is 0. At 1 nothing is
    dropped (a fraction never exceeds 1). A host int, no device read."""
    if warmup_steps <= 0:
        return float(threshold)
    return 1.0 - (1.0 - float(threshold)) * min(1.0, max(int(step), 0) / warmup_steps)


def rank_mask(above: Tensor, allowed: Tensor, weight: Tensor, threshold: float) -> Tensor:
    """True where ``above / allowed > threshold``: ``above`` (N) counts the allowed negatives
    strictly more similar to the query than its positive, ``allowed`` (N) all its allowed
    negatives. Never True where ``weight`` is 0 or a query has no allowed negative."""
    fraction = above.float() / allowed.float().clamp_min(1.0)
    return (fraction > threshold) & (allowed > 0) & (weight > 0)


def truncation_mask(pos: Tensor, weight: Tensor, fraction: float) -> Tensor:
    """True for the ``floor(fraction · n)`` queries with the lowest ``pos`` among the ``n``
    with ``weight > 0`` (ties broken by index); never True where ``weight`` is 0.

    Fixed shapes, no host read: one stable sort, each query's rank, and a tensor count.
    """
    candidate = weight > 0
    count = candidate.sum()
    drop = torch.floor(fraction * count.to(torch.float64)).to(count.dtype)
    # non-candidates sort last (+inf), so the first `count` ranks are the candidates
    key = pos.detach().float().masked_fill(~candidate, float("inf"))
    order = key.argsort(stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return (rank < drop) & candidate


def rince_down_mask(pos: Tensor, weight: Tensor, q: float) -> Tensor:
    """Queries whose relative positive-gradient weight ``e^{q·s⁺}`` is below
    :data:`RINCE_DOWN_SHARE` of its weighted mean over the batch (the ``rince`` monitor)."""
    candidate = weight > 0
    s = pos.detach().float()
    # shift by the largest candidate logit: e^{q·s} stays in range, the ratio is unchanged
    top = s.masked_fill(~candidate, float("-inf")).max() if s.numel() else s.new_zeros(())
    relative = torch.exp(q * (s - top.clamp_min(-1e4)))
    w = weight.float()
    mean = (relative * w).sum() / w.sum().clamp_min(1e-12)
    return (relative < RINCE_DOWN_SHARE * mean) & candidate


def robust_loss_terms(pos: Tensor, lse: Tensor, weight: Tensor, robust: RobustPositives,
                      step: int = 0, rank: tuple[Tensor, Tensor] | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query loss, the weights that average it, and the down-weighted queries.

    Args:
        pos: N positive logits ``s⁺``; lse: N log-sum-exps over positive and negatives.
        weight: N float, 0 for padding rows.
        robust: the form and its parameters.
        step: the training step (host int), for the truncation / rank warm-up.
        rank: ``rank`` only: ``(above N, allowed N)``, the per-query counts of allowed
            negatives more similar than the positive and of all allowed negatives.

    Returns:
        ``(per_query N, mean_weight N, down N bool)``: the loss is
        ``Σ mean_weight·per_query / max(Σ mean_weight, 1)``.
    """
    if robust.kind == "rince":
        per_query = rince_per_query(pos, lse, robust.rince_q, robust.rince_lambda)
        return per_query, weight, rince_down_mask(pos, weight, robust.rince_q)
    per_query = lse - pos
    if robust.kind == "truncate":
        fraction = truncation_fraction_at(step, robust.truncate_fraction,
                                          robust.truncate_warmup_steps)
        down = truncation_mask(pos, weight, fraction)
        return per_query, weight.masked_fill(down, 0.0), down
    if robust.kind == "rank":
        if rank is None:
            raise ValueError("robust kind rank needs the per-query negative counts (rank=)")
        threshold = rank_threshold_at(step, robust.rank_threshold, robust.truncate_warmup_steps)
        down = rank_mask(*rank, weight, threshold)
        return per_query, weight.masked_fill(down, 0.0), down
    return per_query, weight, torch.zeros_like(weight, dtype=torch.bool)
