"""A recipe checked against everything it names, before any data are read.

:func:`densessl.recipe.load_recipe` checks a recipe's own keys, types and cross-field rules
(pydantic). What a recipe *names* lives in registries above ``densessl.recipe`` in the layers
(pair builders in ``densessl.pairs``, data sources in ``densessl.data``, labeled datasets in
``densessl.eval``, backbones in ``densessl.models``), so those names are checked here, at the
workflows level: :func:`validate_recipe` runs every check ``densessl pretrain`` / ``run`` /
``finetune`` would otherwise meet only while building objects (some after reading data, or
after hours of pretraining), without constructing any dataset or builder:

* ``pairs.builder`` is registered (or imports), and ``pairs.options`` are its keywords, of
  their annotated types;
* ``data.source`` is registered, and ``data.options`` are its keywords (when the builder takes
  the source), ``data.manifest`` has something to filter;
* ``model.backbone`` can be served (a timm model with stride 4..32 features), and a timm
  backbone is not combined with ``model.key_bn: sync``;
* ``finetune.dataset`` is registered, and ``finetune.options`` are its keywords;
* ``finetune.image_size`` suits the smp architectures (``check_input_size``);
* the same for every pretraining control ``densessl run`` would pretrain.

``densessl recipe`` runs it; every error is one :class:`~densessl.errors.RecipeError` line
naming the recipe, the key and the valid names.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from densessl.errors import RecipeError
from densessl.recipe import Recipe, load_recipe


def load_valid_recipe(path_or_dict, overrides: list[str] | None = None, *,
                      pretraining: bool = True, finetuning: bool = True) -> Recipe:
    """:func:`~densessl.recipe.load_recipe`, then :func:`validate_recipe`."""
    recipe = load_recipe(path_or_dict, overrides)
    validate_recipe(recipe, _source(path_or_dict), pretraining=pretraining,
                    finetuning=finetuning)
    return recipe


def _source(path_or_dict) -> str:
    if isinstance(path_or_dict, (str, Path)):
        return str(path_or_dict)
    return "<Recipe>" if isinstance(path_or_dict, Recipe) else "<dict>"


def validate_recipe(recipe: Recipe, source: str = "<recipe>", *, pretraining: bool = True,
                    finetuning: bool = True) -> None:
    """Refuse, in one RecipeError line ``recipe SOURCE: KEY: ...``, a recipe that names
    something no registry holds or that a component would refuse; reads no data.
    ``pretraining`` / ``finetuning``: check what that stage builds (``densessl finetune``
    builds no pair builder: its recipe may come from another machine's pretraining)."""
    try:
        if pretraining:
            check_pretraining(recipe)
        if finetuning:
            check_finetuning(recipe)
    except RecipeError as exc:
        raise RecipeError(f"recipe {source}: {exc}") from None
    if not pretraining:
        return
    cfg = recipe.finetune
    for name in cfg.inits:  # the pretraining controls densessl run pretrains
        if name != "label_free" and name not in cfg.controls:
            continue
        _, where = recipe.control_overrides(name)
        try:
            check_pretraining(recipe.control_recipe(name))
        except (RecipeError, ValueError) as exc:
            raise RecipeError(f"recipe {source}: {where} (the {name} control): {exc}") from None


def check_pretraining(recipe: Recipe) -> None:
    """The names ``densessl pretrain`` builds from: builder, source, their options, backbone."""
    from densessl.build import backbone_cell_alignment, build_encoder
    from densessl.data.registry import SOURCES
    from densessl.options import check_options
    from densessl.pairs import get_pair_builder

    cls = get_pair_builder(recipe.pairs.builder)  # unknown: the registered builders
    data = recipe.data
    if data.source not in SOURCES:
        raise RecipeError(f"data.source: unknown source {data.source!r}; registered sources: "
                          f"{', '.join(sorted(SOURCES))}")
    for section, options in (("pairs", recipe.pairs.options), ("data", data.options)):
        if "provenance" in options:
            raise RecipeError(f"{section}.options.provenance: set by densessl from "
                              "data.manifest and data.provenance; use those keys")
    check_options(cls, recipe.pairs.options, "pairs.options")
    params = inspect.signature(cls.__init__).parameters
    if "dataset" in params:
        check_options(SOURCES[data.source], data.options, "data.options")
    elif data.manifest and "provenance" not in params:
        raise RecipeError(f"data.manifest: pair builder {recipe.pairs.builder!r} reads its own "
                          "data (pairs.options), not data.source, and takes no manifest, so "
                          "the manifest would filter nothing; use a builder that takes the data "
                          "source (e.g. same_image) or one that reads a manifest (cut_paste)")
    backbone_cell_alignment(recipe)  # a backbone that cannot be built: RecipeError
    from densessl.models.backbones import get_backbone_spec

    if (recipe.model.key_bn == "sync"
            and get_backbone_spec(recipe.model.backbone).family == "timm"):
        import torch

        with torch.random.fork_rng(devices=[]):
            build_encoder(recipe)  # refuses timm's fused BatchNorm + activation with SyncBN


def check_finetuning(recipe: Recipe) -> None:
    """The names ``densessl finetune`` builds from: labeled dataset, its options, smp's rule."""
    from densessl.data.labeled.build import EVAL_DATASETS  # registers the built-in datasets
    from densessl.eval.segmentation import check_input_size
    from densessl.options import check_options

    cfg = recipe.finetune
    if cfg.dataset not in EVAL_DATASETS:
        raise RecipeError(f"finetune.dataset: unknown labeled dataset {cfg.dataset!r}; "
                          f"registered: {', '.join(sorted(EVAL_DATASETS))}")
    check_options(EVAL_DATASETS[cfg.dataset], cfg.options, "finetune.options",
                  label=f"dataset {cfg.dataset!r}")
    # smp's input-size rule, read off the models smp builds (importing smp into
    # densessl.recipe would burden every import)
    check_input_size(recipe)
