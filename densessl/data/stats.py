"""Per-band mean and standard deviation of images, over valid pixels only.

What ``augment.mean: auto`` / ``augment.std: auto`` and ``densessl data stats`` compute: the
recipe's normalisation from the data it trains on, after bit-depth scaling, with nodata,
padding and non-finite pixels left out (a nodata border of zeros would drag every mean down).
Sums are float64 so a few million pixels do not lose precision.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from densessl.errors import DataError


class BandMoments:
    """Running per-band sums of x and x² over the pixels marked valid."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: np.ndarray | None = None
        self.sum_sq: np.ndarray | None = None

    def add(self, image: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray | None
            ) -> None:
        """``image`` C×H×W (uint8 counts as /255, like the loaders' keep_uint8), ``valid``
        H×W bool or None (all valid)."""
        x = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        scale = 255.0 if x.dtype == np.uint8 else 1.0
        x = x.reshape(x.shape[0], -1).astype(np.float64) / scale
        keep = np.isfinite(x).all(0)
        if valid is not None:
            v = valid.numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid)
            keep &= v.reshape(-1).astype(bool)
        x = x[:, keep]
        if self.sum is None:
            self.sum = np.zeros(x.shape[0])
            self.sum_sq = np.zeros(x.shape[0])
        if x.shape[0] != self.sum.shape[0]:
            raise DataError(f"images with {x.shape[0]} and {self.sum.shape[0]} bands in one "
                            "dataset; every image must have data.channels bands")
        self.count += x.shape[1]
        self.sum += x.sum(1)
        self.sum_sq += (x * x).sum(1)

    def result(self, where: str = "data") -> tuple[list[float], list[float]]:
        """(mean, std) per band; no valid pixel, or a constant band, is a DataError."""
        if not self.count or self.sum is None:
            raise DataError(f"{where}: no valid pixel in the sampled images (all nodata?); "
                            "cannot compute augment.mean / augment.std")
        mean = self.sum / self.count
        var = np.maximum(self.sum_sq / self.count - mean * mean, 0.0)
        std = np.sqrt(var)
        flat = [i for i, s in enumerate(std) if s < 1e-6]
        if flat:
            raise DataError(f"{where}: band(s) {[i + 1 for i in flat]} are constant over the "
                            f"sample ({self.count} valid pixels): std 0 cannot normalise them; "
                            "drop the band (bands option) or set augment.std by hand")
        return [float(m) for m in mean], [float(s) for s in std]


def band_statistics(samples: Iterable[tuple], where: str = "data"
                    ) -> tuple[list[float], list[float], int]:
    """(mean, std, valid pixel count) over ``(image, valid)`` pairs."""
    moments = BandMoments()
    for image, valid in samples:
        moments.add(image, valid)
    mean, std = moments.result(where)
    return mean, std, moments.count
