"""The noisy-seg scenes as a labeled dataset (``finetune.dataset: noisy-seg``): the train split
for fine-tuning, the test split held out for scoring. The scenes, their change levels and the
pretraining source are in :mod:`densessl.data.noisy_seg`."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from densessl.data.labeled.base import LabeledData, instances_from_mask, register_eval_dataset
from densessl.data.noisy_seg import CARD, check_channels, load_scene, read_manifest, resolve_root


class NoisySegLabeled(Dataset):
    """One labeled split (``train`` or ``test``) as eval sample dicts."""

    def __init__(self, root: Path, records: list[dict], image_size: int) -> None:
        self.root, self.records, self.image_size = root, records, image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        image, mask = load_scene(self.root, self.records[index], self.image_size)
        return {"image": image, "mask": mask, **instances_from_mask(mask)}


@register_eval_dataset("noisy-seg")
def noisy_seg_labeled(path: str | None = None, image_size: int = 64, channels: int = 3,
                      seed: int = 0, n: int | None = None, dataset_seed: int | None = None,
                      cache_dir: str | None = None) -> LabeledData:
    """Labeled splits for ``finetune.dataset: noisy-seg``: train for fine-tuning, test held
    out for scoring (reported as ``val``)."""
    check_channels(channels)
    root = resolve_root(path, n, seed if dataset_seed is None else dataset_seed, cache_dir)
    manifest = read_manifest(root)
    return LabeledData(train=NoisySegLabeled(root, manifest["train"], image_size),
                       val=NoisySegLabeled(root, manifest["test"], image_size),
                       class_names=manifest["class_names"],
                       keys={"image", "mask", "boxes", "labels", "instance_masks"},
                       cards=[manifest.get("card", CARD)])
