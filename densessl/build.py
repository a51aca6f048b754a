"""Recipe → objects: the source dataset, the pair builder, the view augmentation, the encoder.

The one place that knows how recipe keys map onto constructors, shared by the CLI, the Python
API and the tests.
"""

from __future__ import annotations

import inspect

import torch.nn as nn
from torch.utils.data import Dataset

from densessl.augment import ViewAugmentation
from densessl.data.manifest import ProvenanceFilter, apply_provenance
from densessl.data.registry import SOURCES
from densessl.errors import PairContractError, RecipeError
from densessl.models import DenseEncoder
from densessl.models.backbones import get_backbone_spec
from densessl.options import construct
from densessl.pairs import PairBuilder, get_pair_builder
from densessl.recipe import Recipe


def build_source_dataset(recipe: Recipe) -> Dataset:
    data = recipe.data
    if data.source not in SOURCES:
        raise RecipeError(f"data.source: unknown source {data.source!r}; registered sources: "
                          f"{', '.join(sorted(SOURCES))}")
    defaults = {"path": data.path, "image_size": data.image_size, "channels": data.channels,
                "seed": recipe.seed, "skip_bad": data.skip_bad, "bit_depth": data.bit_depth}
    if "provenance" in data.options:
        raise RecipeError("data.options.provenance: set by densessl from data.manifest and "
                          "data.provenance; use those keys")
    if data.manifest:
        # sources that read several files per item (xbd, geotiff) filter at construction,
        # before reading a dropped file's pixels
        defaults["provenance"] = provenance_filter(recipe)
    dataset = construct(SOURCES[data.source], data.options, "data.options", defaults)
    p = data.provenance
    # per-image provenance: filter by the manifest and carry the summary to every artifact
    return apply_provenance(dataset, data.source, data.path, data.manifest, require=p.require,
                            allow_licences=p.allow_licences, exclude_flags=p.exclude_flags,
                            on_missing=p.on_missing)


def provenance_filter(recipe: Recipe) -> ProvenanceFilter:
    """``data.manifest`` and ``data.provenance`` as the object sources and builders filter by."""
    data, p = recipe.data, recipe.data.provenance
    return ProvenanceFilter(data.manifest, data.path, require=tuple(p.require),
                            allow_licences=None if p.allow_licences is None
                            else tuple(p.allow_licences), exclude_flags=tuple(p.exclude_flags),
                            on_missing=p.on_missing)


def build_pair_builder(recipe: Recipe, dataset: Dataset | None = None) -> PairBuilder:
    cls = get_pair_builder(recipe.pairs.builder)
    defaults = {"seed": recipe.seed, "image_size": recipe.data.image_size,
                "channels": recipe.data.channels, "skip_bad": recipe.data.skip_bad}
    params = inspect.signature(cls.__init__).parameters
    if "provenance" in recipe.pairs.options:
        raise RecipeError("pairs.options.provenance: set by densessl from data.manifest and "
                          "data.provenance; use those keys")
    if "dataset" in params:
        defaults["dataset"] = dataset if dataset is not None else build_source_dataset(recipe)
    elif recipe.data.manifest and "provenance" in params:
        # a builder that reads its own files (cut_paste) filters them itself
        defaults["provenance"] = provenance_filter(recipe)
    elif recipe.data.manifest:  # needs the builder class (maybe a file): not a Recipe validator
        raise RecipeError(f"data.manifest: pair builder {recipe.pairs.builder!r} reads its own "
                          "data (pairs.options), not data.source, and takes no manifest, so "
                          "the manifest would filter nothing; use a builder that takes the data "
                          "source (e.g. same_image) or one that reads a manifest (cut_paste)")
    builder = construct(cls, recipe.pairs.options, "pairs.options", defaults)
    noise = recipe.noise
    if noise.kind != "none":
        from densessl.pairs.noise import NoisyPairs

        try:
            builder = NoisyPairs(builder, kind=noise.kind, amount=noise.amount, rate=noise.rate,
                                 seed=recipe.seed if noise.seed is None else noise.seed,
                                 patch=noise.patch, rotation_degrees=noise.rotation_degrees)
        except PairContractError as exc:  # e.g. wrong_class on a builder without instances
            raise RecipeError(str(exc)) from None
    return builder


def build_encoder(recipe: Recipe) -> DenseEncoder:
    m = recipe.model
    # a backbone the registry cannot serve (e.g. a timm model without stride 4..32 outputs)
    # is a RecipeError naming the valid ones
    get_backbone_spec(m.backbone)
    encoder = DenseEncoder(backbone=m.backbone, in_channels=recipe.data.channels, neck=m.neck,
                           dense_stride=m.dense_stride, neck_dim=m.neck_dim,
                           fpn_upsample=m.fpn_upsample, dense_dim=m.dense_dim,
                           global_head=m.global_head, global_dim=m.global_dim,
                           pyramid=pyramid_levels(recipe))
    if m.key_bn == "sync":
        # torch's SyncBatchNorm conversion (what Lightning applies) turns timm's BatchNormAct2d
        # into a plain SyncBatchNorm and silently drops its activation
        fused = sorted({type(mod).__name__ for mod in encoder.backbone.modules()
                        if isinstance(mod, nn.BatchNorm2d) and type(mod) is not nn.BatchNorm2d})
        if fused:
            raise RecipeError(f"model.key_bn: sync is not supported with model.backbone "
                              f"{m.backbone}: its {', '.join(fused)} layers carry an activation "
                              "that SyncBatchNorm conversion would drop; use key_bn: shuffle "
                              "(several processes) or split (one device)")
    return encoder


def roi_levels(recipe: Recipe) -> list[str]:
    """FPN levels RoIAlign reads for the instance objective: ``p{roi_min_level}..p5``."""
    return [f"p{k}" for k in range(recipe.loss.instance.roi_min_level, 6)]


def pyramid_levels(recipe: Recipe) -> list[str] | str:
    """FPN levels the objectives read: the dense head's, and :func:`roi_levels` with the
    instance objective. The others are never computed (they would get no gradient)."""
    return roi_levels(recipe) if recipe.loss.instance.weight > 0 else "dense"


def build_augmentation(recipe: Recipe, grid_stride: int, *,
                       cell_alignment: str) -> ViewAugmentation:
    """The recipe's view augmentation, its correspondence grid on the trained encoder's cells:
    ``grid_stride`` and ``cell_alignment`` are that encoder's ``stride`` / ``cell_alignment``
    (:func:`backbone_cell_alignment` when there is no encoder at hand)."""
    a = recipe.augment
    mean, std = a.normalisation()
    photometry = None
    if a.photometry.enabled:
        photometry = a.photometry.model_dump(exclude={"enabled"})
    try:
        return ViewAugmentation(recipe.data.channels, view_size=a.view_size,
                                grid_stride=grid_stride, geometry=a.geometry.model_dump(),
                                photometry=photometry, mean=mean, std=std,
                                cell_alignment=cell_alignment)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def backbone_cell_alignment(recipe: Recipe) -> str:
    """``cell_alignment`` of the recipe's backbone, from its registry entry
    (:func:`~densessl.models.backbones.get_backbone_spec`: nothing is built and nothing is
    drawn from the caller's random state) for code that draws pairs without the encoder
    (inspect-pairs, benchmarks); a training task reads its own encoder's instead."""
    return get_backbone_spec(recipe.model.backbone).cell_alignment
