"""Is an encoder a result? Non-finite weights, or collapse / divergence in the pretraining
monitors (``metrics.json`` next to ``encoder.pt``). Fine-tuning and export both refuse such an
encoder unless forced, and the run warns about collapse."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Collapse thresholds on pretraining's monitors (densessl.methods.monitors.collapse_stats).
MIN_FEATURE_STD = 0.1
MAX_MEAN_COSINE = 0.95


def collapse_message(metrics: dict) -> str | None:
    """A warning line when pretraining's final monitors show collapse, else ``None``."""
    final = metrics.get("final", {})
    std, cos = final.get("feature_std"), final.get("mean_cosine")
    problems = []
    # written as "not healthy" so a NaN monitor (diverged features) counts as collapse; an
    # absent one (older metrics) is unknown, not collapse
    if std is not None and not std >= MIN_FEATURE_STD:
        problems.append(f"feature_std {std:.3f} < {MIN_FEATURE_STD}")
    if cos is not None and not cos <= MAX_MEAN_COSINE:
        problems.append(f"mean_cosine {cos:.3f} > {MAX_MEAN_COSINE}")
    loss = final.get("loss")
    if loss is not None and not math.isfinite(loss):
        problems.append(f"loss {loss}")
    if not problems:
        return None
    return ("pretraining collapsed (" + ", ".join(problems) + "): all images map to nearly one "
            "feature; try a lower learning rate, a larger queue or more augmentation")


def encoder_problems(state: dict[str, Tensor], metrics: dict | None) -> list[str]:
    """Why an encoder is not a result: non-finite tensors, or collapse/divergence in the
    pretraining monitors of ``metrics.json`` next to it."""
    problems = []
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        problems.append(f"{len(bad)} of {len(state)} tensors hold NaN/inf (e.g. {bad[0]})")
    message = collapse_message(metrics or {})
    if message:
        problems.append(message.split(":")[0])
    return problems
