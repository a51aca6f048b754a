"""The objective registry: name → (config class, objective class), in the order the task
builds them (building may draw random numbers: a fixed order keeps runs reproducible)."""

from __future__ import annotations

from densessl.methods.objectives.base import Objective, ObjectiveConfig
from densessl.methods.objectives.dense import DenseObjective, DenseObjectiveConfig
from densessl.methods.objectives.detcon import DetConObjective
from densessl.methods.objectives.global_ import GlobalObjective, GlobalObjectiveConfig
from densessl.methods.objectives.instance import InstanceObjective, InstanceObjectiveConfig
from densessl.recipe import DetConConfig, Recipe

OBJECTIVES: dict[str, tuple[type[ObjectiveConfig], type[Objective]]] = {
    "dense": (DenseObjectiveConfig, DenseObjective),
    "global": (GlobalObjectiveConfig, GlobalObjective),
    "instance": (InstanceObjectiveConfig, InstanceObjective),
    "detcon": (DetConConfig, DetConObjective),
}


def objective_config(recipe: Recipe, name: str) -> ObjectiveConfig:
    """The settings of objective ``name`` in ``recipe``."""
    config_class, _ = OBJECTIVES[name]
    return config_class.from_loss(recipe.loss)


def build_objectives(recipe: Recipe) -> list[Objective]:
    """The objectives ``recipe`` turns on, in registry order (not built yet)."""
    objectives = []
    for name, (_, objective_class) in OBJECTIVES.items():
        config = objective_config(recipe, name)
        if objective_class.enabled(config, recipe):
            objectives.append(objective_class(config, recipe))
    return objectives
