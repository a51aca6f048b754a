"""Temporal pairs: two dates of the same place (xBD pre/post, multi-date GeoTIFF tiles).

The two dates share one pixel grid (the data source co-registers them), so the base
correspondence is the identity; only the content may differ (seasons, a disaster). Each view
still gets its own geometry later, on the device.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from densessl.contract import PairSample
from densessl.errors import PairContractError
from densessl.pairs.base import PairBuilder
from densessl.pairs.registry import register_pair_builder


@register_pair_builder("temporal")
class TemporalPairs(PairBuilder):
    """Source A = ``dataset[i]["image_t0"]``, source B = ``dataset[i]["image_t1"]``.

    ``valid_t0`` / ``valid_t1`` (H×W bool, optional) become ``valid_a`` / ``valid_b``, so a cell
    is a positive only where both dates have data. With probability ``swap_p`` the dates are
    exchanged (the query then comes from the later date); the draw uses torch's RNG, which
    DataLoader workers seed per worker, so runs stay reproducible.

    Args:
        dataset: a source with temporal keys (``xbd``, ``xbd_labeled``, ``geotiff``).
        swap_p: probability of swapping the date order.
    """

    def __init__(self, dataset: Dataset, swap_p: float = 0.5) -> None:
        if not 0.0 <= swap_p <= 1.0:
            raise PairContractError(f"pairs.options.swap_p must be in [0, 1], got {swap_p}")
        self.dataset, self.swap_p = dataset, swap_p

    def __len__(self) -> int:
        return len(self.dataset)

    def build(self, index: int) -> PairSample:
        item = self.dataset[index]
        if "image_t0" not in item or "image_t1" not in item:
            raise PairContractError(
                f"temporal pairs need a source with 'image_t0' and 'image_t1' (e.g. xbd, "
                f"geotiff); {type(self.dataset).__name__} gives keys {sorted(item)}")
        a, b = item["image_t0"], item["image_t1"]
        valid_a, valid_b = item.get("valid_t0"), item.get("valid_t1")
        swapped = bool(self.swap_p > 0 and torch.rand(()) < self.swap_p)
        if swapped:
            a, b, valid_a, valid_b = b, a, valid_b, valid_a
        return PairSample(source_a=a, source_b=b, valid_a=valid_a, valid_b=valid_b,
                          meta=dict(item.get("meta", {}), builder="temporal", swapped=swapped))
