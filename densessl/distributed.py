"""One code path for one or many processes.

Everything here falls back to the identity when ``torch.distributed`` is not initialised or runs
a single process, so CPU tests exercise the same code as multi-GPU training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightly.utils import dist as lightly_dist
from torch import Tensor


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return lightly_dist.world_size()


def rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return lightly_dist.rank()


@torch.no_grad()
def gather_concat(x: Tensor, same_shape: bool = False) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, in rank order.

    Args:
        x: ``M×...`` tensor; ``M`` may differ between processes (e.g. the number of boxes),
            which plain ``all_gather`` does not allow, so rows are padded to the largest ``M``
            before gathering and trimmed afterwards; learning the ``M`` of the others means
            reading a count on the host (a GPU sync).
        same_shape: the caller guarantees every process passes the same shape (fixed-shape
            dense cell slots of equal local batches: the pretraining DataLoader drops the last
            incomplete batch), so the counts are not exchanged and nothing waits for the device.

    Returns:
        ``(ΣM)×...`` tensor, identical on every process; ``x`` itself with one process.
        Not differentiable: meant for filling queues (MoCo, He et al. 2020, gathers keys the
        same way before enqueueing).
    """
    n_proc = world_size()
    if n_proc == 1:
        return x
    if same_shape:
        parts = [torch.empty_like(x) for _ in range(n_proc)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(n_proc)]
    dist.all_gather(counts, count)
    counts_int = [int(c.item()) for c in counts]
    # at least one row: some backends mishandle empty collectives, and every process must
    # still take part even when it has nothing to add
    longest = max(max(counts_int), 1)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))], dim=0)
    parts = [torch.empty_like(padded) for _ in range(n_proc)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts_int)], dim=0)
