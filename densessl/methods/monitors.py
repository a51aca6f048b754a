"""Training monitors: throughput, time waiting on data, and representation collapse."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.utils.debug import std_of_l2_normalized
from torch import Tensor


def collapse_stats(features: Tensor, groups: Tensor | None = None) -> dict[str, Tensor]:
    """Collapse monitors on N×D features (SimSiam §4.1 / lightly's std monitor).

    ``feature_std``: lightly's ``std_of_l2_normalized`` (std over the N features after L2
    normalisation, averaged over dims) scaled by sqrt(D) — about 1 for healthy features
    (lightly's value is about 1/sqrt(D) there), 0 when everything maps to one point; the
    collapse warning's threshold (densessl.models.health) is on this scale.
    ``mean_cosine``: mean cosine similarity between features of *different* images (→ 1 when
    collapsed). ``groups`` (N) gives each feature's image when there are several per image
    (dense cells); pairs within one image are left out.
    """
    z = F.normalize(features.detach().float(), dim=1)
    n, d = z.shape
    groups = torch.arange(n, device=z.device) if groups is None else groups
    other = groups[:, None] != groups[None, :]
    if n < 2:
        nan = z.new_tensor(float("nan"))
        return {"feature_std": nan, "mean_cosine": nan}
    sim = z @ z.T
    mean_cos = (sim * other).sum() / other.sum().clamp_min(1)
    return {"feature_std": std_of_l2_normalized(z) * d**0.5, "mean_cosine": mean_cos}


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
