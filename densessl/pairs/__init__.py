"""Positive-pair builders: sample(s) → PairSample with an exact base correspondence."""

from densessl.contract import PairSample
from densessl.pairs.base import PairBuilder
from densessl.pairs.collate import collate_pairs, identity_grid
from densessl.pairs.registry import available_pair_builders, get_pair_builder, register_pair_builder
from densessl.pairs.same_image import SameImagePairs
from densessl.pairs.validation import validate_pair_sample

__all__ = ["PairBuilder", "PairSample", "SameImagePairs", "available_pair_builders",
           "collate_pairs", "get_pair_builder", "identity_grid", "register_pair_builder",
           "validate_pair_sample"]
