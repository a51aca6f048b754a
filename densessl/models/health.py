"""Is an encoder a result? Non-finite weights, or collapse / divergence in the pretraining
monitors (``metrics.json`` next to ``encoder.pt``). Fine-tuning and export both refuse such an
encoder unless forced, and the run warns about collapse."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Collapse thresholds on pretraining's monitors (densessl.methods.monitors.collapse_stats);
# feature_std is lightly's std_of_l2_normalized × √D, about 1 for healthy features.
MIN_FEATURE_STD = 0.1
MAX_MEAN_COSINE = 0.95


def collapse_message(metrics: dict) -> str | None:
    """A warning line when pretraining's final monitors show collapse, else ``None``."""
    final = metrics.get("final", {})
    std, cos = final.get("feature_std"), final.get("mean_cosine")
    problems = []
    # written as "not healthy" so a NaN monitor (diverged features) counts as collapse; an
    # absent one (older metrics, or a run whose objective never had 2 images' queries to
    # compare: DensePretraining.final_stats) is unknown, not collapse
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


#: fewer dense query cells per image than this (on average over the run; in the last step for
#: an older metrics.json): the dense objective barely trains
MIN_DENSE_CELLS_PER_IMAGE = 1.0


def sparse_dense_message(metrics: dict) -> str | None:
    """A note when the dense objective had almost no query cells (valid, taking part) per
    image, e.g. thin pasted segments with ``loss.dense.background: ignore`` at small views: the
    encoder is then trained by the other objectives, not the dense one.

    Reads ``dense_query_cells_per_image``, the mean over every image of the run (pretraining
    writes it at the top level of metrics.json); an older metrics.json has only the last
    step's ``final.dense_pairs``, one step that can be far from the run's mean."""
    per_image = metrics.get("dense_query_cells_per_image")
    when = "on average over the run"
    if per_image is None:
        final = metrics.get("final", {})
        cells, pairs, steps = final.get("dense_pairs"), metrics.get("pairs"), metrics.get("steps")
        if cells is None or not pairs or not steps:
            return None
        per_image = cells / (pairs / steps / max(metrics.get("world_size", 1), 1))
        when = "in the last step"
    if per_image >= MIN_DENSE_CELLS_PER_IMAGE:
        return None
    return (f"the dense objective had {per_image:.2f} query cells per image {when} "
            f"(< {MIN_DENSE_CELLS_PER_IMAGE:g}): it barely trains. Cells count only where the "
            "correspondence is exact and, with loss.dense.background: ignore, on pasted segments; "
            "larger views (augment.view_size) or pastes (pairs.options.scale_range) give more")


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
