"""PIDray as a labeled downstream dataset (``finetune.dataset: pidray``).

Fine-tunes on the train split and reports every test subset the data has (easy / hard / hidden,
or the extended release's test) apart, as PIDray papers do. Without ``path`` it uses the
synthetic X-ray set in PIDray format, generated once into the cache (the same set the
``cut_paste`` builder pastes from when it has no roots).
"""

from __future__ import annotations

from pathlib import Path

from densessl.data.cache import cached_synthetic
from densessl.data.labeled.base import LabeledData, register_eval_dataset
from densessl.data.pidray import PIDRAY_CARD, PIDRAY_CLASSES, PIDray, available_splits
from densessl.data.xray_synth import synthesize_xray  # noqa: F401  (registers "xray" for the cache)
from densessl.errors import DataError


@register_eval_dataset("pidray")
def pidray_labeled(path: str | None = None, image_size: int = 64, channels: int = 3,
                   seed: int = 0, cache_dir: str | None = None, synthetic_n: int = 48,
                   skip_bad: bool = False, dataset_seed: int = 0) -> LabeledData:
    """``dataset_seed``: which draw of the synthetic set (without ``path``); not the run's
    ``seed``, so repeated pretraining or probe seeds score on one fixed set."""
    if path is None:
        root = cached_synthetic("xray", synthetic_n, dataset_seed, cache_dir) / "pidray"
    else:
        root = Path(path)
    splits = available_splits(root)
    if "train" not in splits:
        raise DataError(f"PIDray: {str(root)!r} has no train split (annotations/"
                        "xray_train.json or annotations/train.json)")
    tests = {name: PIDray(root, name, image_size, channels, skip_bad)
             for name in splits if name != "train"}
    if not tests:
        raise DataError(f"PIDray: {str(root)!r} has no test split to evaluate on "
                        "(easy / hard / hidden or test)")
    return LabeledData(
        train=PIDray(root, "train", image_size, channels, skip_bad),
        val=next(iter(tests.values())),
        test=tests,
        class_names=["background", *PIDRAY_CLASSES],
        keys={"image", "mask", "boxes", "labels", "instance_masks"},
        cards=[PIDRAY_CARD],
        # the root scored on (the synthetic set's cache folder when there is no path)
        split_record={"method": "release", "root": str(root), "train": ["train"],
                      "test": list(tests)})
