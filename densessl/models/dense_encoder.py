"""The encoder pretrained by dense objectives: backbone → (FPN) → dense and global heads."""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from torch import Tensor

from densessl.models.backbones import build_backbone
from densessl.models.heads import DenseProjectionHead, GlobalProjectionHead
from densessl.models.neck import FPNNeck

_LEVEL_FOR_STRIDE = {8: "3", 16: "4", 32: "5"}


class DenseEncoder(nn.Module):
    """Backbone, optional FPN neck, a dense projection head and an optional global head.

    Args:
        backbone: a :mod:`~densessl.models.backbones` name: ``resnet18/34/50``
            (:class:`ResNetBackbone`) or ``timm:<model>`` (any timm CNN with ``features_only``,
            :class:`~densessl.models.timm_backbone.TimmBackbone`).
        in_channels: input channels.
        neck: ``"fpn"`` (dense head reads FPN level ``p{3,4,5}``) or ``"none"`` (dense head reads
            backbone level ``c{3,4,5}``).
        dense_stride: 8, 16 or 32: the stride of the dense output, picks the level.
        neck_dim: FPN channels.
        fpn_upsample: the FPN's top-down upsampling: ``"centred"`` keeps every cell where
            :mod:`densessl.cells` places it for the backbone's ``cell_alignment`` (bilinear
            ``align_corners=False`` for ``"block"``); ``"nearest"`` is torchvision's (odd cells
            take a neighbour's top-down value, one cell off).
        dense_dim, dense_hidden: dense head output / hidden channels.
        global_head: add a MoCo-v2 style head on pooled ``c5`` (Chen et al. 2020).
        global_dim, global_hidden: global head output / hidden sizes.
        pyramid: ``"all"`` computes every FPN level (for RoIAlign over ``p2..p5``);
            ``"dense"`` only the one the dense head reads (dense objectives alone need no more,
            and the skipped levels would get no gradient anyway); a list of FPN level names
            (e.g. ``["p3", "p4", "p5"]``) those plus the dense level.

    Shapes:
        ``forward(x: B×C×H×W)`` returns a dict with
        ``"dense"``: ``B×dense_dim×H/stride×W/stride`` (not normalised),
        ``"global"``: ``B×global_dim`` (only with ``global_head``),
        ``"features"``: the map the dense head read, and
        ``"pyramid"``: every level (``p2..p5`` with FPN, else ``c2..c5``), e.g. for RoIAlign
        (with ``pyramid="dense"`` and FPN only the dense level).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        in_channels: int = 3,
        neck: Literal["fpn", "none"] = "fpn",
        dense_stride: int = 8,
        neck_dim: int = 128,
        fpn_upsample: Literal["centred", "nearest"] = "centred",
        dense_dim: int = 128,
        dense_hidden: int = 256,
        global_head: bool = True,
        global_dim: int = 128,
        global_hidden: int = 512,
        pyramid: Literal["all", "dense"] | list[str] = "all",
    ) -> None:
        super().__init__()
        if neck not in ("fpn", "none"):
            raise ValueError(f"unknown neck {neck!r}; valid: ['fpn', 'none']")
        if isinstance(pyramid, str) and pyramid not in ("all", "dense"):
            raise ValueError(f"unknown pyramid {pyramid!r}; valid: 'all', 'dense' or a list "
                             f"of FPN levels such as ['p3', 'p4', 'p5']")
        if dense_stride not in _LEVEL_FOR_STRIDE:
            raise ValueError(f"dense_stride must be one of {sorted(_LEVEL_FOR_STRIDE)}")
        self.backbone = build_backbone(backbone, in_channels)
        self.neck = (FPNNeck(self.backbone.channels, neck_dim, fpn_upsample,
                             alignment=self.cell_alignment) if neck == "fpn" else None)
        prefix = "p" if self.neck is not None else "c"
        self.dense_level = prefix + _LEVEL_FOR_STRIDE[dense_stride]
        dense_in = neck_dim if self.neck is not None else self.backbone.channels[self.dense_level]
        self.dense_head = DenseProjectionHead(dense_in, dense_hidden, dense_dim)
        self.global_head = (
            GlobalProjectionHead(self.backbone.channels["c5"], global_hidden, global_dim)
            if global_head
            else None
        )
        self._stride = dense_stride
        if pyramid == "all" or self.neck is None:
            self._outputs = None
        elif pyramid == "dense":
            self._outputs = {self.dense_level}
        else:
            self._outputs = {self.dense_level, *pyramid}

    @property
    def stride(self) -> int:
        """Input pixels per cell of the dense output."""
        return self._stride

    @property
    def cell_alignment(self) -> str:
        """Where the backbone's (and so every output's) cells sit: ``"centre"`` or ``"block"``
        (:mod:`densessl.cells`); what the correspondence, the keys and RoIAlign must use."""
        return self.backbone.cell_alignment

    def forward(self, x: Tensor) -> dict[str, Tensor | dict[str, Tensor]]:
        feats = self.backbone(x)
        if self.neck is None:
            pyramid = feats
        else:
            pyramid = self.neck(feats, self._outputs)
        features = pyramid[self.dense_level]
        out: dict[str, Tensor | dict[str, Tensor]] = {
            "dense": self.dense_head(features),
            "features": features,
            "pyramid": pyramid,
        }
        if self.global_head is not None:
            out["global"] = self.global_head(feats["c5"])
        return out
