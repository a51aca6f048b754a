"""The global objective: MoCo image-level InfoNCE on the global head's embeddings
(:class:`densessl.losses.GlobalContrast`)."""

from __future__ import annotations

from densessl.losses import GlobalContrast
from densessl.methods.objectives.base import Objective, ObjectiveOutput, StepInputs
from densessl.recipe import GlobalConfig

#: ``loss.global`` (densessl.recipe, which validates it when the recipe is read)
GlobalObjectiveConfig = GlobalConfig


class GlobalObjective(Objective):
    name = "global"
    config_class = GlobalObjectiveConfig
    monitor_priority = 10  # image-level, one per image: the monitors read it first

    @classmethod
    def enabled(cls, config, recipe):
        return config.weight > 0 and recipe.model.global_head

    def build(self, encoder):
        c = self.config
        self.module = GlobalContrast(dim=self.recipe.model.global_dim, queue_size=c.queue_size,
                                     temperature=c.temperature)
        return self.module

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        glob, stats = self.module(inputs.query["global"], inputs.key["global"],
                                  pair_weight=inputs.batch.pair_weight)
        logs = {"loss_global": glob.detach()}
        logs.update({f"global_{k}": v for k, v in stats.items()})
        return ObjectiveOutput(self.weight * glob, logs)

    def monitor_features(self, batch, query, state=None):
        return {"features": query["global"]} if "global" in query else None
