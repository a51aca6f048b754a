"""Encoders: backbone, FPN neck, projection heads and the momentum twin."""

from densessl.models.backbone import ResNetBackbone
from densessl.models.backbones import BackboneSpec, get_backbone_spec, list_backbones
from densessl.models.dense_encoder import DenseEncoder
from densessl.models.heads import DenseProjectionHead, GlobalProjectionHead
from densessl.models.momentum import MomentumPair, cosine_momentum
from densessl.models.neck import FPNNeck

__all__ = [
    "BackboneSpec",
    "DenseEncoder",
    "DenseProjectionHead",
    "FPNNeck",
    "GlobalProjectionHead",
    "MomentumPair",
    "ResNetBackbone",
    "cosine_momentum",
    "get_backbone_spec",
    "list_backbones",
]
