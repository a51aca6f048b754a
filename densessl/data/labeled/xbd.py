"""xBD as a labeled downstream dataset (``finetune.dataset: xbd``).

``task: damage`` (default) segments the post-disaster image into background + the four damage
classes (un-classified buildings are ignored) and also reports the xView2 score, computed with
localization = "any damage class predicted" — the single-model variant of the official scorer
(:mod:`densessl.data.labeled.xview2`). ``task: buildings`` segments buildings on the pre image.

Splits: the release's folders when the data has them: scored on ``test`` (``hold`` when there is
no ``test``; ``hold`` is the val split next to it), fine-tuned on ``train`` (else every folder
that is not held out); without them every fourth pair is the test split. results.json names
the scored split (``data.eval_splits``) and the folders or pairs of each (``data.splits``).
Without ``path`` the synthetic xBD-format set is generated once (cache).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from densessl.data.cache import cached_synthetic
from densessl.data.labeled.base import LabeledData, register_eval_dataset
from densessl.data.labeled.xview2 import XView2Score
from densessl.data.resize import resize_image, resize_labels
from densessl.data.xbd import XBD_CARD, XBDDataset
from densessl.errors import DataError, RecipeError

DAMAGE_CLASSES = ["background", "no-damage", "minor-damage", "major-damage", "destroyed"]


class XBDSegmentation(Dataset):
    """``{"image", "mask"}`` views of an :class:`XBDDataset`, resized to ``image_size``."""

    def __init__(self, pairs: Dataset, task: str, image_size: int) -> None:
        self.pairs, self.task, self.image_size = pairs, task, image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        item = self.pairs[index]
        image = item["image_t1"] if self.task == "damage" else item["image_t0"]
        mask = item["damage"] if self.task == "damage" else item["mask"]
        size = (self.image_size, self.image_size)
        # one sampling grid for image and labels (densessl.data.resize)
        image, mask = resize_image(image, size), resize_labels(mask.long(), size)
        return {"image": image, "mask": mask}


class DamageXView2(XView2Score):
    """xView2 score from damage-segmentation predictions (B×H×W class maps); a torchmetrics
    ``Metric`` with summed count states (see :class:`XView2Score`)."""

    def __init__(self, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(ignore_index=ignore_index, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds > 0, preds, None, target)

    def compute(self) -> dict[str, float]:
        return {f"xview2_{k}" if not k.startswith("xview2") else k: v
                for k, v in super().compute().items()}


@register_eval_dataset("xbd")
def xbd_labeled(path: str | None = None, image_size: int = 64, seed: int = 0,
                task: str = "damage", cache_dir: str | None = None, synthetic_n: int = 24,
                ignore_index: int = 255) -> LabeledData:
    if task not in ("damage", "buildings"):
        raise RecipeError(f"finetune.options.task: expected 'damage' or 'buildings', got {task!r}")
    if path is None:
        root = cached_synthetic("xbd", synthetic_n, seed, cache_dir)
    else:
        root = Path(path)
    groups = sorted({d.parent.name for d in root.rglob("images") if d.is_dir()})
    held_out = [s for s in ("test", "hold") if s in groups]
    if held_out:
        # the release's own splits: scored on test (hold when there is no test); fine-tuned
        # on train when the root has it, else on every folder that is not held out
        fit = ["train"] if "train" in groups else [g for g in groups if g not in held_out]
        if not fit:
            raise DataError(f"xBD {str(root)!r}: only held-out folders ({', '.join(held_out)})"
                            ", nothing to fine-tune on")
        scored = held_out[0]  # the name results.json reports it under
        train = XBDDataset(root, fit, ignore_index=ignore_index)
        test = XBDDataset(root, [scored], ignore_index=ignore_index)
        val = XBDDataset(root, [held_out[-1]], ignore_index=ignore_index) \
            if len(held_out) > 1 else test
        record = {"method": "folders", "train": fit, "test": [scored],
                  "val": [held_out[-1]]}
    else:
        pairs = XBDDataset(root, ignore_index=ignore_index)
        every = list(range(len(pairs)))
        train = Subset(pairs, every[1::4] + every[2::4] + every[3::4])
        val = test = Subset(pairs, every[0::4])
        scored = "test"
        record = {"method": "every fourth pair (no test/ or hold/ folder)",
                  "test": [pairs.pairs[i].base for i in every[0::4]]}
    classes = DAMAGE_CLASSES if task == "damage" else ["background", "building"]
    return LabeledData(
        train=XBDSegmentation(train, task, image_size),
        val=XBDSegmentation(val, task, image_size),
        test={scored: XBDSegmentation(test, task, image_size)},
        class_names=classes, keys={"image", "mask"}, cards=[XBD_CARD], split_record=record,
        extra_segmentation_metrics=(lambda: DamageXView2(ignore_index)) if task == "damage"
        else None)
