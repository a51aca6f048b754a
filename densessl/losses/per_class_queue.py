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
from densessl.losses.queue import ring_slots


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
        """Ring index of each label (−1 → the unknown ring). An out-of-range label is an error,
        raised at once on a CPU and by an asynchronous device assert on a GPU (no host sync)."""
        labels = labels.long()
        ok = ((labels >= -1) & (labels < self.num_classes)).all()
        torch._assert_async(ok, f"PerClassQueue: class labels must be in -1..{self.num_classes - 1}"
                                f" (loss.num_classes = {self.num_classes})")
        return torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)

    @property
    def ring_labels(self) -> Tensor:
        """Label of each ring: ``0 … C−1`` then −1 for the unknown ring."""
        ring = torch.arange(self.num_classes + 1, device=self.keys.device)
        return torch.where(ring == self.num_classes, -1, ring)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor, keep: Tensor | None = None,
                same_shape: bool = False) -> None:
        """Gather ``keys`` M×D, ``labels`` M and ``keep`` M bool (default all) from every
        process, then append each kept key to its class's ring, in order, wrapping around; all
        classes at once (no loop over classes, no host sync; ``same_shape`` as
        :meth:`MoCoQueue.enqueue <densessl.losses.queue.MoCoQueue.enqueue>`).

        If a class receives more than ``K`` keys only its last ``K`` are kept, exactly as if
        they had been written one by one.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be M×{self.dim}, got {tuple(keys.shape)}")
        if labels.shape != keys.shape[:1]:
            raise ValueError(f"labels must be ({keys.shape[0]},), got {tuple(labels.shape)}")
        if keep is None:
            keep = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
        keys = gather_concat(keys.detach(), same_shape)
        keep = gather_concat(keep, same_shape)
        labels = gather_concat(labels.detach().long(), same_shape)
        ring = self.slot_of(labels).to(self.keys.device)
        if ring.numel() == 0 or self.size == 0:
            return
        source, count = ring_slots(ring, keep.to(ring.device), self.ptr, self.size)
        flat = self.keys.view(-1, self.dim)
        rows = keys.to(flat)[source.clamp_min(0)]
        # in place (the buffer stays the same tensor for DDP and .to()): every slot is
        # rewritten, untouched ones with their own value
        torch.where((source >= 0)[:, None], rows, flat, out=flat)
        self.ptr.copy_((self.ptr + count) % self.size)
        self.filled.copy_(torch.clamp(self.filled + count, max=self.size))

    def snapshot(self) -> tuple[Tensor, Tensor]:
        """Every slot of every ring, without a host sync: ``(keys (C+1)×K×D, valid (C+1)×K)``.
        A copy: the loss keeps it for backward while a later enqueue writes the buffer in
        place."""
        valid = torch.arange(self.size, device=self.keys.device)[None] < self.filled[:, None]
        return self.keys.clone(), valid

    def get(self) -> tuple[Tensor, Tensor]:
        """The written entries of every ring: ``(keys F×D, labels F)`` (−1 for the unknown
        ring), for inspection and tests (boolean selection: syncs with a GPU)."""
        keys, valid = self.snapshot()
        return keys[valid], self.ring_labels[:, None].expand_as(valid)[valid]

    @staticmethod
    def negatives_mask(query_labels: Tensor, key_labels: Tensor) -> Tensor:
        """N×F bool, True where key f may be a negative of query n: keys of another class,
        unknown keys (−1) for everyone, and every key for an unknown query."""
        q, k = query_labels.long()[:, None], key_labels.long()[None, :]
        return (q != k) | (q < 0) | (k < 0)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, size={self.size}, dim={self.dim}"
