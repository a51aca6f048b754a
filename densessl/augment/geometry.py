"""Per-view geometric augmentation with kornia, keeping each view's 3×3 transform."""

from __future__ import annotations

import kornia.augmentation as K
import torch
from kornia.geometry.transform import warp_perspective
from torch import Tensor, nn


class ViewGeometry(nn.Module):
    """Random resized crop → flips → small rotation, as one kornia pipeline.

    kornia samples the parameters and composes the B×3×3 matrices (source pixel → view pixel);
    the view is then made by **one** warp of the source through the composed matrix. Chaining
    the ops instead would rotate zero padding into the crop, content the matrix says is there.
    """

    def __init__(self, view_size: int, crop_scale: tuple[float, float] = (0.2, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 vflip: float = 0.0, rotation_degrees: float = 0.0, rotation_p: float = 0.0
                 ) -> None:
        super().__init__()
        ops: list[nn.Module] = [K.RandomResizedCrop((view_size, view_size), scale=crop_scale,
                                                    ratio=crop_ratio, cropping_mode="resample")]
        if hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=hflip))
        if vflip > 0:
            ops.append(K.RandomVerticalFlip(p=vflip))
        if rotation_degrees > 0 and rotation_p > 0:
            ops.append(K.RandomRotation(degrees=rotation_degrees, p=rotation_p))
        self.pipeline = K.AugmentationSequential(*ops, data_keys=["input"])

        self.view_size = view_size

    def sample_matrices(self, images: Tensor) -> Tensor:
        """Random source → view matrices (B×3×3) for a batch of ``images`` (B×C×H×W)."""
        params = self.pipeline.forward_parameters(images.shape)
        matrix = self.pipeline.get_transformation_matrix(images, params=params, recompute=True)
        return matrix.to(device=images.device, dtype=torch.float32)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        matrix = self.sample_matrices(images)
        views = warp_perspective(images, matrix.to(images.dtype),
                                 (self.view_size, self.view_size), align_corners=True)
        return views, matrix
