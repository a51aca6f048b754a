"""Per-class MoCo queues (SegLoc, Halat et al. 2023, arXiv 2310.08421) and their dense use.

A single MoCo queue holds keys of every class, so a query of class c is pushed away from other
instances of c that happen to be queued: false negatives. SegLoc keeps one queue per class and
draws a query's negatives only from the *other* classes' queues.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from densessl.distributed import gather_concat
from densessl.losses.dense_contrast import DenseContrast, sample_cells
from densessl.losses.functional import contrastive_logits, info_nce_from_logits


class PerClassQueue(nn.Module):
    """One FIFO ring of ``size`` keys per class plus a shared ring for unknown (−1) keys.

    Args:
        num_classes: labels are ``0 … num_classes − 1``; −1 means unknown (PIDray ids 1..12 →
            ``num_classes = 13``, slot 0 then stays empty unless a caller uses label 0).
        size: capacity ``K`` of each ring.
        dim: key dimension ``D``.

    Buffers (persistent, survive checkpoint / resume):
        ``keys`` (C+1)×K×D, ``ptr`` C+1 next slot per ring, ``filled`` C+1 valid entries per
        ring. Ring ``C`` (the last) is the unknown slot.

    Like :class:`~densessl.losses.queue.MoCoQueue`, only written entries are ever returned.
    """

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        if num_classes <= 0 or size < 0 or dim <= 0:
            raise ValueError(f"num_classes and dim must be positive and size >= 0 (0 = no "
                             f"queue), got {num_classes}, {size}, {dim}")
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.register_buffer("keys", F.normalize(torch.randn(num_classes + 1, size, dim), dim=2))
        self.register_buffer("ptr", torch.zeros(num_classes + 1, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(num_classes + 1, dtype=torch.long))

    def slot_of(self, labels: Tensor) -> Tensor:
        """Ring index of each label (−1 → the unknown ring); out-of-range labels are an error."""
        labels = labels.long()
        bad = (labels < -1) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(f"labels must be in -1..{self.num_classes - 1}, got "
                             f"{labels[bad][:5].tolist()}")
        return torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        """Gather ``keys`` M×D and ``labels`` M from every process, then append each key to its
        class's ring, in order, wrapping around; all classes at once (no loop over classes).

        If a class receives more than ``K`` keys only its last ``K`` are kept, exactly as if
        they had been written one by one.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be M×{self.dim}, got {tuple(keys.shape)}")
        if labels.shape != keys.shape[:1]:
            raise ValueError(f"labels must be ({keys.shape[0]},), got {tuple(labels.shape)}")
        keys = gather_concat(keys.detach())
        slot = self.slot_of(gather_concat(labels.detach().long())).to(self.keys.device)
        if slot.numel() == 0 or self.size == 0:
            return
        # rank of each row among the rows of its own class, by a cumulative one-hot count
        onehot = F.one_hot(slot, self.num_classes + 1)
        rank = (onehot.cumsum(0) - 1).gather(1, slot[:, None])[:, 0]
        count = onehot.sum(0)
        keep = rank >= (count[slot] - self.size)  # older rows would be overwritten anyway
        slot, rank, rows = slot[keep], rank[keep], keys[keep]
        position = (self.ptr[slot] + rank) % self.size
        self.keys[slot, position] = rows.to(self.keys)
        self.ptr.copy_((self.ptr + count) % self.size)
        self.filled.copy_(torch.clamp(self.filled + count, max=self.size))

    def get(self) -> tuple[Tensor, Tensor]:
        """The written entries of every ring: ``(keys F×D, labels F)`` (−1 for the unknown
        ring). Copies, so a later in-place enqueue cannot break the autograd graph."""
        ring = torch.arange(self.num_classes + 1, device=self.keys.device)
        ring_label = torch.where(ring == self.num_classes, -1, ring)
        if bool((self.filled == self.size).all()):
            # steady state: a plain copy, much cheaper than a boolean gather of (C+1)·K rows
            return (self.keys.reshape(-1, self.dim).clone(),
                    ring_label.repeat_interleave(self.size))
        written = torch.arange(self.size, device=self.keys.device)[None] < self.filled[:, None]
        return self.keys[written], ring_label[:, None].expand_as(written)[written]

    @staticmethod
    def negatives_mask(query_labels: Tensor, key_labels: Tensor) -> Tensor:
        """N×F bool, True where key f may be a negative of query n: keys of another class,
        unknown keys (−1) for everyone, and every key for an unknown query."""
        q, k = query_labels.long()[:, None], key_labels.long()[None, :]
        return (q != k) | (q < 0) | (k < 0)

    def negatives(self, query_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(keys F×D, labels F, mask N×F)`` for queries with ``query_labels`` (N).

        The mask is built per ring (N×(C+1), which rings a query may use) and then expanded
        over each ring's filled entries, instead of comparing N×F labels."""
        keys, labels = self.get()
        rings = torch.arange(self.num_classes + 1, device=labels.device)
        ring_labels = torch.where(rings == self.num_classes, -1, rings)
        allowed = self.negatives_mask(query_labels.to(labels.device), ring_labels)
        full = allowed[:, :, None].expand(-1, -1, self.size)
        if keys.shape[0] == allowed.shape[1] * self.size:  # every ring full: equal lengths
            mask = full.reshape(allowed.shape[0], -1)
        else:
            written = torch.arange(self.size, device=labels.device)[None] < self.filled[:, None]
            mask = full[:, written]
        return keys, labels, mask

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, size={self.size}, dim={self.dim}"


class PerClassDenseContrast(DenseContrast):
    """:class:`DenseContrast` with per-class queues: cell labels come from ``class_map_a``.

    A query cell of class c gets no negatives of class c, from the queue or from the other
    images' cells in the batch; the key of a cell (view B at ``grid_ab``) carries the class of
    the A cell it corresponds to. Cells of unknown class (−1, e.g. background) see everything.

    Args:
        num_classes: labels ``0 … num_classes − 1`` plus −1; the other arguments as
            :class:`DenseContrast`, with ``queue_size`` the capacity of *each* class's ring.

    Shapes:
        ``forward(q_dense B×D×h×w, k_dense B×D×h'×w', grid_ab B×h×w×2, valid_ab B×h×w,
        class_map B×h×w long or None) -> (loss, stats)``.
    """

    def __init__(self, num_classes: int, dim: int = 128, queue_size: int = 1024,
                 temperature: float = 0.2, samples_per_image: int = 64,
                 batch_negatives: bool = True, enqueue_per_image: int = 16) -> None:
        super().__init__(dim, 1, temperature, samples_per_image, batch_negatives,
                         enqueue_per_image)
        self.queue = PerClassQueue(num_classes, queue_size, dim)

    def forward(self, q_dense: Tensor, k_dense: Tensor, grid_ab: Tensor, valid_ab: Tensor,
                class_map: Tensor | None = None, update_queue: bool | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        b, d, h, w = q_dense.shape
        if grid_ab.shape != (b, h, w, 2) or valid_ab.shape != (b, h, w):
            raise ValueError(f"grid_ab {tuple(grid_ab.shape)} / valid_ab "
                             f"{tuple(valid_ab.shape)} must be {(b, h, w, 2)} / {(b, h, w)}")
        if class_map is None:
            class_map = torch.full((b, h, w), -1, dtype=torch.long, device=q_dense.device)
        if class_map.shape != (b, h, w):
            raise ValueError(f"class_map {tuple(class_map.shape)} must be {(b, h, w)}")
        if update_queue is None:
            update_queue = self.training
        k_pos = F.grid_sample(k_dense, grid_ab.to(k_dense.dtype), mode="bilinear",
                              padding_mode="border", align_corners=False)
        q = F.normalize(q_dense, dim=1).flatten(2)
        k = F.normalize(k_pos, dim=1).flatten(2)
        valid = valid_ab.reshape(b, h * w).bool()
        labels = class_map.reshape(b, h * w).long()

        image, cell = sample_cells(valid, self.samples_per_image)
        if image.numel() == 0:
            loss = q_dense.sum() * 0.0
            stats = self._stats(0, loss.new_zeros(()), loss.new_zeros(()))
        else:
            q_sel, k_sel, lab = q[image, :, cell], k[image, :, cell], labels[image, cell]
            negatives, _, mask = self.queue.negatives(lab)
            negatives = negatives.to(k_sel)
            if self.batch_negatives:
                other = (image[:, None] != image[None, :]) & self.queue.negatives_mask(lab, lab)
                negatives = torch.cat([negatives, k_sel], dim=0)
                mask = torch.cat([mask, other], dim=1)
            logits = contrastive_logits(q_sel, k_sel, negatives, self.temperature, mask)
            loss = info_nce_from_logits(logits)
            with torch.no_grad():
                cos = logits.detach() * self.temperature
                neg = cos[:, 1:][mask]
                stats = self._stats(len(image), cos[:, 0].mean(),
                                    neg.mean() if neg.numel() else cos.new_zeros(()))
        if update_queue:
            e_image, e_cell = sample_cells(valid, self.enqueue_per_image)
            self.queue.enqueue(k[e_image, :, e_cell].detach(), labels[e_image, e_cell])
        return loss, stats

    def _stats(self, pairs: int, pos_cos: Tensor, neg_cos: Tensor) -> dict[str, Tensor]:
        return {"pairs": torch.tensor(pairs, device=pos_cos.device), "pos_cos": pos_cos.detach(),
                "neg_cos": neg_cos.detach(), "queue_filled": self.queue.filled.sum().detach()}
