"""Labeled downstream datasets: what a labeled dataset hands to fine-tuning, and their registry.

A labeled dataset is a factory registered with ``@register_eval_dataset("name")`` (recipes pick
it with ``finetune.dataset: name``) that returns a :class:`LabeledData`. The factory is called
with keyword arguments from ``finetune.options`` plus, when its signature accepts them, ``path``,
``image_size``, ``channels`` and ``seed`` from the recipe
(:func:`densessl.data.labeled.build.build_eval_dataset`).

Every split yields sample dicts with fixed keys:

* ``"image"``: C×H×W float in [0, 1];
* ``"mask"``: H×W long, class per pixel (0 = background, 255 = ignore) — segmentation;
* ``"boxes"``: N×4 float xyxy pixels, ``"labels"``: N long in 1..K — detection;
* ``"instance_masks"``: N×H×W bool, optional — instance segmentation (Mask R-CNN).

This module sits in ``data`` so that a data module (e.g. ``noisy_seg``) can register its labeled
splits next to its pretraining source without importing the evaluation code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from densessl.data.registry import registrar

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
            ``densessl.data.labeled.xview2`` for xBD damage): a factory of an object with
            ``update(preds: B×H×W long, target: B×H×W long)`` and ``compute() -> dict``.
        split_record: how the splits were made, for results.json: ``{"method": "files" |
            "seeded" | "scenes" | "blocks", ...}`` plus the items (stems, scenes or blocks)
            of each split, so a seeded split can be repeated and checked for leaks.
        bit_depth: the bits per pixel the images were scaled by (``data.bit_depth`` resolved),
            None when the loader does not read integer images of several depths.
    """

    train: Dataset
    val: Dataset
    class_names: list[str]
    keys: set[str]
    test: dict[str, Dataset] = field(default_factory=dict)
    source: Dataset | None = None
    cards: list[dict] = field(default_factory=list)
    extra_segmentation_metrics: Callable[[], object] | None = None
    split_record: dict | None = None
    bit_depth: int | None = None

    @property
    def num_classes(self) -> int:
        """Segmentation classes including background."""
        return len(self.class_names)

    def eval_splits(self) -> dict[str, Dataset]:
        """The splits results are reported on: the test subsets, else ``{"val": val}``."""
        return dict(self.test) if self.test else {"val": self.val}


#: labeled datasets that read only the user's files (no built-in or synthetic fallback):
#: ``finetune.path`` must be set, checked before any pretraining starts
NEEDS_PATH: set[str] = set()


def register_eval_dataset(name: str, needs_path: bool = False):
    if needs_path:
        NEEDS_PATH.add(name)
    return registrar(EVAL_DATASETS, "eval dataset", name)


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
