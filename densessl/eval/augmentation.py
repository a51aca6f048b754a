"""Mask- and box-aware augmentation of the fine-tuning train split, with albumentations.

The recipe's ``finetune.augment`` section chooses the transforms (:class:`FinetuneAugment`
in densessl.recipe); :func:`build_transform` turns it into one ``albumentations.Compose``
and :class:`AugmentedSamples` applies it to every train sample: the image, its class mask,
its boxes and its instance masks move together. Evaluation splits and the linear probe
(cached features of fixed images) are never augmented.

Photometric change depends on the bands: RGB images get albumentations' brightness /
contrast jitter; any other channel count (multispectral, single-band X-ray) gets a gain drawn
per band (``MultiplicativeNoise`` with ``per_channel``), since a shared "brightness" has no
meaning across unrelated bands.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset


def build_transform(cfg: Any, size: tuple[int, int], channels: int, seed: int,
                    boxes: bool = False) -> A.Compose | None:
    """The ``Compose`` for ``cfg`` (a ``finetune.augment`` section), or ``None`` when it does
    nothing. ``boxes``: carry pascal_voc boxes (xyxy pixel edges, as torchvision's) with their
    labels and instance ids; a box cropped to nothing is dropped with its instance."""
    transforms: list[A.BasicTransform] = []
    lo, hi = cfg.crop_scale
    if lo < 1.0:
        # scale: area fraction of the source kept, then resized back to the training size
        transforms.append(A.RandomResizedCrop(size=size, scale=(lo, hi), ratio=(3 / 4, 4 / 3),
                                              p=1.0))
    if cfg.hflip > 0:
        transforms.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        transforms.append(A.VerticalFlip(p=cfg.vflip))
    if cfg.rotate90 > 0:  # overhead and X-ray imagery have no "up"
        transforms.append(A.RandomRotate90(p=cfg.rotate90))
    if cfg.photometric > 0:
        if channels == 3:
            transforms.append(A.RandomBrightnessContrast(brightness_limit=0.2,
                                                         contrast_limit=0.2, p=cfg.photometric))
        else:
            transforms.append(A.MultiplicativeNoise(multiplier=(0.9, 1.1), per_channel=True,
                                                    elementwise=False, p=cfg.photometric))
    if not transforms:
        return None
    bbox_params = (A.BboxParams(format="pascal_voc", label_fields=["labels", "ids"],
                                min_area=1.0) if boxes else None)
    return A.Compose(transforms, bbox_params=bbox_params, seed=seed)


class AugmentedSamples(Dataset):
    """``dataset``'s samples (dicts with ``image`` C×H×W float in [0, 1], ``mask`` H×W long,
    optionally ``boxes`` N×4 xyxy, ``labels`` N, ``instance_masks`` N×H×W) through
    ``transform``; the image is clipped back to [0, 1] after photometric jitter."""

    def __init__(self, dataset: Dataset, transform: A.Compose) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        image = np.ascontiguousarray(sample["image"].permute(1, 2, 0).numpy(), np.float32)
        args: dict[str, Any] = {"image": image}
        if "mask" in sample:
            args["mask"] = sample["mask"].numpy()
        has_boxes = "boxes" in sample and self.transform.processors.get("bboxes") is not None
        if has_boxes:
            n = len(sample["boxes"])
            args["bboxes"] = sample["boxes"].numpy().reshape(n, 4).astype(np.float32)
            args["labels"] = sample["labels"].numpy()
            args["ids"] = np.arange(n)
            if "instance_masks" in sample and n:  # an image without objects has none to move
                args["masks"] = sample["instance_masks"].numpy().astype(np.uint8)
        else:  # never hand on geometry that the image no longer matches
            for key in ("boxes", "labels", "instance_masks"):
                sample.pop(key, None)
        out = self.transform(**args)
        sample["image"] = torch.from_numpy(np.clip(out["image"], 0.0, 1.0)).permute(2, 0, 1)
        sample["image"] = sample["image"].contiguous()
        if "mask" in sample:
            sample["mask"] = torch.as_tensor(out["mask"]).to(sample["mask"].dtype)
        if has_boxes:
            kept = np.asarray(out["ids"], dtype=np.int64)
            sample["boxes"] = torch.as_tensor(np.asarray(out["bboxes"], np.float32)
                                              ).reshape(-1, 4)
            sample["labels"] = torch.as_tensor(np.asarray(out["labels"])).long().reshape(-1)
            if "instance_masks" in sample:
                masks = (np.asarray(out["masks"]) if "masks" in args
                         else np.zeros((0, 0), np.uint8)).reshape(-1, *out["image"].shape[:2])
                sample["instance_masks"] = torch.from_numpy(masks[kept]).to(
                    sample["instance_masks"].dtype)
        return sample
