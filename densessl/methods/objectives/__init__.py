"""Objectives: the training terms of :class:`densessl.methods.DensePretraining`, one module
each, named in :data:`densessl.methods.objectives.registry.OBJECTIVES`."""

from densessl.methods.objectives.base import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    StepInputs,
)
from densessl.methods.objectives.registry import OBJECTIVES, build_objectives, objective_config

__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "ObjectiveOutput", "StepInputs",
           "build_objectives", "objective_config"]
