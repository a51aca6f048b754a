"""The robust-positive settings shared by the objectives whose positives can be wrong."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from densessl.losses.robust import RobustPositives
from densessl.recipe import ObjectiveConfig


class RobustObjectiveConfig(ObjectiveConfig):
    """An objective config with the robust-positive settings (``loss.robust`` and friends:
    densessl.losses.robust)."""

    ROBUST_FLAT: ClassVar[dict[str, str]] = {
        "robust": "robust", "rince_q": "rince_q", "rince_lambda": "rince_lambda",
        "truncate_fraction": "truncate_fraction",
        "truncate_warmup_steps": "truncate_warmup_steps", "rank_threshold": "rank_threshold"}
    robust: Literal["none", "rince", "truncate", "rank"] = "none"
    rince_q: float = Field(0.5, gt=0, le=1)
    rince_lambda: float = Field(0.01, gt=0, le=1)
    truncate_fraction: float = Field(0.1, ge=0, lt=1)
    truncate_warmup_steps: int = Field(0, ge=0)
    rank_threshold: float = Field(0.5, gt=0, lt=1)

    def robust_positives(self) -> RobustPositives:
        return RobustPositives(self.robust, self.rince_q, self.rince_lambda,
                               self.truncate_fraction, self.truncate_warmup_steps,
                               rank_threshold=self.rank_threshold)
