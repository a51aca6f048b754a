"""Per-channel normalisation of image batches before an encoder, shared by the fine-tuning
loops, the linear probe and the artifact probe."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x − mean) / std`` per channel: ``x`` B×C×H×W, ``mean`` and ``std`` C values each."""
    return (x - x.new_tensor(mean)[:, None, None]) / x.new_tensor(std)[:, None, None]
