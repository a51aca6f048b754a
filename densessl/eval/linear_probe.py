"""Linear probe: a frozen encoder and a 1×1 convolution per pixel — a cheap dense signal."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from densessl.eval.segmentation import load_encoder
from densessl.models.backbone import ResNetBackbone


class LinearProbe(nn.Module):
    """Frozen ResNet; a 1×1 conv classifies the concatenated levels (stride 8 by default).

    Concatenating c3..c5 (a hypercolumn) lets the probe use mid-level and semantic features at
    once; a BatchNorm without affine parameters in front equalises feature scales across inits
    (random and pretrained features differ by orders of magnitude), as in MAE's linear probe.
    It is still a linear map of the frozen features at inference.

    Args:
        backbone, in_channels: the encoder architecture.
        num_classes: output classes including background.
        encoder_state: torchvision-layout ResNet weights (``None``: random, frozen).
        levels: backbone levels fed to the head.

    Shapes:
        ``forward(x: B×C×H×W) -> B×num_classes×H×W`` logits (bilinearly upsampled).
    """

    def __init__(self, backbone: str, in_channels: int, num_classes: int,
                 encoder_state: dict[str, Tensor] | None = None,
                 levels: tuple[str, ...] = ("c3", "c4", "c5")) -> None:
        super().__init__()
        self.encoder = ResNetBackbone(backbone, in_channels)
        if encoder_state is not None:
            load_encoder(self.encoder, encoder_state, "linear probe encoder")
        self.encoder.requires_grad_(False)
        self.levels = levels
        dim = sum(self.encoder.channels[k] for k in levels)
        self.norm = nn.BatchNorm2d(dim, affine=False)
        self.head = nn.Conv2d(dim, num_classes, kernel_size=1)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen means frozen BN statistics too
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            feats = self.encoder(x)
        size = feats[self.levels[0]].shape[-2:]  # the finest requested level
        stacked = torch.cat([F.interpolate(feats[k], size=size, mode="bilinear",
                                           align_corners=False) for k in self.levels], dim=1)
        logits = self.head(self.norm(stacked))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
