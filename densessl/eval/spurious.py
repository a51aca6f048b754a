"""A controlled spurious correlation: does an encoder let a fine-tuned model take a shortcut?

``finetune.spurious: {artifact: text|logo|border|FILE.png, class_id: c, rate: 1.0}`` stamps the
artifact (densessl.eval.artifact_probe.stamp: random position, scale, opacity) on the train
images that **contain** class ``c`` (each with probability ``rate``), and on the evaluation
images that **do not** contain it. In train the artifact predicts the class; in test it
predicts its absence. A model that learned "artifact → c" paints class ``c`` where the
artifact is and scores lower on test; one that learned the objects does not care. Comparing
inits, and the same init with and without ``finetune.drop_channels`` (the mitigation), shows
whether the encoder's artifact channels matter downstream.

Class masks, boxes and instances are left as they are: the artifact is not an object. The
supervised init trains on the same stamped train split (it is the ceiling under the same
shift). Every stamp is drawn from a generator seeded by (seed, split, index), so each image
gets the same stamp in every run and every init.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from densessl.data.labeled import LabeledData
from densessl.errors import RecipeError
from densessl.eval.artifact_probe import KINDS, load_artifact_png, stamp


class StampedSplit(Dataset):
    """``dataset`` with ``artifact`` stamped on the samples whose mask contains ``class_id``
    (``with_class=True``) or lacks it (``False``), each with probability ``rate``."""

    def __init__(self, dataset: Dataset, artifact: Any, class_id: int, with_class: bool,
                 rate: float, seed: int, name: str) -> None:
        self.dataset, self.artifact, self.class_id = dataset, artifact, class_id
        self.with_class, self.rate = with_class, rate
        # a stable per-split salt (str hash() changes between processes)
        self.seed = (seed, zlib.crc32(name.encode()))

    def __len__(self) -> int:
        return len(self.dataset)

    def stamped(self, index: int, sample: dict) -> bool:
        """Whether sample ``index`` carries the artifact (the rule, for reports and tests)."""
        has = bool((sample["mask"] == self.class_id).any())
        coin = torch.rand((), generator=self._gen(index, 0)) < self.rate
        return has == self.with_class and bool(coin)

    def _gen(self, index: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((*self.seed, index, stream)) & 0x7FFFFFFF)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        if self.stamped(index, sample):
            sample["image"], _ = stamp(sample["image"], self.artifact, self._gen(index, 1))
        return sample


def spurious_data(data: LabeledData, cfg: Any, seed: int) -> LabeledData:
    """``data`` with the spurious correlation of ``cfg`` (a ``finetune.spurious`` section):
    train (and the supervised init's source) stamped where class ``cfg.class_id`` is, every
    evaluation split stamped where it is not."""
    # needs the dataset's classes, so not a Recipe validator
    if not 1 <= cfg.class_id < data.num_classes:
        raise RecipeError(f"finetune.spurious.class_id: expected a class id in 1.."
                          f"{data.num_classes - 1} ({', '.join(data.class_names[1:])}), got "
                          f"{cfg.class_id}")
    artifact = cfg.artifact
    if artifact not in KINDS:
        if not Path(artifact).is_file():
            raise RecipeError(f"finetune.spurious.artifact: expected one of {list(KINDS)} or "
                              f"a .png file, got {artifact!r}")
        artifact = load_artifact_png(artifact)

    def wrap(split: Dataset, name: str, with_class: bool) -> StampedSplit:
        return StampedSplit(split, artifact, cfg.class_id, with_class, cfg.rate, seed, name)

    return dataclasses.replace(
        data, train=wrap(data.train, "train", True), val=wrap(data.val, "val", False),
        test={k: wrap(v, f"test/{k}", False) for k, v in data.test.items()},
        source=wrap(data.source, "source", True) if data.source is not None else None)
