"""Pixel-level contrast over exactly corresponding cells, with a MoCo queue.

Like DenseCL (Wang et al. 2021) and PixPro (Xie et al. 2021), but positives come from the known
correspondence ``grid_ab`` of the pair (no feature matching, no distance threshold), which also
works for temporal and cut-paste pairs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from densessl.distributed import gather_concat, rank, world_size
from densessl.losses.functional import contrastive_logits, info_nce_from_logits
from densessl.losses.queue import MoCoQueue


def sample_cells(valid: Tensor, per_image: int) -> tuple[Tensor, Tensor]:
    """Pick up to ``per_image`` distinct random valid cells of each image.

    Args:
        valid: ``B×L`` bool (``L = h·w`` flattened cells).
        per_image: maximum cells per image.

    Returns:
        ``(image_index N, cell_index N)`` long tensors, ``N ≤ B·per_image``.
    """
    b, length = valid.shape
    n = min(per_image, length)
    if n <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=valid.device)
        return empty, empty
    # random scores in [0, 1) for valid cells, −1 for invalid: top-n is a uniform sample of
    # the valid ones, done for the whole batch at once
    scores = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, -1.0)
    top = scores.topk(n, dim=1)
    # sorted by cell index: when every valid cell is taken the result is deterministic, so one
    # process and several processes on the same global batch fill queues identically
    cells, order = top.indices.sort(dim=1)
    keep = top.values.gather(1, order) >= 0
    image = torch.arange(b, device=valid.device)[:, None].expand(b, n)
    return image[keep], cells[keep]


class DenseContrast(nn.Module):
    """InfoNCE between a cell of view A and the same scene point in view B.

    Args:
        dim: dense embedding size ``D``.
        queue_size: keys kept as negatives across steps.
        temperature: InfoNCE temperature.
        samples_per_image: query cells drawn per image (bounds memory: N ≤ B·samples_per_image).
        batch_negatives: also use the positives of the other images' drawn cells as negatives.
            Cells of the *same* image are masked out: neighbouring cells are near-duplicates and
            would be false negatives.
        enqueue_per_image: key cells per image pushed to the queue each training step.

    Shapes:
        ``forward(q_dense B×D×h×w, k_dense B×D×h'×w', grid_ab B×h×w×2, valid_ab B×h×w)
        -> (loss scalar, stats)``; ``q_dense`` comes from the online encoder on view A,
        ``k_dense`` from the momentum encoder on view B.
    """

    def __init__(
        self,
        dim: int = 128,
        queue_size: int = 8192,
        temperature: float = 0.2,
        samples_per_image: int = 64,
        batch_negatives: bool = True,
        enqueue_per_image: int = 16,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.temperature = temperature
        self.samples_per_image = samples_per_image
        self.batch_negatives = batch_negatives
        self.enqueue_per_image = enqueue_per_image
        self.queue = MoCoQueue(queue_size, dim)

    def forward(
        self,
        q_dense: Tensor,
        k_dense: Tensor,
        grid_ab: Tensor,
        valid_ab: Tensor,
        update_queue: bool | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss, then (by default only in training mode) enqueue key cells.

        Gradients flow into ``q_dense`` and, if it requires grad, into ``k_dense`` through the
        positives and batch negatives; queued keys are always detached.

        Returns:
            ``loss`` and detached scalar ``stats``: ``pairs`` (query cells), ``pos_cos`` (mean
            query-positive cosine), ``neg_cos`` (mean cosine to allowed negatives),
            ``queue_filled``.
        """
        b, d, h, w = q_dense.shape
        if k_dense.shape[:2] != (b, d):
            raise ValueError(f"k_dense {tuple(k_dense.shape)} does not match q_dense {(b, d)}")
        if grid_ab.shape != (b, h, w, 2) or valid_ab.shape != (b, h, w):
            raise ValueError(
                f"grid_ab {tuple(grid_ab.shape)} / valid_ab {tuple(valid_ab.shape)} must be "
                f"{(b, h, w, 2)} / {(b, h, w)} to match q_dense"
            )
        if update_queue is None:
            update_queue = self.training

        # border padding: a point inside view B but past its outermost cell centre takes the
        # edge cell's feature instead of being blended with zeros
        k_pos = F.grid_sample(
            k_dense,
            grid_ab.to(k_dense.dtype),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )
        q = F.normalize(q_dense, dim=1).flatten(2)
        k = F.normalize(k_pos, dim=1).flatten(2)
        valid = valid_ab.reshape(b, h * w).bool()

        image, cell = sample_cells(valid, self.samples_per_image)
        if image.numel() == 0:
            loss = q_dense.sum() * 0.0
            stats = self._stats(0, loss.new_zeros(()), loss.new_zeros(()))
        else:
            q_sel, k_sel = q[image, :, cell], k[image, :, cell]
            negatives, _ = self.queue.get()
            mask = torch.ones(len(image), negatives.shape[0], dtype=torch.bool, device=q.device)
            if self.batch_negatives:
                # other processes' cells too (MoCo-style gather): the negatives are those of the
                # global batch, whatever the number of processes; images get global indices
                keys_all = gather_concat(k_sel.detach()) if world_size() > 1 else k_sel
                image_all = gather_concat(image + rank() * b)
                negatives = torch.cat([negatives.to(k_sel), keys_all], dim=0)
                mask = torch.cat([mask, (image + rank() * b)[:, None] != image_all[None, :]],
                                 dim=1)
            logits = contrastive_logits(q_sel, k_sel, negatives, self.temperature, mask)
            loss = info_nce_from_logits(logits)
            with torch.no_grad():
                cos = logits.detach() * self.temperature
                neg = cos[:, 1:][mask]
                stats = self._stats(
                    len(image), cos[:, 0].mean(), neg.mean() if neg.numel() else cos.new_zeros(())
                )

        # every process enqueues (possibly nothing): the queue gathers across processes
        if update_queue:
            e_image, e_cell = sample_cells(valid, self.enqueue_per_image)
            self.queue.enqueue(k[e_image, :, e_cell].detach())
        return loss, stats

    def _stats(self, pairs: int, pos_cos: Tensor, neg_cos: Tensor) -> dict[str, Tensor]:
        return {
            "pairs": torch.tensor(pairs, device=pos_cos.device),
            "pos_cos": pos_cos.detach(),
            "neg_cos": neg_cos.detach(),
            "queue_filled": self.queue.filled.detach().clone(),
        }
