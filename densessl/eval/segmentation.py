"""Segmentation models (segmentation-models-pytorch) with an encoder from ``encoder.pt``.

smp's ResNet encoders subclass torchvision's ResNet (minus ``fc``/``avgpool``), so our exported
state dict loads into ``model.encoder`` key for key; :func:`densessl.models.weights.load_encoder`
insists on exactly that. A ``timm:<name>`` backbone becomes smp's ``tu-<name>`` encoder, which
holds the same timm ``features_only`` model under ``model.`` (the backbone's ``smp_encoder`` and
``to_smp_state`` in :mod:`densessl.models.backbones`).
"""

from __future__ import annotations

import functools

import segmentation_models_pytorch as smp
import torch.nn as nn
from torch import Tensor

from densessl.errors import DensesslError, RecipeError
from densessl.models.backbones import get_backbone_spec
from densessl.models.weights import load_encoder

ARCHS = {"unet": "Unet", "fpn": "FPN", "deeplabv3plus": "DeepLabV3Plus"}


def build_segmentation_model(arch: str, backbone: str, in_channels: int, num_classes: int,
                             encoder_state: dict[str, Tensor] | None = None) -> nn.Module:
    """An smp model whose encoder starts from ``encoder_state`` (random when ``None``).

    Args:
        arch: ``"unet"``, ``"fpn"`` or ``"deeplabv3plus"``.
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"timm:<name>"``.
        in_channels: input bands (any count).
        num_classes: output classes including background.

    Shapes:
        ``model(x: B×in_channels×H×W) -> B×num_classes×H×W`` logits; H, W multiples of 32
        (16 would do for DeepLabV3+).
    """
    if arch not in ARCHS:
        raise DensesslError(f"unknown segmentation architecture {arch!r}; valid: {sorted(ARCHS)}")
    spec = get_backbone_spec(backbone)
    try:
        model = getattr(smp, ARCHS[arch])(encoder_name=spec.smp_encoder,
                                          encoder_weights=None, in_channels=in_channels,
                                          classes=num_classes)
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:
        if spec.family != "timm":  # smp's own ResNet encoders always build
            raise
        # e.g. DeepLabV3+ asks timm for output_stride=16, which not every model supports
        raise DensesslError(f"segmentation {arch}: smp cannot build encoder "
                            f"{spec.smp_encoder!r} for model.backbone {backbone} "
                            f"({type(exc).__name__}: {exc}); choose another "
                            "finetune.segmentation_archs") from None
    if encoder_state is not None:
        load_encoder(model.encoder, spec.to_smp_state(encoder_state), f"{arch} encoder")
    return model


@functools.cache
def _input_rule(arch: str, backbone: str, in_channels: int) -> tuple[bool, int]:
    """(requires_divisible_input_shape, encoder.output_stride) of the model smp builds: read
    off a real model, once per kind (a sweep checks every cell)."""
    model = build_segmentation_model(arch, backbone, in_channels, 2)
    return bool(model.requires_divisible_input_shape), int(model.encoder.output_stride)


def check_input_size(recipe) -> None:
    """Refuse, before any pretraining, a ``finetune.image_size`` that a chosen smp architecture
    would reject on its first forward pass: smp's own condition (``check_input_shape``: models
    with ``requires_divisible_input_shape`` need sides divisible by ``encoder.output_stride``),
    read off the models the recipe will build. The supervised init trains an FPN."""
    cfg = recipe.finetune
    archs = list(cfg.segmentation_archs) if "segmentation" in cfg.tasks else []
    if "supervised" in cfg.inits:
        archs.append("fpn")
    for arch in dict.fromkeys(archs):
        divisible, stride = _input_rule(arch, recipe.model.backbone, recipe.data.channels)
        if divisible and cfg.image_size % stride:
            lower, upper = cfg.image_size // stride * stride, -(-cfg.image_size // stride) * stride
            what = (f"segmentation_archs {arch}" if arch in cfg.segmentation_archs and
                    "segmentation" in cfg.tasks else "the supervised init's fpn")
            raise RecipeError(f"finetune.image_size: {cfg.image_size} is not a multiple of "
                              f"{stride}, which {what} ({recipe.model.backbone}, "
                              f"segmentation-models-pytorch) needs; use "
                              f"{max(lower, stride)} or {upper}")
