"""MoCo memory queue as persistent buffers (He et al. 2020, "Momentum Contrast")."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from densessl.distributed import gather_concat


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
    def enqueue(self, keys: Tensor, labels: Tensor | None = None) -> None:
        """Gather ``keys`` (M×D) and ``labels`` (M) from all processes, then write them after
        the newest entry, wrapping around. Any ``M`` works; if more than ``size`` rows arrive only
        the last ``size`` are kept (the older ones would be overwritten anyway)."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be M×{self.dim}, got {tuple(keys.shape)}")
        if self.with_labels and labels is None:
            raise ValueError("this queue stores labels: pass labels")
        if labels is not None and not self.with_labels:
            raise ValueError("this queue was built with with_labels=False")
        if labels is not None and labels.shape != keys.shape[:1]:
            raise ValueError(f"labels must be ({keys.shape[0]},), got {tuple(labels.shape)}")
        keys = gather_concat(keys.detach())
        if labels is not None:
            labels = gather_concat(labels.detach().long())
        m = keys.shape[0]
        if m == 0 or self.size == 0:
            return
        if m > self.size:
            keys = keys[-self.size :]
            labels = labels[-self.size :] if labels is not None else None
            m = self.size
        slots = (self.ptr + torch.arange(m, device=self.keys.device)) % self.size
        self.keys[slots] = keys.to(self.keys)
        if labels is not None:
            self.labels[slots] = labels.to(self.labels.device)
        self.ptr.copy_((self.ptr + m) % self.size)
        self.filled.copy_(torch.clamp(self.filled + m, max=self.size))

    def get(self) -> tuple[Tensor, Tensor | None]:
        """The valid entries: ``(keys F×D, labels F or None)`` with ``F = filled``.

        Returns copies: the loss keeps them for backward while :meth:`enqueue` later overwrites
        the buffers in place, which autograd would otherwise reject.
        """
        n = int(self.filled)
        keys = self.keys[:n].clone()
        labels = self.labels[:n].clone() if self.with_labels else None
        return keys, labels

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, with_labels={self.with_labels}"
