"""Recipe → objects: the source dataset, the pair builder, the view augmentation, the encoder.

The one place that knows how recipe keys map onto constructors, shared by the CLI, the Python
API and the tests.
"""

from __future__ import annotations

import inspect

from torch.utils.data import Dataset

from densessl.augment import ViewAugmentation
from densessl.data import ImageFolder, SyntheticScenes
from densessl.errors import RecipeError
from densessl.models import DenseEncoder
from densessl.pairs import PairBuilder, get_pair_builder
from densessl.recipe import Recipe


def build_source_dataset(recipe: Recipe) -> Dataset:
    data = recipe.data
    if data.source == "synthetic":
        return SyntheticScenes(data.synthetic.num_images, data.image_size, data.channels,
                               data.synthetic.seed)
    return ImageFolder(data.path, data.image_size, data.channels)


def build_pair_builder(recipe: Recipe, dataset: Dataset | None = None) -> PairBuilder:
    cls = get_pair_builder(recipe.pairs.builder)
    options = dict(recipe.pairs.options)
    accepted = inspect.signature(cls.__init__).parameters
    for key in options:
        if key not in accepted:
            valid = [k for k in accepted if k not in ("self", "dataset")]
            raise RecipeError(f"pairs.options.{key}: not an option of builder "
                              f"{recipe.pairs.builder!r} (valid: {', '.join(valid) or 'none'})")
    if "dataset" in accepted:
        options["dataset"] = dataset if dataset is not None else build_source_dataset(recipe)
    try:
        return cls(**options)
    except TypeError as exc:
        raise RecipeError(f"pairs.options: cannot build {recipe.pairs.builder!r}: {exc}") from None


def build_encoder(recipe: Recipe) -> DenseEncoder:
    m = recipe.model
    return DenseEncoder(backbone=m.backbone, in_channels=recipe.data.channels, neck=m.neck,
                        dense_stride=m.dense_stride, neck_dim=m.neck_dim, dense_dim=m.dense_dim,
                        global_head=m.global_head, global_dim=m.global_dim)


def build_augmentation(recipe: Recipe, grid_stride: int) -> ViewAugmentation:
    a = recipe.augment
    photometry = None
    if a.photometry.enabled:
        photometry = a.photometry.model_dump(exclude={"enabled"})
    try:
        return ViewAugmentation(recipe.data.channels, view_size=a.view_size,
                                grid_stride=grid_stride, geometry=a.geometry.model_dump(),
                                photometry=photometry, mean=a.mean, std=a.std)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
