"""The one learning-rate schedule of pretraining and fine-tuning: linear warmup, then cosine
decay to 0, as lightly's :class:`~lightly.utils.scheduler.CosineWarmupScheduler`."""

from __future__ import annotations

import torch
from lightly.utils.scheduler import CosineWarmupScheduler


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int,
                  total_steps: int) -> CosineWarmupScheduler:
    """Per-step factor ``(s + 1) / warmup_steps`` for ``s < warmup_steps``, then
    ``½ (1 + cos(π (s − warmup_steps) / (total_steps − warmup_steps)))``, 0 from ``total_steps``.

    lightly's schedule reaches its end value on its last step; giving it one step more than
    the run makes the last *trained* step's rate non-zero (a 1-step run still learns). A warmup
    longer than the run stays a ramp (lightly refuses warmup > max steps, hence the ``max``).
    """
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps} "
                         f"and {total_steps}")
    return CosineWarmupScheduler(optimizer, warmup_epochs=warmup_steps,
                                 max_epochs=max(total_steps, warmup_steps) + 1,
                                 start_value=1.0, end_value=0.0)
