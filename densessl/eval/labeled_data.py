"""Labeled downstream datasets: a registry of train / val / test splits of sample dicts.

Register a factory with ``@register_eval_dataset("name")``; recipes pick it with
``finetune.dataset: name``. The factory is called with keyword arguments from
``finetune.options`` plus, when its signature accepts them, ``path``, ``image_size``,
``channels`` and ``seed`` from the recipe, and returns a :class:`LabeledData`.

Every split yields sample dicts with fixed keys:

* ``"image"``: C×H×W float in [0, 1];
* ``"mask"``: H×W long, class per pixel (0 = background, 255 = ignore) — segmentation;
* ``"boxes"``: N×4 float xyxy pixels, ``"labels"``: N long in 1..K — detection;
* ``"instance_masks"``: N×H×W bool, optional — instance segmentation (Mask R-CNN).

The X-ray (PIDray) and xBD adapters register themselves the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from densessl.data.registry import registrar
from densessl.data.synthetic import SHAPES, SyntheticScenes
from densessl.errors import RecipeError
from densessl.options import construct

EVAL_DATASETS: dict[str, Callable[..., LabeledData]] = {}

TASK_KEYS = {"segmentation": ("mask",), "linear_probe": ("mask",),
             "detection": ("boxes", "labels"), "instance_segmentation": ("instance_masks",)}


@dataclass
class LabeledData:
    """Splits of one labeled dataset and what they carry.

    Attributes:
        train: fine-tuning split (label fractions subsample it).
        val: held-out split; the evaluated one when ``test`` is empty.
        test: named test subsets (e.g. PIDray easy / hard / hidden), each reported apart.
        class_names: names of classes 0..K (index 0 = background).
        keys: sample keys the splits provide (see :data:`TASK_KEYS`).
        source: labeled split for the *supervised* init, disjoint from val/test; ``None`` uses
            ``train`` (then the supervised init has seen every training label).
        cards: dataset cards (name, licence, url) carried into results and model cards.
        extra_segmentation_metrics: hook for dataset-specific scores (e.g. the xView2 score from
            ``densessl.eval.xview2`` for xBD damage): a factory of an object with
            ``update(preds: B×H×W long, target: B×H×W long)`` and ``compute() -> dict``.
    """

    train: Dataset
    val: Dataset
    class_names: list[str]
    keys: set[str]
    test: dict[str, Dataset] = field(default_factory=dict)
    source: Dataset | None = None
    cards: list[dict] = field(default_factory=list)
    extra_segmentation_metrics: Callable[[], object] | None = None

    @property
    def num_classes(self) -> int:
        """Segmentation classes including background."""
        return len(self.class_names)

    def eval_splits(self) -> dict[str, Dataset]:
        """The splits results are reported on: the test subsets, else ``{"val": val}``."""
        return dict(self.test) if self.test else {"val": self.val}


def register_eval_dataset(name: str):
    return registrar(EVAL_DATASETS, "eval dataset", name)


def build_eval_dataset(name: str, options: dict, *, path: str | None = None,
                       image_size: int = 64, channels: int = 3, seed: int = 0) -> LabeledData:
    """Instantiate a registered labeled dataset; unknown names or options are RecipeErrors."""
    register_builtin_datasets()
    if name not in EVAL_DATASETS:
        raise RecipeError(f"finetune.dataset: unknown labeled dataset {name!r}; registered: "
                          f"{', '.join(sorted(EVAL_DATASETS))}")
    defaults = {"path": path, "image_size": image_size, "channels": channels, "seed": seed}
    return construct(EVAL_DATASETS[name], options, "finetune.options", defaults,
                     label=f"dataset {name!r}")


def instances_from_mask(mask: torch.Tensor, min_area: int = 4, ignore_index: int = 255
                        ) -> dict[str, torch.Tensor]:
    """Instances as the connected components (8-connected) of each class of a label map.

    Args:
        mask: H×W long, 0 = background.
        min_area: components smaller than this (slivers left by overlaps) are dropped.

    Returns:
        ``boxes`` N×4 float xyxy (x2/y2 exclusive, pixel edges), ``labels`` N long,
        ``instance_masks`` N×H×W bool.
    """
    labels_np = mask.numpy()
    boxes, labels, masks = [], [], []
    for cls in np.unique(labels_np):
        if cls == 0 or cls == ignore_index:
            continue
        comps, n = ndimage.label(labels_np == cls, structure=np.ones((3, 3)))
        for sl, comp_id in zip(ndimage.find_objects(comps), range(1, n + 1)):
            inst = comps == comp_id
            if inst.sum() < min_area:
                continue
            boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
            labels.append(int(cls))
            masks.append(inst)
    h, w = labels_np.shape
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "instance_masks": torch.from_numpy(np.stack(masks)) if masks
            else torch.zeros(0, h, w, dtype=torch.bool)}


class SyntheticLabeled(Dataset):
    """A range of :class:`SyntheticScenes` images with mask, boxes, labels, instance masks."""

    def __init__(self, scenes: SyntheticScenes, start: int, length: int) -> None:
        self.scenes, self.start, self.length = scenes, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        sample = self.scenes[self.start + index]
        return {"image": sample["image"], "mask": sample["mask"],
                **instances_from_mask(sample["mask"])}


@register_eval_dataset("synthetic")
def synthetic_labeled(image_size: int = 64, channels: int = 3, seed: int = 0,
                      num_train: int = 256, num_val: int = 128, num_source: int = 512
                      ) -> LabeledData:
    """The built-in synthetic scenes with labels: 5 classes (background + 4 shape kinds).

    The images come from a different seed than pretraining's ``data.source: synthetic`` (which
    uses the recipe seed), so val never overlaps the unlabeled pretraining images. ``source``
    is a further disjoint range for the supervised init.
    """
    for name, n in (("num_train", num_train), ("num_val", num_val), ("num_source", num_source)):
        if n < 0:
            raise RecipeError(f"finetune.options.{name}: expected >= 0, got {n}")
    scenes = SyntheticScenes(num_images=max(1, num_train + num_val + num_source),
                             image_size=image_size, channels=channels, seed=seed + 7919)
    return LabeledData(
        train=SyntheticLabeled(scenes, 0, num_train),
        val=SyntheticLabeled(scenes, num_train, num_val),
        source=SyntheticLabeled(scenes, num_train + num_val, num_source) if num_source else None,
        class_names=["background", *SHAPES],
        keys={"image", "mask", "boxes", "labels", "instance_masks"},
        cards=[{"name": "densessl synthetic scenes", "licence": "generated by densessl "
                "(Apache-2.0), no third-party data"}])


def register_builtin_datasets() -> None:
    """Import the adapters that register themselves (done lazily: they import densessl.data,
    which may itself be importing densessl.eval)."""
    import densessl.data.noisy_seg as noisy_seg
    import densessl.eval.xbd_labeled  # noqa: F401
    import densessl.eval.xray_labeled  # noqa: F401

    noisy_seg.register_labeled()
