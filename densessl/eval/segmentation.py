"""Segmentation models (segmentation-models-pytorch) with a ResNet encoder from ``encoder.pt``.

smp's ResNet encoders subclass torchvision's ResNet (minus ``fc``/``avgpool``), so our exported
state dict loads into ``model.encoder`` key for key; :func:`densessl.models.weights.load_encoder`
insists on exactly that.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch.nn as nn
from torch import Tensor

from densessl.errors import DensesslError
from densessl.models.weights import load_encoder

ARCHS = {"unet": "Unet", "fpn": "FPN", "deeplabv3plus": "DeepLabV3Plus"}


def build_segmentation_model(arch: str, backbone: str, in_channels: int, num_classes: int,
                             encoder_state: dict[str, Tensor] | None = None) -> nn.Module:
    """An smp model whose encoder starts from ``encoder_state`` (random when ``None``).

    Args:
        arch: ``"unet"``, ``"fpn"`` or ``"deeplabv3plus"``.
        backbone: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        in_channels: input bands (any count).
        num_classes: output classes including background.

    Shapes:
        ``model(x: B×in_channels×H×W) -> B×num_classes×H×W`` logits; H, W multiples of 32
        (16 would do for DeepLabV3+).
    """
    if arch not in ARCHS:
        raise DensesslError(f"unknown segmentation architecture {arch!r}; valid: {sorted(ARCHS)}")
    model = getattr(smp, ARCHS[arch])(encoder_name=backbone, encoder_weights=None,
                                      in_channels=in_channels, classes=num_classes)
    if encoder_state is not None:
        load_encoder(model.encoder, encoder_state, f"{arch} encoder")
    return model
