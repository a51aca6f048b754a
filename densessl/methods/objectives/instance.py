"""The instance objective: InsLoc's box-level InfoNCE. Box i of view A (online) against box i
of view B (momentum), RoIAlign on the FPN level each box's size selects, or on every level
``p{roi_min_level}..p5`` (``roi_levels``). With ``box_jitter`` the query pools a random box
around its instance (the localisation pretext); the key always pools the true box."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from densessl.augment.box_jitter import jitter_boxes
from densessl.losses import InstanceContrast, LevelwiseInstanceContrast
from densessl.methods.objectives.base import Objective, ObjectiveOutput, StepInputs
from densessl.methods.objectives.robust_fields import RobustObjectiveConfig
from densessl.models.instance_head import InstanceHead


class InstanceObjectiveConfig(RobustObjectiveConfig):
    FLAT: ClassVar[dict[str, str]] = {
        "weight": "instance_weight", "temperature": "temperature",
        "queue_size": "instance_queue_size", "queue": "queue", "num_classes": "num_classes",
        "roi_output_size": "roi_output_size", "roi_canonical_scale": "roi_canonical_scale",
        "roi_min_level": "roi_min_level", "roi_levels": "roi_levels", "roi_head": "roi_head",
        "roi_head_fc_dim": "roi_head_fc_dim", "box_jitter": "box_jitter",
        "box_jitter_min_iou": "box_jitter_min_iou", "box_jitter_levels": "box_jitter_levels",
        **RobustObjectiveConfig.ROBUST_FLAT}
    weight: float = Field(0.0, ge=0)
    temperature: float = Field(0.2, gt=0)
    queue_size: int = Field(4096, ge=1)
    queue: Literal["single", "per_class"] = "single"
    num_classes: int | None = Field(None, ge=1)
    roi_output_size: int = Field(7, ge=1)
    roi_canonical_scale: float = Field(224.0, gt=0)
    roi_min_level: int = Field(2, ge=2, le=5)
    roi_levels: Literal["by_size", "all"] = "by_size"
    roi_head: Literal["mlp", "conv"] = "mlp"
    roi_head_fc_dim: int = Field(1024, ge=8)
    box_jitter: bool = False
    box_jitter_min_iou: float = Field(0.5, ge=0, lt=1)
    box_jitter_levels: Literal["coarsest", "all"] = "coarsest"

    @property
    def levels(self) -> list[str]:
        """The FPN levels RoIAlign reads: ``p{roi_min_level}..p5``."""
        return [f"p{k}" for k in range(self.roi_min_level, 6)]


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
        c = self.config
        options = dict(dim=self.recipe.model.dense_dim, queue_size=c.queue_size,
                       temperature=c.temperature, queue=c.queue, num_classes=c.num_classes,
                       robust=c.robust_positives())
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
