"""The robust-positive settings shared by the objectives whose positives can be wrong (the
dense and the instance InfoNCE): ``loss.robust``, one section for both."""

from __future__ import annotations

from densessl.losses.robust import RobustPositives
from densessl.recipe import RobustConfig


def robust_positives(config: RobustConfig) -> RobustPositives:
    """:class:`RobustPositives` of the recipe's ``loss.robust``."""
    return RobustPositives(config.kind, config.rince_q, config.rince_lambda,
                           config.truncate_fraction, config.truncate_warmup_steps,
                           rank_threshold=config.rank_threshold)
