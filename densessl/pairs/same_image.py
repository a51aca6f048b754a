"""Classic pairs: the same image twice; the views differ only by their augmentations."""

from __future__ import annotations

from torch.utils.data import Dataset

from densessl.contract import PairSample
from densessl.pairs.base import PairBuilder
from densessl.pairs.registry import register_pair_builder


@register_pair_builder("same_image")
class SameImagePairs(PairBuilder):
    """Source A = source B = ``dataset[i]["image"]``; base correspondence is the identity.

    An optional ``dataset[i]["valid"]`` (H×W bool, e.g. nodata) restricts the correspondence.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def build(self, index: int) -> PairSample:
        item = self.dataset[index]
        image = item["image"]
        valid = item.get("valid")
        return PairSample(source_a=image, source_b=image, valid_a=valid, valid_b=valid,
                          meta=dict(item.get("meta", {}), builder="same_image"))
