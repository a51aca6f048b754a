"""Faster R-CNN / Mask R-CNN (torchvision) on a ResNet-FPN backbone from ``encoder.pt``.

torchvision's ``BackboneWithFPN`` wraps the ResNet as ``body`` (torchvision keys, no ``fc``)
and the pyramid as ``fpn`` (a ``FeaturePyramidNetwork``, the same module our pretraining neck
wraps), so both the encoder and, optionally, the pretrained neck load key for key.
"""

from __future__ import annotations

import torch.nn as nn
import torchvision
from torch import Tensor
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from densessl.errors import DensesslError
from densessl.eval.segmentation import load_encoder
from densessl.models.backbone import _CHANNELS

ARCHS = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}


def build_fpn_backbone(backbone: str, in_channels: int, fpn_dim: int = 128,
                       encoder_state: dict[str, Tensor] | None = None,
                       neck_state: dict[str, Tensor] | None = None) -> BackboneWithFPN:
    """ResNet (+FPN over c2..c5 and a max-pooled p6) for torchvision detectors.

    Trainable BatchNorm rather than torchvision's default FrozenBatchNorm2d: frozen statistics
    are meaningless for the random init, and every init must be fine-tuned the same way.

    Shapes:
        ``forward(x: B×C×H×W) -> {"0": …H/4, "1": …H/8, "2": …H/16, "3": …H/32, "pool": …H/64}``,
        each with ``fpn_dim`` channels.
    """
    net = getattr(torchvision.models, backbone)(weights=None, norm_layer=nn.BatchNorm2d)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model = BackboneWithFPN(net, return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
                            in_channels_list=list(_CHANNELS[backbone]), out_channels=fpn_dim,
                            extra_blocks=LastLevelMaxPool())
    if encoder_state is not None:
        load_encoder(model.body, encoder_state, "detection backbone")
    if neck_state is not None:
        # FPNNeck keeps torchvision's FeaturePyramidNetwork as ``fpn``: strip that prefix.
        fpn = {k.removeprefix("fpn."): v for k, v in neck_state.items()}
        load_encoder(model.fpn, fpn, "detection FPN neck (recipe model.neck_dim must equal "
                     "the pretrained neck's channels)")
    return model


def build_detector(arch: str, backbone: str, in_channels: int, num_classes: int,
                   image_size: int, mean: list[float], std: list[float], fpn_dim: int = 128,
                   encoder_state: dict[str, Tensor] | None = None,
                   neck_state: dict[str, Tensor] | None = None) -> nn.Module:
    """A torchvision detector sized for small images on CPU.

    Args:
        arch: ``"faster_rcnn"`` or ``"mask_rcnn"``.
        num_classes: object classes K (the background class is added here).
        image_size: images are used at this size (``min_size = max_size``, no resizing).
        mean, std: per-channel input normalisation — the pretraining one, so the encoder sees
            inputs distributed as during pretraining.

    Usage follows torchvision: ``model(images, targets)`` → loss dict in train mode,
    ``model(images)`` → ``[{"boxes", "labels", "scores"(, "masks")}]`` in eval mode.
    """
    if arch not in ARCHS:
        raise DensesslError(f"unknown detection architecture {arch!r}; valid: {sorted(ARCHS)}")
    body = build_fpn_backbone(backbone, in_channels, fpn_dim, encoder_state, neck_state)
    # Anchors scaled to the image: the default 32..512 px anchors never match objects in
    # 64-128 px images.
    base = max(4, image_size // 16)
    anchors = AnchorGenerator(sizes=tuple((base * 2**i,) for i in range(5)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    return ARCHS[arch](
        body, num_classes=num_classes + 1, min_size=image_size, max_size=image_size,
        image_mean=list(mean), image_std=list(std), rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64, box_batch_size_per_image=64, box_detections_per_img=50)
