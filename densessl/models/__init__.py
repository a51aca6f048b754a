"""Encoders: backbone, FPN neck, projection heads and the momentum twin."""

from densessl.models.backbone import ResNetBackbone
from densessl.models.dense_encoder import DenseEncoder
from densessl.models.heads import DenseProjectionHead, GlobalProjectionHead
from densessl.models.momentum import MomentumPair, cosine_momentum
from densessl.models.neck import FPNNeck

__all__ = [
    "DenseEncoder",
    "DenseProjectionHead",
    "FPNNeck",
    "GlobalProjectionHead",
    "MomentumPair",
    "ResNetBackbone",
    "cosine_momentum",
]
