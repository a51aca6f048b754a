"""ResNet backbone exposing C2..C5 feature maps (He et al. 2016, "Deep Residual Learning")."""

from __future__ import annotations

import torch.nn as nn
import torchvision
from torch import Tensor

from densessl.models.levels import LEVEL_STRIDES, LEVELS

#: output channels of stages C2..C5 per backbone (what an FPN over them is built for)
STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc`` returning multi-scale feature maps.

    The stem and stages are held as attributes with torchvision's names (``conv1``, ``bn1``,
    ``layer1`` … ``layer4``) so ``state_dict()`` uses torchvision's key layout: exported weights
    load into ``torchvision.models.resnetXX()`` (and smp / detection encoders built on it) with
    only ``fc.*`` missing.

    Args:
        name: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``; randomly initialised.
        in_channels: input channels; when not 3 the first conv is replaced (multispectral,
            multi-date stacks, single-channel X-ray).

    Shapes:
        ``forward(x: B×in_channels×H×W) -> {"c2": B×C2×H/4×W/4, "c3": …H/8, "c4": …H/16,
        "c5": …H/32}`` with ``self.channels`` giving C2..C5.
    """

    strides = dict(LEVEL_STRIDES)
    #: every strided layer pads symmetrically: stride-s cell i on pixel s·i (densessl.cells)
    cell_alignment = "centre"

    def __init__(self, name: str = "resnet18", in_channels: int = 3) -> None:
        super().__init__()
        if name not in STAGE_CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; valid: {sorted(STAGE_CHANNELS)}")
        net = getattr(torchvision.models, name)(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.name = name
        self.in_channels = in_channels
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.channels: dict[str, int] = dict(zip(LEVELS, STAGE_CHANNELS[name]))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}


def resnet_reference_state(name: str, in_channels: int) -> dict[str, Tensor]:
    """Key → tensor of a randomly initialised torchvision ResNet without ``fc``: the key layout
    (and shapes) of ``encoder.pt`` for ``name`` with ``in_channels`` inputs."""
    net = getattr(torchvision.models, name)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
