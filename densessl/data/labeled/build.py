"""Build the labeled dataset a recipe names (``finetune.dataset``).

Importing this module registers every built-in labeled dataset, one module each in this
package (see :mod:`densessl.data.labeled`).
"""

from __future__ import annotations

# each import registers its datasets
import densessl.data.labeled.coco  # noqa: F401 - coco
import densessl.data.labeled.geotiff_masks  # noqa: F401 - geotiff_masks, geotiff_series_masks
import densessl.data.labeled.mask_folder  # noqa: F401 - mask_folder
import densessl.data.labeled.noisy_seg  # noqa: F401 - noisy-seg
import densessl.data.labeled.pidray  # noqa: F401 - pidray
import densessl.data.labeled.synthetic  # noqa: F401 - synthetic
import densessl.data.labeled.xbd  # noqa: F401 - xbd
from densessl.data.labeled.base import EVAL_DATASETS, NEEDS_PATH, LabeledData
from densessl.errors import RecipeError
from densessl.options import construct


def build_eval_dataset(name: str, options: dict, *, path: str | None = None,
                       image_size: int = 64, channels: int = 3, seed: int = 0,
                       bit_depth: int | str | None = "auto") -> LabeledData:
    """Instantiate a registered labeled dataset; unknown names or options are RecipeErrors.
    ``bit_depth`` (the recipe's ``data.bit_depth``, resolved by pretraining where it could
    be) reaches the datasets that read integer images of several depths."""
    if name not in EVAL_DATASETS:
        raise RecipeError(f"finetune.dataset: unknown labeled dataset {name!r}; registered: "
                          f"{', '.join(sorted(EVAL_DATASETS))}")
    defaults = {"path": path, "image_size": image_size, "channels": channels, "seed": seed,
                "bit_depth": bit_depth}
    return construct(EVAL_DATASETS[name], options, "finetune.options", defaults,
                     label=f"dataset {name!r}")


def check_finetune_path(dataset: str, path: str | None) -> None:
    """A dataset that reads only the user's files needs ``finetune.path``: refused in one line
    before any pretraining, never a silent evaluation on something else."""
    if dataset in NEEDS_PATH and not path:
        raise RecipeError(f"finetune.path: not set, and finetune.dataset {dataset!r} reads your "
                          "own labeled files (it has no built-in data); set it, e.g. --set "
                          "finetune.path=/data/labeled (README, Your own data)")
