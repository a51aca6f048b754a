"""Recipe values resolved from the data at start-up: ``data.bit_depth: auto`` and
``augment.mean / std: auto``.

They are resolved once, before anything trains, and written back into the recipe object, so
``recipe.yaml`` records the numbers the run used (a resumed or repeated run uses the same
ones, and fine-tuning normalises exactly as pretraining did).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from densessl.data.stats import BandMoments
from densessl.data.wrapped import wrapped_objects
from densessl.recipe import Recipe

#: pairs sampled for augment.mean / std: auto (two sources each)
STATS_SAMPLES = 64


def builder_bit_depth(builder) -> int | None:
    """The bit depth the builder's data resolved (a source's ``bit_depth`` attribute), or
    None when no source reads images of several depths (synthetic data, 8-bit loaders)."""
    for obj in wrapped_objects(builder):
        depth = getattr(obj, "bit_depth", None)
        if isinstance(depth, int) and not isinstance(depth, bool):
            return depth
    return None


def sample_statistics(builder, samples: int = STATS_SAMPLES, where: str = "data"
                      ) -> tuple[list[float], list[float], int, int]:
    """Per-band (mean, std, valid pixels, pairs read) over the sources of ``samples`` pairs
    spread evenly over the builder (source A and, when it is another image, source B; nodata
    and padding excluded through the pair's validity masks)."""
    n = len(builder)
    indices = sorted({int(i) for i in np.linspace(0, n - 1, min(samples, n))}) if n else []
    moments = BandMoments()
    for index in indices:
        pair = builder.build(index)
        moments.add(pair.source_a, pair.valid_a)
        if pair.source_b is not pair.source_a:
            moments.add(pair.source_b, pair.valid_b)
    mean, std = moments.result(where)
    return mean, std, moments.count, len(indices)


def set_normalisation(recipe: Recipe, mean: list[float], std: list[float]) -> None:
    # both at once: assigning one field alone would fail the "both or neither auto" check
    recipe.augment = recipe.augment.model_copy(update={"mean": mean, "std": std})


def resolve_data_settings(recipe: Recipe, builder, samples: int = STATS_SAMPLES) -> dict:
    """Replace ``auto`` in ``data.bit_depth`` and ``augment.mean / std`` by what the
    builder's data gives (in place); returns what was resolved, for logs and metrics."""
    resolved: dict = {}
    depth = builder_bit_depth(builder)
    if recipe.data.bit_depth == "auto" and depth is not None:
        recipe.data.bit_depth = depth
        resolved["bit_depth"] = depth
    if recipe.augment.mean == "auto":
        mean, std, pixels, pairs = sample_statistics(
            builder, samples, where=f"augment.mean: auto over data.source {recipe.data.source!r}")
        set_normalisation(recipe, [round(m, 6) for m in mean], [round(s, 6) for s in std])
        resolved.update(mean=recipe.augment.mean, std=recipe.augment.std, stats_pixels=pixels,
                        stats_pairs=pairs)
    return resolved


def inherit_data_settings(recipe: Recipe, weights: Path | None) -> bool:
    """Take ``auto`` values from the ``recipe.yaml`` next to pretrained ``weights`` (what the
    pretraining resolved), so fine-tuning scales and normalises its images exactly as the
    encoder saw them. Returns whether anything auto is left."""
    saved_file = weights.parent / "recipe.yaml" if weights is not None else None
    if saved_file is not None and saved_file.is_file():
        try:
            saved = yaml.safe_load(saved_file.read_text()) or {}
        except yaml.YAMLError:
            saved = {}
        depth = (saved.get("data") or {}).get("bit_depth")
        if recipe.data.bit_depth == "auto" and isinstance(depth, int):
            recipe.data.bit_depth = depth
        aug = saved.get("augment") or {}
        if recipe.augment.mean == "auto" and aug.get("mean") not in (None, "auto") \
                and aug.get("std") not in (None, "auto"):
            set_normalisation(recipe, aug["mean"], aug["std"])
    return recipe.augment.mean == "auto"
