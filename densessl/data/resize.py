"""Resize an image and its label maps with one filter on one sampling grid.

Images are resized bilinearly on pixel centres (``align_corners=False``, antialiased when
shrinking). A nearest-neighbour resize of the labels does not match that: ``nearest`` reads
input pixel ``floor(i·s)`` for output pixel ``i`` (``s`` = input / output size), half an output
pixel's worth left of the bilinear sample point ``(i + 0.5)·s − 0.5`` — labels shift by
+0.25 px at 128→64 and +0.40 px at 160→64. ``nearest-exact`` removes that at 160→64 but not at
even factors: at 128→64 the sample point falls exactly between two input pixels and the
tie-break shifts every label by −0.25 px.

So labels go through the same filter as the image: each label value becomes a coverage map,
resized like the image, and each output pixel takes the value with the largest coverage. A
boundary then sits where the image's edge is; an exact 50/50 tie goes to the lower value
(background 0 before the classes), the same on both sides of an object, so objects do not move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """C×H×W image → C×size float, bilinear on pixel centres, antialiased when shrinking."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None].float(), size=tuple(size), mode="bilinear",
                         align_corners=False, antialias=True)[0]


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a label map like :func:`resize_image` resizes its image.

    Args:
        labels: H×W integer label map (any values, e.g. an ignore index), or H×W / N×H×W bool
            masks (instance or nodata masks; each mask is resized on its own).
        size: (height, width) of the output.

    Returns the same dtype: per pixel the label with the largest resized coverage (ties to the
    lower value), or for masks coverage > 0.5.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    if labels.dtype == torch.bool:
        if labels.ndim not in (2, 3):
            raise ValueError(f"resize_labels: expected H×W or N×H×W masks, got shape "
                             f"{tuple(labels.shape)}")
        flat = labels[None] if labels.ndim == 2 else labels
        if flat.shape[0] == 0:
            return torch.zeros(0, *size, dtype=torch.bool)
        out = resize_image(flat.float(), size) > 0.5
        return out[0] if labels.ndim == 2 else out
    if labels.ndim != 2 or labels.is_floating_point():
        raise ValueError(f"resize_labels: expected an H×W integer label map or bool masks, got "
                         f"shape {tuple(labels.shape)} dtype {labels.dtype}")
    values, index = torch.unique(labels, return_inverse=True)
    coverage = torch.zeros(len(values), *labels.shape)
    coverage.scatter_(0, index[None], 1.0)
    return values[resize_image(coverage, size).argmax(0)]  # argmax: first (lowest) on ties
