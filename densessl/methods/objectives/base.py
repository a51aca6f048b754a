"""The objective interface: one training term of :class:`DensePretraining`.

An objective is one module here with its own pydantic config class and one line in
:mod:`densessl.methods.objectives.registry` (name → (config class, objective class)). The task
builds the configured objectives in registry order and, each step, calls each one with the batch
and both branches' outputs, sums the weighted terms it returns and logs its monitor values.

Numerics: building an objective may draw random numbers (queue initialisation, head weights),
so the task builds them in one fixed order (the registry's), in two phases: every objective's
:meth:`Objective.extend_encoder` (modules that belong to the encoder and get a momentum twin,
e.g. InsLoc's box head) before the momentum pair is made, then every :meth:`Objective.build`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from densessl.contract import PairBatch
from densessl.recipe import ObjectiveConfig, Recipe

if TYPE_CHECKING:
    from densessl.methods.dense_pretraining import DensePretraining


@dataclass
class ObjectiveOutput:
    """What one objective returns for a step: ``term``, its weighted loss (``weight × loss``,
    summed into the step's loss), and ``logs``, its monitor values (device tensors, logged as
    they are: ``loss_<name>`` and the loss's stats)."""

    term: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepInputs:
    """One step's inputs for every objective: the augmented ``batch``, the online branch's
    outputs on view A (``query``: ``dense``, ``global``, ``pyramid``) and the momentum branch's
    on view B (``key``), and the task (its step, its momentum pair, its run totals)."""

    batch: PairBatch
    query: dict
    key: dict
    task: DensePretraining


class Objective:
    """Base class: subclasses set ``name`` and ``config_class`` and implement :meth:`build`
    and :meth:`__call__`."""

    name: ClassVar[str]
    config_class: ClassVar[type[ObjectiveConfig]]
    #: the collapse monitors read the first objective (lowest value) that has features
    monitor_priority: ClassVar[int] = 100

    def __init__(self, config: ObjectiveConfig, recipe: Recipe) -> None:
        self.config = config
        self.recipe = recipe
        #: the objective's nn.Module (losses, queues): the task registers it as
        #: ``<name>_loss`` so its state-dict keys are those of earlier runs
        self.module: torch.nn.Module | None = None

    @classmethod
    def enabled(cls, config: ObjectiveConfig, recipe: Recipe) -> bool:
        """Whether the recipe turns this objective on (default: ``weight > 0``)."""
        return config.weight > 0

    @property
    def weight(self) -> float:
        return self.config.weight

    def extend_encoder(self, encoder: torch.nn.Module) -> None:
        """Attach modules that belong to the encoder (they get a momentum twin and train with
        the online parameters). Called before the momentum pair is built."""

    def build(self, encoder: torch.nn.Module) -> torch.nn.Module | None:
        """Build and return the objective's module (or None)."""
        return None

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        raise NotImplementedError

    def monitor_features(self, batch: PairBatch, query: dict,
                         state: Any = None) -> dict | None:
        """What the collapse monitors should read when this objective is the one they read
        (keyword arguments of :class:`densessl.methods.monitors.CollapseMonitor`), or None when
        it has nothing this step. ``state``: a caller's override of what it read last."""
        return None

    def run_stats(self, task: DensePretraining) -> dict[str, float]:
        """Whole-run figures for metrics.json (top level)."""
        return {}
