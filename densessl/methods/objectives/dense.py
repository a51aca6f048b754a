"""The dense objective: pixel (cell) InfoNCE between view A's query cells and view B's cells at
the exact correspondence ``grid_ab`` (:class:`densessl.losses.DenseContrast`)."""

from __future__ import annotations

from densessl.losses import DenseContrast
from densessl.methods.objectives.base import Objective, ObjectiveOutput, StepInputs
from densessl.methods.objectives.robust_fields import robust_positives
from densessl.recipe import DenseConfig

#: ``loss.dense`` (densessl.recipe, which validates it when the recipe is read)
DenseObjectiveConfig = DenseConfig


class DenseObjective(Objective):
    name = "dense"
    config_class = DenseObjectiveConfig
    monitor_priority = 20

    def build(self, encoder):
        c, loss = self.config, self.recipe.loss  # queue, num_classes, robust: shared
        self.module = DenseContrast(
            dim=self.recipe.model.dense_dim, queue_size=c.queue_size,
            temperature=c.temperature, samples_per_image=c.samples_per_image,
            batch_negatives=c.batch_negatives, enqueue_per_image=c.enqueue_per_image,
            num_classes=loss.num_classes if loss.queue == "per_class" else None,
            stride=encoder.stride, background=c.background,
            robust=robust_positives(loss.robust),
            alignment=encoder.cell_alignment)
        return self.module

    def __call__(self, inputs: StepInputs) -> ObjectiveOutput:
        batch, task = inputs.batch, inputs.task
        dense, stats = self.module(inputs.query["dense"], inputs.key["dense"], batch.grid_ab,
                                   batch.valid_ab, class_map=batch.class_map_a,
                                   step=task.global_step, pair_weight=batch.pair_weight)
        logs = {"loss_dense": dense.detach()}
        logs.update({f"dense_{k}": v for k, v in stats.items()})
        logs["dense_query_cells_per_image"] = task.count_dense_cells(stats["pairs"],
                                                                     batch.batch_size)
        if self.module.last_robust_cells is not None:
            logs.update(task.robust_detection(batch))
        return ObjectiveOutput(self.weight * dense, logs)

    def monitor_features(self, batch, query, state=None):
        """The drawn query cells (:attr:`DenseContrast.last_queries`, up to
        ``samples_per_image`` per image, only valid cells that take part; fixed shapes, a mask
        marks empty slots; with per-class queues, pairs of one class are left out of
        ``mean_cosine`` as the objective leaves them out of its negatives)."""
        cells = self.module.last_queries
        if cells is None:
            return None
        per_class = ({"classes": cells["label"], "num_classes": self.module.queue.num_classes}
                     if self.module.per_class else {})
        return {"features": cells["features"], "groups": cells["image"],
                "mask": cells["keep"], "num_groups": batch.batch_size, **per_class}

    def run_stats(self, task):
        """``dense_query_cells_per_image``: the query cells over every image of the training
        steps (one process's; a resumed run counts the steps before the resume too)."""
        cells, images = task.dense_cell_counts.tolist()
        return {"dense_query_cells_per_image": cells / images} if images else {}
