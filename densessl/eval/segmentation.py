"""Segmentation models (segmentation-models-pytorch) with a ResNet encoder from ``encoder.pt``.

smp's ResNet encoders subclass torchvision's ResNet (minus ``fc``/``avgpool``), so our exported
state dict loads into ``model.encoder`` key for key; :func:`load_encoder` insists on exactly that.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch.nn as nn
from torch import Tensor

from densessl.errors import DensesslError

ARCHS = {"unet": "Unet", "fpn": "FPN", "deeplabv3plus": "DeepLabV3Plus"}


def load_encoder(encoder: nn.Module, state: dict[str, Tensor], where: str = "encoder") -> None:
    """Strictly load a torchvision-layout ResNet state into ``encoder``; any missing or
    unexpected key (other than a classifier ``fc.*``) is a :class:`DensesslError`."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise DensesslError(f"{where}: weights do not match the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise DensesslError(f"{where}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, the "
                            f"model needs {tuple(own[bad[0]].shape)}")
    encoder.load_state_dict(state, strict=True)


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
