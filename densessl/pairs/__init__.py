"""Positive-pair builders: sample(s) → PairSample with an exact base correspondence."""

from densessl.contract import PairSample
from densessl.pairs.base import PairBuilder
from densessl.pairs.collate import collate_pairs
from densessl.pairs.correspondence import (
    flow_correspondence,
    homography_correspondence,
    identity_correspondence,
    instance_correspondence,
    pixel_grid,
)
from densessl.pairs.cut_paste import CutPastePairs
from densessl.pairs.noise import NOISE_KINDS, NoisyPairs
from densessl.pairs.registry import available_pair_builders, get_pair_builder, register_pair_builder
from densessl.pairs.same_image import SameImagePairs
from densessl.pairs.temporal import TemporalPairs
from densessl.pairs.validation import validate_pair_sample

__all__ = [
    "CutPastePairs",
    "NOISE_KINDS",
    "NoisyPairs",
    "PairBuilder",
    "PairSample",
    "SameImagePairs",
    "TemporalPairs",
    "available_pair_builders",
    "collate_pairs",
    "flow_correspondence",
    "get_pair_builder",
    "homography_correspondence",
    "identity_correspondence",
    "instance_correspondence",
    "pixel_grid",
    "register_pair_builder",
    "validate_pair_sample",
]
