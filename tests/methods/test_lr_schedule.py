"""warmup_cosine (lightly's CosineWarmupScheduler) against the schedule written out by hand."""

import math

import pytest
import torch

from densessl.methods.schedule import warmup_cosine


def reference(step, warmup, total):
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 2), (0, 10), (3, 10), (1, 1), (10, 10),
                                           (15, 10), (5, 100)])
def test_factors_match_the_written_out_schedule(warmup, total):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = warmup_cosine(optimizer, warmup, total)
    for step in range(total + 1):  # Lightning steps the scheduler once after the last step
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * reference(step, warmup,
                                                                                total), abs=1e-9)
        optimizer.step()
        scheduler.step()


def test_bad_arguments_are_clear_errors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        warmup_cosine(optimizer, -1, 10)
