"""InsLoc's box head as torchvision's ``FastRCNNConvFCHead``: its construction parameters as
plain data, so pretraining can record them next to ``box_head.pt`` and a detector can rebuild
the same head and load it key for key."""

from __future__ import annotations

import math

import torch.nn as nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops.misc import Conv2dNormActivation

# Normalisation layers a spec may name (torchvision's 4conv-1fc head uses BatchNorm).
_NORMS = {"BatchNorm2d": nn.BatchNorm2d, None: None}


def conv_fc_head_spec(head: FastRCNNConvFCHead) -> dict:
    """``{"input_size": [C, S, S], "conv_layers": [...], "fc_layers": [...], "norm_layer":
    "BatchNorm2d" | None}``: the arguments that rebuild ``head`` (read off its modules)."""
    if not isinstance(head, FastRCNNConvFCHead):
        raise TypeError(f"expected a torchvision FastRCNNConvFCHead, got {type(head).__name__}")
    convs = [m for m in head if isinstance(m, Conv2dNormActivation)]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("box head without a fully connected layer")
    channels = convs[-1][0].out_channels if convs else None
    in_channels = convs[0][0].in_channels if convs else None
    norm = None
    if convs and isinstance(convs[0][1], nn.BatchNorm2d):  # SplitBatchNorm is one too
        norm = "BatchNorm2d"
    elif convs and not isinstance(convs[0][1], nn.ReLU):
        raise ValueError(f"box head normalisation {type(convs[0][1]).__name__} is not "
                         f"one of {[k for k in _NORMS if k]}")
    if channels is None:  # fc-only head: the first Linear sees C·S·S; C is unknown
        raise ValueError("box head without convolutions: its input size cannot be recovered")
    side = math.isqrt(linears[0].in_features // channels)
    if side * side * channels != linears[0].in_features:
        raise ValueError(f"box head: first fc takes {linears[0].in_features} features, not "
                         f"{channels}×S×S for a square RoI")
    return {"input_size": [in_channels, side, side],
            "conv_layers": [m[0].out_channels for m in convs],
            "fc_layers": [m.out_features for m in linears], "norm_layer": norm}


def build_conv_fc_head(spec: dict, where: str = "box head") -> FastRCNNConvFCHead:
    """The ``FastRCNNConvFCHead`` a :func:`conv_fc_head_spec` describes (fresh weights)."""
    try:
        c, h, w = (int(v) for v in spec["input_size"])
        convs = [int(v) for v in spec["conv_layers"]]
        fcs = [int(v) for v in spec["fc_layers"]]
        norm = spec.get("norm_layer")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: spec {spec!r} is not input_size [C, H, W], conv_layers, "
                         f"fc_layers, norm_layer ({exc})") from None
    if norm not in _NORMS:
        raise ValueError(f"{where}: norm_layer {norm!r}; valid: {list(_NORMS)}")
    if not fcs:
        raise ValueError(f"{where}: fc_layers is empty")
    return FastRCNNConvFCHead((c, h, w), convs, fcs, norm_layer=_NORMS[norm])
