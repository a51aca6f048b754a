"""The instance objective: InsLoc's box-level InfoNCE. Box i of view A (online) against box i
of view B (momentum), RoIAlign on the FPN level each box's size selects, or on every level
``p{roi_min_level}..p5`` (``roi_levels``). With ``box_jitter`` the query pools a random box
around its instance (the localisation pretext); the key always pools the true box."""

from __future__ import annotations

import torch

from densessl.augment.box_jitter import jitter_boxes
from densessl.losses import InstanceContrast, LevelwiseInstanceContrast
from densessl.methods.objectives.base import Objective, ObjectiveOutput, StepInputs
from densessl.methods.objectives.robust_fields import robust_positives
from densessl.models.instance_head import InstanceHead
from densessl.recipe import InstanceConfig

#: ``loss.instance`` (densessl.recipe, which validates it when the recipe is read)
InstanceObjectiveConfig = InstanceConfig


class InstanceObjective(Objective):
    name = "instance"
    config_class = InstanceObjectiveConfig
    monitor_priority = 30

    def __init__(self, config, recipe):
        super().__init__(config, recipe)
        self.levels = config.levels
        self.last_queries: torch.Tensor | None = None

    def extend_encoder(self, encoder):
        # part of the encoder (needs model.neck: fpn, a Recipe validator), so MomentumPair
        # gives it a momentum twin and the optimiser (online parameters) trains it
        c = self.config
        encoder.instance_head = InstanceHead(
            self.recipe.model.neck_dim, out_dim=self.recipe.model.dense_dim,
            output_size=c.roi_output_size, canonical_scale=c.roi_canonical_scale,
            levels=c.roi_levels, head=c.roi_head, fc_dim=c.roi_head_fc_dim,
            alignment=encoder.cell_alignment)

    def build(self, encoder):
        c, loss = self.config, self.recipe.loss  # queue, num_classes, robust: shared
        options = dict(dim=self.recipe.model.dense_dim, queue_size=c.queue_size,
                       temperature=c.temperature, queue=loss.queue, num_classes=loss.num_classes,
                       robust=robust_positives(loss.robust))
        # all levels (InsLoc): one loss and one queue per level
        self.module = (InstanceContrast(**options) if c.roi_levels == "by_size"
                       else LevelwiseInstanceContrast(self.levels, **options))
        return self.module

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        batch, task = inputs.batch, inputs.task
        queries = self.queries(batch, inputs.query, task.model)
        self.last_queries = queries
        inst, stats = self.losses(batch, inputs.key, task, queries)
        logs = {"loss_instance": inst.detach()}
        logs.update({f"instance_{k}": v for k, v in stats.items()})
        return ObjectiveOutput(self.weight * inst, logs)

    def losses(self, batch, key: dict, task, queries: torch.Tensor):
        pair_weight = (None if batch.pair_weight is None
                       else batch.pair_weight.to(batch.box_batch.device)[batch.box_batch])
        return self.module(queries, self.keys(batch, key, task.model), batch.box_label,
                           step=task.global_step, pair_weight=pair_weight)

    def queries(self, batch, query: dict, model) -> torch.Tensor:
        c = self.config
        boxes = batch.boxes_a
        if c.box_jitter:
            jittered = jitter_boxes(boxes, *batch.view_a.shape[-2:], c.box_jitter_min_iou)
            if c.roi_levels == "all" and c.box_jitter_levels == "coarsest":
                # InsLoc's box_replaced_with_gt=[True, True, True, False]: P5 only
                boxes = torch.stack([boxes] * (len(self.levels) - 1) + [jittered])
            else:
                boxes = jittered
        return model.online.instance_head({n: query["pyramid"][n] for n in self.levels},
                                          boxes, batch.box_batch)

    def keys(self, batch, key: dict, model) -> torch.Tensor:
        with torch.no_grad():
            return model.momentum.instance_head({n: key["pyramid"][n] for n in self.levels},
                                                batch.boxes_b, batch.box_batch)

    def monitor_features(self, batch, query, state=None):
        """The RoI queries (every level's with ``roi_levels: all``)."""
        queries = state if state is not None else self.last_queries
        if queries is None:
            return None
        levels = queries.shape[0] if queries.dim() == 3 else 1
        return {"features": queries.reshape(-1, queries.shape[-1]),
                "groups": batch.box_batch.to(queries.device).repeat(levels),
                "num_groups": batch.batch_size}
