"""Training monitors: throughput, time waiting on data, and representation collapse."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def collapse_stats(features: Tensor, groups: Tensor | None = None, mask: Tensor | None = None,
                   num_groups: int | None = None, classes: Tensor | None = None,
                   num_classes: int | None = None) -> dict[str, Tensor]:
    """Collapse monitors on N×D features (SimSiam §4.1 / lightly's std monitor).

    ``feature_std``: lightly's ``std_of_l2_normalized`` (unbiased std over the selected
    features after L2 normalisation, averaged over dims) scaled by sqrt(D) — about 1 for
    healthy features (lightly's value is about 1/sqrt(D) there), 0 when everything maps to one
    point; the collapse warning's threshold (densessl.models.health) is on this scale. NaN with
    fewer than 2 selected rows.
    ``mean_cosine``: mean cosine similarity between selected features of *different* images
    (→ 1 when collapsed). ``groups`` (N long, values in ``[0, num_groups)``, default
    ``num_groups = N``) gives each feature's image when there are several per image (dense
    cells); pairs within one image are left out. NaN when no such pair is selected.

    ``mask`` (N bool, default all): the rows that count, so the monitors can read only the
    cells an objective reads (drawn query slots of fixed count, some empty) in fixed shapes:
    no host read, and no N×N matrix (per-group sums instead).

    ``classes`` (N long in ``[0, num_classes)``, −1 unknown): with per-class queues the
    objective never pushes two cells of one class apart, so such pairs are left out of
    ``mean_cosine`` too (an unknown class pairs with everything); otherwise a healthy SegLoc
    encoder, whose cells of one class agree across images, reads as collapsed.
    """
    return collapse_stats_counted(features, groups, mask, num_groups, classes, num_classes)[0]


def collapse_stats_counted(features: Tensor, groups: Tensor | None = None,
                           mask: Tensor | None = None, num_groups: int | None = None,
                           classes: Tensor | None = None, num_classes: int | None = None
                           ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """:func:`collapse_stats` and the counts behind it: ``(stats, rows, pairs)``, the selected
    rows (``feature_std`` needs 2) and ordered pairs of selected rows of different images
    (``mean_cosine`` needs 1), as device scalars."""
    z = F.normalize(features.detach().float(), dim=1)
    n, d = z.shape
    if groups is None:
        groups, num_groups = torch.arange(n, device=z.device), n
    elif num_groups is None:
        num_groups = n
    m = z.new_ones(n) if mask is None else mask.to(z.device).float()
    rows = m.sum()
    mz = z * m[:, None]
    mean = mz.sum(0) / rows.clamp_min(1)
    var = (((z - mean) ** 2) * m[:, None]).sum(0) / (rows - 1).clamp_min(1)
    nan = z.new_tensor(float("nan"))
    std = torch.where(rows >= 2, var.sqrt().mean() * d**0.5, nan)
    # Σ over ordered pairs of different images of z_i·z_j = |Σ z|² − Σ_images |Σ_image z|²
    group_sum = z.new_zeros(num_groups, d).index_add_(0, groups.to(z.device), mz)
    group_rows = z.new_zeros(num_groups).index_add_(0, groups.to(z.device), m)
    total = mz.sum(0)
    pairs = rows * rows - (group_rows * group_rows).sum()
    cos_sum = (total * total).sum() - (group_sum * group_sum).sum()
    if classes is not None:
        # inclusion-exclusion: also drop pairs of one class (different images), i.e. subtract
        # the same-class sums and add back the same-class-and-image ones subtracted twice
        if num_classes is None:
            raise ValueError("collapse_stats: classes needs num_classes")
        classes = classes.to(z.device).long()
        known = (classes >= 0).float() * m
        cls = classes.clamp_min(0)
        both = groups.to(z.device).long() * num_classes + cls
        for index, size in ((cls, num_classes), (both, num_groups * num_classes)):
            sums = z.new_zeros(size, d).index_add_(0, index, z * known[:, None])
            counts = z.new_zeros(size).index_add_(0, index, known)
            sign = -1.0 if size == num_classes else 1.0
            pairs = pairs + sign * (counts * counts).sum()
            cos_sum = cos_sum + sign * (sums * sums).sum()
    mean_cos = torch.where(pairs > 0, cos_sum / pairs.clamp_min(1), nan)
    return {"feature_std": std, "mean_cosine": mean_cos}, rows, pairs


class CollapseMonitor(nn.Module):
    """:func:`collapse_stats` that keeps the last known values for steps where a monitor has
    nothing to read (fewer than 2 selected rows, or none from 2 different images: e.g. a batch
    whose pasted segments were all cropped away with ``background: ignore``).

    Why a fallback and not NaN: health.collapse_message counts NaN as collapse (a diverged
    encoder gives NaN features), so "nothing to read" must not look like NaN; skipping the key
    would need a host read per step. NaN features still give NaN (rows were selected).
    ``known`` says per monitor whether any training step had something to read;
    :meth:`DensePretraining.final_stats` leaves out a monitor never known (absent = unknown for
    collapse_message). Only training steps update the memory; buffers are non-persistent (the
    task saves them in its checkpoint hooks).
    """

    KEYS = ("feature_std", "mean_cosine")

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("last", torch.full((2,), float("nan")), persistent=False)
        self.register_buffer("known", torch.zeros(2, dtype=torch.bool), persistent=False)

    def forward(self, features: Tensor, groups: Tensor | None = None, mask: Tensor | None = None,
                num_groups: int | None = None, classes: Tensor | None = None,
                num_classes: int | None = None) -> dict[str, Tensor]:
        stats, rows, pairs = collapse_stats_counted(features, groups, mask, num_groups,
                                                    classes, num_classes)
        ok = torch.stack([rows >= 2, pairs > 0]).to(self.known.device)
        value = torch.stack([stats[k] for k in self.KEYS]).to(self.last)
        value = torch.where(ok, value, self.last)
        if self.training:
            self.last.copy_(value)
            self.known |= ok
        return dict(zip(self.KEYS, value.unbind()))

    def state(self) -> dict[str, list]:
        return {"last": self.last.tolist(), "known": self.known.tolist()}

    def load(self, state: dict | None) -> None:
        if state:
            self.last.copy_(torch.tensor(state["last"], dtype=self.last.dtype))
            self.known.copy_(torch.tensor(state["known"], dtype=torch.bool))


def dense_cells(dense: Tensor, step: int = 2) -> tuple[Tensor, Tensor]:
    """Every ``step``-th cell of B×D×h×w dense features as (B·cells)×D, with image indices.

    For dense objectives the cells are what must not collapse; pooled image features of one
    domain (X-ray bags, satellite tiles) are legitimately alike.
    """
    cells = dense[:, :, ::step, ::step].flatten(2)                 # B×D×L
    b, _, length = cells.shape
    groups = torch.arange(b, device=dense.device).repeat_interleave(length)
    return cells.permute(0, 2, 1).reshape(b * length, -1), groups


class PairThroughputMonitor(pl.Callback):
    """Pairs per second and the fraction of step time spent waiting for the next batch.

    (Not Lightning's ``ThroughputMonitor``, which counts samples and FLOPs, not data waits.)

    Wait time is the gap between the end of one training step and the start of the next (the
    DataLoader fetch and host→device copy), minus the device-side view augmentation, which is
    compute, timed separately by the task.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pairs = 0
        self.start_step = 0
        self.wait_s = 0.0
        self.total_s = 0.0
        self._last_end: float | None = None
        self._start: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = int(trainer.global_step)  # > 0 when resumed from a checkpoint
        self._last_end = time.perf_counter()
        self._start = self._last_end
        pl_module.augment_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.wait_s += now - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pairs += batch.batch_size
        self._last_end = time.perf_counter()
        self.total_s = self._last_end - (self._start or self._last_end)

    def summary(self, augment_seconds: float, world_size: int = 1) -> dict[str, float]:
        """Figures of this process, with pairs and pairs/s for all ``world_size`` processes."""
        wait = max(0.0, self.wait_s - augment_seconds)
        pairs = self.pairs * world_size
        return {"pairs": pairs, "world_size": world_size, "train_seconds": round(self.total_s, 3),
                "pairs_per_s": round(pairs / self.total_s, 3) if self.total_s else 0.0,
                "data_wait_fraction": round(wait / self.total_s, 4) if self.total_s else 0.0}


#: bins of the rank criterion's score in [0, 1] for dense_robust_rank_auroc
RANK_BINS = 50


def rank_separation(hist: torch.Tensor, sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """How well a score separates wrong from clean query cells, from run histograms.

    Args:
        hist: 2×bins counts of the score's bins (row 0: wrong cells, row 1: clean cells).
        sums: 2 sums of the (unbinned) scores of the wrong and of the clean cells.

    Returns:
        ``dense_robust_rank_wrong`` / ``_clean`` (mean scores) and ``dense_robust_rank_auroc``:
        P(a wrong cell's bin > a clean cell's bin) + ½ P(same bin), the Mann-Whitney AUROC of
        the binned score; NaN without wrong or without clean cells. Tensor ops only (no host
        read), so it can be logged every step.
    """
    wrong, clean = hist[0].float(), hist[1].float()
    n_wrong, n_clean = wrong.sum(), clean.sum()
    below = torch.cumsum(clean, 0) - clean  # clean cells in strictly lower bins
    auroc = (wrong * (below + 0.5 * clean)).sum() / (n_wrong * n_clean)
    return {"dense_robust_rank_wrong": sums[0] / n_wrong,
            "dense_robust_rank_clean": sums[1] / n_clean,
            "dense_robust_rank_auroc": auroc}
