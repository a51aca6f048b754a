"""Boxes of masks with COCO edges (a one-pixel mask at x spans [x, x + 1]; an image spans
[0, W]), the convention of every box in the pair contract (densessl/cells.py)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import masks_to_boxes


def mask_edge_boxes(masks: Tensor) -> Tensor:
    """N×H×W bool → N×4 float xyxy with COCO edges; an empty mask gives ``[0, 0, 0, 0]``.

    :func:`torchvision.ops.masks_to_boxes` gives the last pixel's index as x2 / y2, one less
    than its far edge, hence the ``+ 1``.
    """
    boxes = masks_to_boxes(masks)
    filled = masks.flatten(1).any(1) if masks.numel() else masks.new_zeros(0, dtype=torch.bool)
    return (boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])) * filled[:, None]
