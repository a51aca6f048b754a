"""MoCo memory queue as persistent buffers (He et al. 2020, "Momentum Contrast")."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from densessl.distributed import gather_concat


# Not lightly's MemoryBankModule: its bank is not saved in checkpoints, starts as random
# negatives, holds no class labels (per-class queues) and reads its pointer on the host (a sync).
class MoCoQueue(nn.Module):
    """A FIFO ring of ``size`` keys (and optionally their class labels).

    Buffers are persistent, so the queue survives checkpoint / resume, and move with
    ``.to(device)``. Keys are gathered from every process before being written, so all processes
    hold the same queue.

    Unlike the original MoCo, :meth:`get` returns only the entries written so far: the random
    initial keys are never used as negatives (they are noise, not data). A fresh queue thus
    yields 0 negatives and the first steps rely on in-batch negatives (or give a zero loss).

    Args:
        size: capacity ``K``.
        dim: key dimension ``D``.
        with_labels: also store a ``long`` label per key (−1 = unknown), for per-class masking.

    Buffers:
        ``keys`` K×D, ``labels`` K (only with labels), ``ptr`` () next slot to write,
        ``filled`` () number of valid entries (≤ K).
    """

    def __init__(self, size: int, dim: int, with_labels: bool = False) -> None:
        super().__init__()
        if size < 0 or dim <= 0:
            raise ValueError(f"size must be >= 0 (0 = no queue: in-batch negatives only) and dim "
                             f"positive, got size={size}, dim={dim}")
        self.size, self.dim, self.with_labels = size, dim, with_labels
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        if with_labels:
            self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor | None = None,
                keep: Tensor | None = None, same_shape: bool = False) -> None:
        """Gather ``keys`` (M×D), ``labels`` (M) and ``keep`` (M bool, default all) from all
        processes, then write the kept rows after the newest entry, wrapping around. Any ``M``
        works; if more than ``size`` rows arrive only the newest ``size`` survive, as if written
        one by one. Nothing here reads a tensor's value on the host (no GPU sync); with several
        processes pass ``same_shape=True`` when every process enqueues as many rows (see
        :func:`~densessl.distributed.gather_concat`)."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be M×{self.dim}, got {tuple(keys.shape)}")
        if self.with_labels and labels is None:
            raise ValueError("this queue stores labels: pass labels")
        if labels is not None and not self.with_labels:
            raise ValueError("this queue was built with with_labels=False")
        if labels is not None and labels.shape != keys.shape[:1]:
            raise ValueError(f"labels must be ({keys.shape[0]},), got {tuple(labels.shape)}")
        if keep is None:
            keep = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
        keys = gather_concat(keys.detach(), same_shape)
        keep = gather_concat(keep, same_shape)
        if labels is not None:
            labels = gather_concat(labels.detach().long(), same_shape)
        if keys.shape[0] == 0 or self.size == 0:
            return
        ring = torch.zeros(keys.shape[0], dtype=torch.long, device=self.keys.device)
        source, count = ring_slots(ring, keep.to(ring.device), self.ptr[None], self.size)
        written = source >= 0
        rows = source.clamp_min(0)
        # in place (the buffers stay the same tensors for DDP and .to()): every slot is
        # rewritten, untouched ones with their own value
        torch.where(written[:, None], keys.to(self.keys)[rows], self.keys, out=self.keys)
        if labels is not None:
            torch.where(written, labels.to(self.labels.device)[rows], self.labels,
                        out=self.labels)
        self.ptr.copy_((self.ptr + count[0]) % self.size)
        self.filled.copy_(torch.clamp(self.filled + count[0], max=self.size))

    @property
    def ring_labels(self) -> Tensor:
        """One ring of unknown class (−1): its keys are negatives for every query, as in
        :class:`~densessl.losses.per_class_queue.PerClassQueue`'s unknown ring."""
        return torch.full((1,), -1, dtype=torch.long, device=self.keys.device)

    def snapshot(self) -> tuple[Tensor, Tensor]:
        """Every slot, without a host sync: ``(keys 1×K×D, valid 1×K)`` (one ring, the shape
        :func:`~densessl.losses.functional.ring_negatives` takes). A copy: the loss keeps it
        for backward while a later enqueue writes the buffer in place."""
        valid = torch.arange(self.size, device=self.keys.device) < self.filled
        return self.keys[None].clone(), valid[None]

    def get(self) -> tuple[Tensor, Tensor | None]:
        """The valid entries: ``(keys F×D, labels F or None)`` with ``F = filled``, for
        inspection and tests (reads ``filled`` on the host; losses use :meth:`snapshot`)."""
        n = int(self.filled)
        keys = self.keys[:n].clone()
        labels = self.labels[:n].clone() if self.with_labels else None
        return keys, labels

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, with_labels={self.with_labels}"


def ring_slots(ring: Tensor, keep: Tensor, ptr: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Where a batch of rows lands in ``R`` FIFO rings of ``size`` slots, without host syncs.

    Row i (if ``keep[i]``) goes to ring ``ring[i]`` at ``ptr[ring] + (its rank among the kept
    rows of that ring)``, wrapping around; when two rows land on one slot the later one wins, so
    a ring that receives more than ``size`` rows keeps its newest ``size``.

    Args:
        ring: M long in ``0 … R−1``; keep: M bool; ptr: R long (next slot of each ring).

    Returns:
        ``source`` (R·size long: the row written to each flattened slot, −1 = untouched) and
        ``count`` (R long: rows kept per ring).
    """
    rings = ptr.shape[0]
    onehot = F.one_hot(ring, rings) * keep[:, None].long()
    rank = (onehot.cumsum(0) - 1).gather(1, ring[:, None])[:, 0]
    slot = ring * size + (ptr[ring] + rank) % size
    row = torch.arange(ring.shape[0], device=ring.device)
    source = torch.full((rings * size,), -1, dtype=torch.long, device=ring.device)
    source = source.scatter_reduce(0, slot, torch.where(keep, row, -1), "amax")
    return source, onehot.sum(0)
