"""Faster R-CNN / Mask R-CNN (torchvision) on a ResNet-FPN backbone from ``encoder.pt``
(a ``timm:`` backbone goes under the same FPN through :class:`EncoderWithFPN`).

What pretraining wrote with a counterpart in the detector loads key for key:

* ``encoder.pt`` → the backbone ``body`` (torchvision's ``BackboneWithFPN``, ResNet keys);
* ``neck.pt`` → the pyramid ``fpn``: a :class:`CentredFeaturePyramidNetwork`, torchvision's FPN
  with the pretraining neck's top-down upsampling, so it computes what was pretrained;
* ``box_head.pt`` → ``roi_heads.box_head``: InsLoc's 4conv-1fc ``FastRCNNConvFCHead``, rebuilt
  from its recorded construction parameters.

The RPN and the box predictor (and Mask R-CNN's mask branch) have no counterpart and start
fresh. :func:`detector_groups` names these parameter groups; the built model's
``loaded_groups`` says which of them were loaded (wholly or in part).

``neck.pt`` / ``box_head.pt`` may hold only some of their modules: pretraining records which
ones ever received a gradient (``encoder.json`` ``trained_modules``) and the detector loads
only those (densessl.eval.finetune.detection_start); the others keep the detector's own init.
:func:`detector_modules` names the parameters module by module (the FPN's ``fpn.inner_blocks.0``
…), and the built model's ``loaded_modules`` says which of those were loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch.nn as nn
import torchvision
from torch import Tensor
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from densessl.errors import DensesslError
from densessl.models.backbones import get_backbone_spec
from densessl.models.box_head import build_conv_fc_head
from densessl.models.levels import LEVELS
from densessl.models.neck import CentredFeaturePyramidNetwork
from densessl.models.trained_modules import load_units, module_units
from densessl.models.weights import load_encoder

ARCHS = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}
FPN_LEVELS = ["0", "1", "2", "3"]  # BackboneWithFPN's names for p2..p5 (p6 is "pool")


def build_fpn_backbone(backbone: str, in_channels: int, fpn_dim: int = 128,
                       encoder_state: dict[str, Tensor] | None = None,
                       neck_state: dict[str, Tensor] | None = None,
                       fpn_upsample: Literal["centred", "nearest"] = "centred"
                       ) -> BackboneWithFPN:
    """ResNet (+FPN over c2..c5 and a max-pooled p6) for torchvision detectors.

    Trainable BatchNorm rather than torchvision's default FrozenBatchNorm2d: frozen statistics
    are meaningless for the random init, and every init must be fine-tuned the same way.

    Args:
        fpn_upsample: the FPN's top-down upsampling; must be the pretrained neck's
            (``model.fpn_upsample``), or the loaded weights compute something else.

    Shapes:
        ``forward(x: B×C×H×W) -> {"0": …H/4, "1": …H/8, "2": …H/16, "3": …H/32, "pool": …H/64}``,
        each with ``fpn_dim`` channels.

    ``neck_state`` may hold some of the FPN's modules only (whole modules,
    :func:`~densessl.models.trained_modules.module_units`); the others keep their fresh init.

    The returned module's ``loaded_groups`` lists ``"backbone"`` / ``"fpn"`` when (any of it
    is) loaded, ``loaded_modules`` the loaded ``"backbone"`` and ``"fpn.<module>"``.
    """
    spec = get_backbone_spec(backbone)
    if spec.family != "torchvision":  # torchvision cannot build it: our backbone under the FPN
        return _timm_fpn_backbone(backbone, in_channels, fpn_dim, encoder_state, neck_state,
                                  fpn_upsample)
    net = getattr(torchvision.models, spec.model_name)(weights=None, norm_layer=nn.BatchNorm2d)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    channels = [spec.channels[k] for k in LEVELS]
    model = BackboneWithFPN(net, return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
                            in_channels_list=channels, out_channels=fpn_dim,
                            extra_blocks=LastLevelMaxPool())
    # torchvision's FPN upsamples top-down with nearest; the pretraining neck may not.
    model.fpn = CentredFeaturePyramidNetwork(channels, fpn_dim, extra_blocks=LastLevelMaxPool(),
                                             upsample=fpn_upsample)
    _load_body(model, encoder_state, neck_state)
    return model


def _load_body(model: nn.Module, encoder_state: dict[str, Tensor] | None,
               neck_state: dict[str, Tensor] | None) -> None:
    """Load the backbone and the FPN modules ``neck_state`` has; set ``loaded_groups`` /
    ``loaded_modules``."""
    model.loaded_groups, model.loaded_modules = [], []
    if encoder_state is not None:
        load_encoder(model.body, encoder_state, "detection backbone")
        model.loaded_groups.append("backbone")
        model.loaded_modules.append("backbone")
    if neck_state is not None:
        # FPNNeck keeps the FeaturePyramidNetwork as ``fpn``: strip that prefix.
        fpn = {k.removeprefix("fpn."): v for k, v in neck_state.items()}
        loaded = load_units(model.fpn, fpn, "detection FPN neck (recipe model.neck_dim must "
                            "equal the pretrained neck's channels)")
        if loaded:
            model.loaded_groups.append("fpn")
            model.loaded_modules.extend(f"fpn.{u}" for u in loaded)


class EncoderWithFPN(nn.Module):
    """Our ``c2..c5`` backbone under an FPN, with the interface torchvision's detectors read
    off ``BackboneWithFPN`` (``body``, ``fpn``, ``out_channels``): how a ``timm:`` backbone,
    which torchvision cannot build, becomes a detection backbone.

    Shapes:
        ``forward(x: B×C×H×W) -> {"0": …H/4, "1": …H/8, "2": …H/16, "3": …H/32, "pool": …H/64}``.
    """

    def __init__(self, body: nn.Module, fpn: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body, self.fpn, self.out_channels = body, fpn, out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((name, feats[level]) for name, level in
                                    zip(FPN_LEVELS, LEVELS)))


def _timm_fpn_backbone(backbone: str, in_channels: int, fpn_dim: int,
                       encoder_state: dict[str, Tensor] | None,
                       neck_state: dict[str, Tensor] | None,
                       fpn_upsample: Literal["centred", "nearest"]) -> EncoderWithFPN:
    """:func:`build_fpn_backbone` for ``timm:<name>``: the pretraining backbone itself (so
    ``encoder.pt`` loads key for key) under the same FPN + max-pooled p6. Its BatchNorm
    stays trainable, as for ResNets; LayerNorm models (ConvNeXt) have none. The FPN's
    ``centred`` upsampling follows the backbone's ``cell_alignment``, as the pretraining neck's
    did (bilinear for ConvNeXt's ``block`` cells)."""
    body = get_backbone_spec(backbone).build(in_channels)
    channels = [body.channels[k] for k in LEVELS]
    fpn = CentredFeaturePyramidNetwork(channels, fpn_dim, extra_blocks=LastLevelMaxPool(),
                                       upsample=fpn_upsample, alignment=body.cell_alignment)
    model = EncoderWithFPN(body, fpn, fpn_dim)
    _load_body(model, encoder_state, neck_state)
    return model


def build_detector(arch: str, backbone: str, in_channels: int, num_classes: int,
                   image_size: int, mean: list[float], std: list[float], fpn_dim: int = 128,
                   encoder_state: dict[str, Tensor] | None = None,
                   neck_state: dict[str, Tensor] | None = None,
                   fpn_upsample: Literal["centred", "nearest"] = "centred",
                   box_head_spec: dict | None = None,
                   box_head_state: dict[str, Tensor] | None = None) -> nn.Module:
    """A torchvision detector sized for small images on CPU.

    Args:
        arch: ``"faster_rcnn"`` or ``"mask_rcnn"``.
        num_classes: object classes K (the background class is added here).
        image_size: images are used at this size (``min_size = max_size``, no resizing).
        mean, std: per-channel input normalisation — the pretraining one, so the encoder sees
            inputs distributed as during pretraining.
        encoder_state, neck_state: ``encoder.pt`` / ``neck.pt`` contents (``None``: fresh).
        fpn_upsample: top-down upsampling of the FPN (see :func:`build_fpn_backbone`).
        box_head_spec: construction parameters of a ``FastRCNNConvFCHead`` box head
            (:func:`densessl.models.box_head.conv_fc_head_spec`, ``encoder.json``'s
            ``box_head``); ``None``: torchvision's default two-layer MLP head.
        box_head_state: ``box_head.pt`` contents for that head (needs ``box_head_spec``);
            like ``neck_state`` it may hold some of the head's modules only.

    Usage follows torchvision: ``model(images, targets)`` → loss dict in train mode,
    ``model(images)`` → ``[{"boxes", "labels", "scores"(, "masks")}]`` in eval mode.
    ``model.loaded_groups`` lists the :func:`detector_groups` that were loaded (wholly or in
    part), ``model.loaded_modules`` the :func:`detector_modules` that were.
    """
    if arch not in ARCHS:
        raise DensesslError(f"unknown detection architecture {arch!r}; valid: {sorted(ARCHS)}")
    if box_head_state is not None and box_head_spec is None:
        raise DensesslError("detection box head: weights given without their construction "
                            "parameters (encoder.json 'box_head')")
    body = build_fpn_backbone(backbone, in_channels, fpn_dim, encoder_state, neck_state,
                              fpn_upsample)
    # Anchors scaled to the image: the default 32..512 px anchors never match objects in
    # 64-128 px images. image_size / 8 per level (12..192 px at 96 px, p2..p6): with / 16
    # (6 px on p2) half the PIDray-sized objects (8..43 px) had no anchor at IoU 0.5 and the
    # supervised detector reached AP50 0.47 at 150 steps, 0.74 with / 8 (issue 25, item 4;
    # tests/eval/test_finetune_learns.py).
    base = max(4, image_size // 8)
    anchors = AnchorGenerator(sizes=tuple((base * 2**i,) for i in range(5)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    heads: dict = {"num_classes": num_classes + 1}
    if box_head_spec is not None:
        try:
            box_head = build_conv_fc_head(box_head_spec, "detection box head")
        except ValueError as exc:
            raise DensesslError(str(exc)) from None
        c, side, _ = box_head_spec["input_size"]
        if c != fpn_dim:
            raise DensesslError(f"detection box head takes {c}-channel RoIs but the FPN has "
                                f"{fpn_dim} (recipe model.neck_dim)")
        loaded_head = []
        if box_head_state is not None:
            loaded_head = load_units(box_head, box_head_state,
                                     "detection box head (box_head.pt)")
        # RoIs pooled at the side the head was built for; the predictor reads its last fc.
        heads = {"num_classes": None, "box_head": box_head,
                 "box_roi_pool": MultiScaleRoIAlign(FPN_LEVELS, int(side), sampling_ratio=2),
                 "box_predictor": FastRCNNPredictor(box_head_spec["fc_layers"][-1],
                                                    num_classes + 1)}
        if arch == "mask_rcnn":
            # num_classes=None (the box predictor is given) reaches the default mask predictor
            # too; build torchvision's default (256-channel mask head) with the class count.
            heads["mask_predictor"] = MaskRCNNPredictor(256, 256, num_classes + 1)
    model = ARCHS[arch](
        body, min_size=image_size, max_size=image_size,
        image_mean=list(mean), image_std=list(std), rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64, box_batch_size_per_image=64, box_detections_per_img=50,
        **heads)
    model.loaded_groups = list(body.loaded_groups)
    model.loaded_modules = list(body.loaded_modules)
    if box_head_state is not None and loaded_head:
        model.loaded_groups.append("box_head")
        whole = loaded_head == list(module_units(model.roi_heads.box_head))
        model.loaded_modules.extend(["box_head"] if whole else
                                    [f"box_head.{u}" for u in loaded_head])
    return model


def detector_groups(model: nn.Module) -> dict[str, nn.Module]:
    """The detector's parameter groups by what they are, from input to output: ``backbone``,
    ``fpn``, ``rpn``, ``box_head``, ``box_predictor`` (+ ``mask_head``, ``mask_predictor``)."""
    roi = model.roi_heads
    groups = {"backbone": model.backbone.body, "fpn": model.backbone.fpn, "rpn": model.rpn,
              "box_head": roi.box_head, "box_predictor": roi.box_predictor}
    if roi.has_mask():
        groups.update(mask_head=roi.mask_head, mask_predictor=roi.mask_predictor)
    return groups


def detector_modules(model: nn.Module) -> dict[str, nn.Module]:
    """:func:`detector_groups` with the FPN module by module (``fpn.inner_blocks.0`` …
    ``fpn.layer_blocks.3``, :func:`~densessl.models.trained_modules.module_units`), and the box
    head too (``box_head.0`` …) when the model loaded only some of it: the granularity at which
    weights are loaded or start fresh (``model.loaded_modules``)."""
    loaded = getattr(model, "loaded_modules", [])
    out: dict[str, nn.Module] = {}
    for group, module in detector_groups(model).items():
        split = group == "fpn" or any(n.startswith(group + ".") for n in loaded)
        if split:
            out.update({f"{group}.{u}": m for u, m in module_units(module).items()})
        else:
            out[group] = module
    return out
