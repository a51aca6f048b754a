"""densessl: domain-specific contrastive pretraining for dense tasks.

Data flow: ``data`` (samples) → ``pairs`` (PairSample) → ``augment`` (PairBatch on device) →
``models`` → ``losses`` → ``methods`` (Lightning) → exported encoder.
"""

from densessl.contract import PairBatch, PairSample, SourceBatch
from densessl.errors import DataError, DensesslError, PairContractError, RecipeError
from densessl.pairs import PairBuilder, get_pair_builder, register_pair_builder
from densessl.recipe import Recipe, load_recipe
from densessl.version import __version__


def pretrain(recipe, out, overrides=None, resume=False, progress=None):
    """Python entry point of ``densessl pretrain``
    (see :func:`densessl.workflows.pretraining.pretrain`)."""
    from densessl.workflows.pretraining import pretrain as _pretrain

    return _pretrain(recipe, out, overrides=overrides, resume=resume, progress=progress)


def finetune(recipe, weights, out, overrides=None):
    """Python entry point of ``densessl finetune``
    (see :func:`densessl.workflows.experiment.finetune`): fine-tunes every init of the recipe's
    ``finetune`` section; returns the results dict."""
    from densessl.workflows.experiment import finetune as _finetune

    return _finetune(recipe, weights, out, overrides=overrides)


def run(recipe, out, overrides=None):
    """Python entry point of ``densessl run`` (see :func:`densessl.workflows.experiment.run`):
    pretrain, then fine-tune every init; returns the results dict that ``results.json`` holds."""
    from densessl.workflows.experiment import run as _run

    return _run(recipe, out, overrides=overrides)


def run_sweep(sweep_file, out, jobs=1, overrides=None):
    """Python entry point of ``densessl sweep`` (see :func:`densessl.sweep.run_sweep`)."""
    from densessl.sweep import run_sweep as _run_sweep

    return _run_sweep(sweep_file, out, jobs=jobs, overrides=overrides)


__all__ = ["DataError", "DensesslError", "PairBatch", "PairBuilder", "PairContractError",
           "PairSample", "Recipe", "RecipeError", "SourceBatch", "finetune", "get_pair_builder",
           "load_recipe", "pretrain", "register_pair_builder", "run", "run_sweep", "__version__"]
