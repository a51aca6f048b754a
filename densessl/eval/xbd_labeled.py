"""xBD as a labeled downstream dataset (``finetune.dataset: xbd``).

``task: damage`` (default) segments the post-disaster image into background + the four damage
classes (un-classified buildings are ignored) and also reports the xView2 score, computed with
localization = "any damage class predicted" — the single-model variant of the official scorer
(:mod:`densessl.eval.xview2`). ``task: buildings`` segments buildings on the pre image.

Splits: ``test`` (or ``hold``) folders when the data has them, else a fixed quarter of the
pairs is held out. Without ``path`` the synthetic xBD-format set is generated once (cache).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from densessl.data.cache import cached_synthetic
from densessl.data.labeled import LabeledData, register_eval_dataset
from densessl.data.resize import resize_image, resize_labels
from densessl.data.xbd import XBD_CARD, XBDDataset
from densessl.errors import RecipeError
from densessl.eval.xview2 import XView2Score

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
    held_out = [s for s in ("test", "hold") if (root / s / "images").is_dir()]
    if held_out:
        train = XBDDataset(root, ["train"] if (root / "train").is_dir() else None,
                           ignore_index=ignore_index)
        val = XBDDataset(root, held_out, ignore_index=ignore_index)
    else:
        pairs = XBDDataset(root, ignore_index=ignore_index)
        every = list(range(len(pairs)))
        train, val = Subset(pairs, every[1::4] + every[2::4] + every[3::4]), \
            Subset(pairs, every[0::4])
    classes = DAMAGE_CLASSES if task == "damage" else ["background", "building"]
    return LabeledData(
        train=XBDSegmentation(train, task, image_size),
        val=XBDSegmentation(val, task, image_size),
        class_names=classes, keys={"image", "mask"}, cards=[XBD_CARD],
        extra_segmentation_metrics=(lambda: DamageXView2(ignore_index)) if task == "damage"
        else None)
