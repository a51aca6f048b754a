"""densessl: domain-specific contrastive pretraining for dense tasks.

Data flow: ``data`` (samples) → ``pairs`` (PairSample) → ``augment`` (PairBatch on device) →
``models`` → ``losses`` → ``methods`` (Lightning) → exported encoder.
"""

from densessl.contract import PairBatch, PairSample, SourceBatch
from densessl.errors import DataError, DensesslError, PairContractError, RecipeError
from densessl.pairs import PairBuilder, get_pair_builder, register_pair_builder
from densessl.recipe import Recipe, load_recipe

__version__ = "0.1.0"


def pretrain(recipe, out, overrides=None, resume=False, progress=None):
    """Python entry point of ``densessl pretrain`` (see :func:`densessl.pretrain.pretrain`)."""
    from densessl.pretrain import pretrain as _pretrain

    return _pretrain(recipe, out, overrides=overrides, resume=resume, progress=progress)


__all__ = ["DataError", "DensesslError", "PairBatch", "PairBuilder", "PairContractError",
           "PairSample", "Recipe", "RecipeError", "SourceBatch", "load_recipe", "pretrain",
           "get_pair_builder", "register_pair_builder"]
