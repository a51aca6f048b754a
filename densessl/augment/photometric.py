"""Per-view photometric augmentation with kornia, for any number of channels.

RGB-only operations (hue, saturation, grayscale) need exactly three channels. For other channel
counts (multispectral, X-ray dual energy, SAR) the recipe switch ``non_rgb`` decides:

* ``"per_channel"``: brightness and contrast are jittered with an independent factor per band
  (a spectral jitter), blur and solarize as usual;
* ``"skip"``: colour jitter is skipped, only blur and solarize are applied.
"""

from __future__ import annotations

import kornia.augmentation as K
from torch import Tensor, nn


class ViewPhotometry(nn.Module):
    def __init__(self, channels: int, jitter_p: float = 0.8, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
                 grayscale_p: float = 0.2, blur_p: float = 0.5, blur_sigma=(0.1, 2.0),
                 blur_kernel: int = 9, solarize_p: float = 0.0, non_rgb: str = "per_channel"
                 ) -> None:
        super().__init__()
        if non_rgb not in ("per_channel", "skip"):
            raise ValueError(f"augment.non_rgb must be 'per_channel' or 'skip', got {non_rgb!r}")
        self.channels = channels
        self.per_band: nn.Module | None = None
        colour: list[nn.Module] = []
        if channels == 3:
            if jitter_p > 0:
                colour.append(K.ColorJitter(brightness, contrast, saturation, hue, p=jitter_p))
            if grayscale_p > 0:
                colour.append(K.RandomGrayscale(p=grayscale_p))
        elif non_rgb == "per_channel" and jitter_p > 0:
            # Applied on a (B*C)×1×H×W view so every band gets its own factors.
            self.per_band = K.AugmentationSequential(
                K.ColorJitter(brightness, contrast, 0.0, 0.0, p=jitter_p), data_keys=["input"])
        common: list[nn.Module] = []
        if blur_p > 0:
            common.append(K.RandomGaussianBlur((blur_kernel, blur_kernel), blur_sigma, p=blur_p))
        if solarize_p > 0:
            common.append(K.RandomSolarize(thresholds=0.1, additions=0.0, p=solarize_p))
        ops = colour + common
        self.pipeline = K.AugmentationSequential(*ops, data_keys=["input"]) if ops else None

    def forward(self, views: Tensor) -> Tensor:
        if self.per_band is not None:
            b, c, h, w = views.shape
            views = self.per_band(views.reshape(b * c, 1, h, w)).reshape(b, c, h, w)
        if self.pipeline is not None:
            views = self.pipeline(views)
        return views.clamp(0.0, 1.0)
