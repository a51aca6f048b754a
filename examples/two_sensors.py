"""Two sensors of one place: an optical image (3 bands) paired with a co-registered SAR-like
image (1 band). Run: ``densessl pretrain examples/two_sensors.yaml --out runs/two_sensors``.

Design: one shared encoder whose first convolution sees the union of bands (3 optical + 1 SAR).
Each view fills its own bands and leaves the other modality's bands at zero. A convolution is
linear in its input channels, so that first conv *is* two per-modality stems whose outputs are
summed: each sensor gets its own stem weights, the trunk is shared, and the PairBatch contract
(same channel count in both views) holds without a second encoder.
"""

import torch

from densessl.contract import PairSample
from densessl.pairs import PairBuilder, register_pair_builder


@register_pair_builder("two_sensors")
class TwoSensorPairs(PairBuilder):
    """View A: optical bands + zero SAR band. View B: zero optical bands + SAR band."""

    def __init__(self, dataset, looks: int = 4, seed: int = 0):
        self.dataset, self.looks, self.seed = dataset, looks, seed

    def __len__(self):
        return len(self.dataset)

    def sar(self, labels: torch.Tensor, index: int) -> torch.Tensor:
        # Backscatter depends on the surface (class) and carries multiplicative speckle
        # (the mean of `looks` exponential draws); same pixel grid as the optical image.
        gen = torch.Generator().manual_seed(self.seed * 7919 + index)
        backscatter = torch.tensor([0.15, 0.8, 0.35, 0.6, 0.9])[labels.clamp(0, 4)]
        speckle = -torch.log(torch.rand(self.looks, *labels.shape, generator=gen)).mean(0)
        return (backscatter * speckle).clamp(0, 1)[None]

    def build(self, index: int) -> PairSample:
        item = self.dataset[index]
        optical, sar = item["image"], self.sar(item["mask"], index)
        view_a = torch.cat([optical, torch.zeros_like(sar)])
        view_b = torch.cat([torch.zeros_like(optical), sar])
        # Co-registered sensors: identity base correspondence (base_grid=None).
        return PairSample(source_a=view_a, source_b=view_b,
                          meta={"modalities": ["optical", "sar"], "index": index})
