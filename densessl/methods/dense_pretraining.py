"""The Lightning pretraining task: thin glue between augmentation, model and objectives.

Data flow per step: SourceBatch (from DataLoader workers) → ``on_after_batch_transfer`` runs the
device-side view augmentation → PairBatch → online encoder on view A, momentum encoder on view B
→ the configured objectives (densessl/methods/objectives: dense, global, instance InfoNCE with
MoCo queues, ...), summed with their weights.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.models.utils import (
    batch_shuffle,
    batch_shuffle_distributed,
    batch_unshuffle,
    batch_unshuffle_distributed,
)
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from densessl.build import build_augmentation, build_encoder
from densessl.contract import PairBatch, SourceBatch
from densessl.distributed import world_size
from densessl.errors import RecipeError
from densessl.methods.monitors import RANK_BINS, CollapseMonitor, dense_cells, rank_separation
from densessl.methods.objectives import OBJECTIVES, Objective, StepInputs, build_objectives
from densessl.methods.schedule import warmup_cosine
from densessl.models import MomentumPair, cosine_momentum
from densessl.models.split_batchnorm import convert_to_split_batchnorm
from densessl.models.trained_modules import GradientRecord
from densessl.models.weights import load_encoder
from densessl.recipe import Recipe, migrate_flat_loss, parse_recipe
from densessl.seeding import seed_step


class DensePretraining(pl.LightningModule):
    def __init__(self, recipe: Recipe | dict, start_weights: dict | None = None) -> None:
        """``start_weights``: a backbone state (``model.init_weights``, read by
        densessl.models.imagenet.init_weights_state) the online backbone starts from; the
        momentum encoder is built as its copy. ``None``: the random init (and what a
        checkpoint restores over it)."""
        super().__init__()
        if isinstance(recipe, dict):
            # a checkpoint's recipe of before the objectives' loss sections reads migrated
            recipe = parse_recipe(migrate_flat_loss(recipe), "<checkpoint>")
        if recipe.loss.queue == "per_class" and recipe.loss.num_classes is None:
            # the rings are sized here; densessl.workflows.pretraining resolves null from the
            # builder
            raise RecipeError("loss.num_classes: null (from the data) is not resolved yet: "
                              "build the pair builder and call densessl.workflows.pretraining."
                              "check_class_ids(recipe, builder) first, or set "
                              "loss.num_classes for loss.queue: per_class")
        self.recipe = recipe
        # Stored as plain data so a checkpoint can rebuild the task without this object.
        self.save_hyperparameters({"recipe": recipe.model_dump(mode="json")})
        encoder = build_encoder(recipe)
        if start_weights is not None:  # before MomentumPair: the momentum twin copies it
            load_encoder(encoder.backbone, start_weights, "model.init_weights")
        # the configured objectives, in registry order (densessl/methods/objectives); first
        # the modules they add to the encoder (e.g. InsLoc's box head), which the momentum
        # pair twins and the optimiser trains
        self.objectives: list[Objective] = build_objectives(recipe)
        for objective in self.objectives:
            objective.extend_encoder(encoder)
        if recipe.model.key_bn == "split":
            # after the instance head is attached: its conv head's BN must not see the whole
            # key batch either (a RoI count the groups do not divide falls back to it)
            convert_to_split_batchnorm(encoder, recipe.model.split_bn_groups)
        self.model = MomentumPair(encoder)
        # which FPN / box-head modules ever get a gradient (encoder.json trained_modules): a
        # detector loads those only, the others were never trained
        box_head = getattr(getattr(encoder, "instance_head", None), "box_head", None)
        self.grad_record = GradientRecord({
            "neck": encoder.neck,
            "box_head": box_head if isinstance(box_head, FastRCNNConvFCHead) else None})
        # the correspondence grid, the keys and RoIAlign all place cells as this encoder does
        self.augment = build_augmentation(recipe, grid_stride=encoder.stride,
                                          cell_alignment=encoder.cell_alignment)
        # run totals of (down-weighted cells of noisy pairs, down-weighted cells, cells of
        # noisy pairs, down-weighted wrong cells, wrong cells, query cells): the precision /
        # recall monitor against the benchmark's true noise, per pair and per cell
        self.register_buffer("robust_counts", torch.zeros(6), persistent=False)
        # loss.robust.kind rank: run histograms (row 0 wrong cells, row 1 clean query cells) of
        # the score the criterion thresholds, for dense_robust_rank_auroc
        self.register_buffer("robust_rank_hist", torch.zeros(2, RANK_BINS), persistent=False)
        self.register_buffer("robust_rank_sums", torch.zeros(2), persistent=False)
        # run totals of (dense query cells, images) over the training steps, for
        # dense_query_cells_per_image (metrics.json); saved in the checkpoint (not the state
        # dict) so a resumed run reports the whole run's mean
        self.register_buffer("dense_cell_counts", torch.zeros(2, dtype=torch.long),
                             persistent=False)
        # feature_std / mean_cosine on what the configured objective reads (monitor_features)
        self.collapse_monitor = CollapseMonitor()
        # each objective's module (losses, queues) as ``<name>_loss`` (None when the objective
        # is off): the state-dict keys of earlier runs (dense_loss.queue.keys, ...)
        for name in OBJECTIVES:
            setattr(self, f"{name}_loss", None)
        for objective in self.objectives:
            setattr(self, f"{objective.name}_loss", objective.build(encoder))
        self.augment_seconds = 0.0
        self.last_stats: dict[str, torch.Tensor] = {}
        self.dataset_cards: list[dict] = []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Licences travel with the weights (e.g. xBD is CC BY-NC-SA 4.0).
        checkpoint["dataset_cards"] = self.dataset_cards
        checkpoint["trained_modules"] = self.grad_record.state_dict_entry()
        # run totals behind monitors (not in the state dict: its keys stay those of older runs)
        checkpoint["run_monitors"] = {"dense_cell_counts": self.dense_cell_counts.tolist(),
                                      "collapse": self.collapse_monitor.state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint without it (an older run) leaves the record unknown
        self.grad_record.load_entry(checkpoint.get("trained_modules"))
        # without them (an older checkpoint) the totals cover the steps since the resume
        run = checkpoint.get("run_monitors") or {}
        if "dense_cell_counts" in run:
            self.dense_cell_counts.copy_(torch.tensor(run["dense_cell_counts"],
                                                      dtype=torch.long))
        self.collapse_monitor.load(run.get("collapse"))

    def on_before_optimizer_step(self, optimizer) -> None:
        # after the guard's callback hook: a step it drops has no gradients left to count
        self.grad_record.observe()

    def trained_modules(self) -> dict[str, list[str]] | None:
        """``{"neck": [...], "box_head": [...]}``: the modules (``module_units`` names) that
        received a gradient so far; ``None`` when unknown (resumed from an older checkpoint)."""
        return self.grad_record.record()

    @property
    def encoder(self):
        """The online encoder (what gets exported)."""
        return self.model.online

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, SourceBatch):
            if self._trainer is not None and self.trainer.training:
                # this step's draws (views, cells, jitter, key shuffles) depend on the step
                # only, so a run resumed at step N draws what the uninterrupted run drew
                seed_step(self.recipe.seed, self.global_step, self.global_rank)
            start = time.perf_counter()
            batch = self.augment(batch)
            if self.recipe.train.channels_last:
                batch.view_a = batch.view_a.contiguous(memory_format=torch.channels_last)
                batch.view_b = batch.view_b.contiguous(memory_format=torch.channels_last)
            self.augment_seconds += time.perf_counter() - start
        return batch

    def training_step(self, batch: PairBatch, batch_idx: int):
        m = self.recipe.model
        momentum = cosine_momentum(self.global_step, self.trainer.max_steps, m.momentum,
                                   m.momentum_end)
        self.model.update(momentum)
        total, logs = self.compute_losses(batch)
        logs = {k: v.float() for k, v in logs.items()}
        logs["momentum"] = torch.tensor(momentum)
        # Tensors, not floats: no host-device sync per step (Lightning reads them when it logs).
        self.last_stats = logs
        self.log_dict({k: v for k, v in logs.items() if k != "loss"}, on_step=True,
                      batch_size=batch.batch_size)
        self.log("loss", logs["loss"], prog_bar=True, on_step=True, batch_size=batch.batch_size)
        return total

    def compute_losses(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward of both branches and every configured objective (no optimiser, no
        logging): the training step and ``densessl bench`` share it. Each objective returns
        its weighted term and its monitor values; the terms are summed in registry order."""
        query = self.model.encode(batch.view_a, "online")
        key = self.encode_keys(batch.view_b)
        total = batch.view_a.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        inputs = StepInputs(batch=batch, query=query, key=key, task=self)
        for objective in self.objectives:
            out = objective(inputs)
            total = total + out.term
            logs.update(out.logs)
        logs.update(self.collapse_monitor(**self.monitor_features(batch, query)))
        logs["loss"] = total.detach()
        logs["valid_fraction"] = batch.valid_ab.float().mean()
        return total, logs

    def count_dense_cells(self, cells: torch.Tensor, images: int) -> torch.Tensor:
        """Add a step's dense query cells (``cells``, the loss's ``pairs``: a device scalar)
        and ``images`` to the run totals (training only, without a host read); returns the
        mean query cells per image over the run so far (this step's own in eval mode)."""
        if not self.training:
            return cells.float() / max(images, 1)
        counts = self.dense_cell_counts
        counts[0] += cells.detach().round().long().to(counts.device)
        counts[1] += images
        return counts[0].float() / counts[1].clamp_min(1).float()

    def run_stats(self) -> dict[str, float]:
        """Whole-run figures for metrics.json (top level), read on the host, from every
        objective (:meth:`Objective.run_stats`): with the dense objective,
        ``dense_query_cells_per_image``: the dense objective's query cells over every image of
        the training steps (one process's; a resumed run counts the steps before the resume
        too, from the checkpoint)."""
        stats: dict[str, float] = {}
        for objective in self.objectives:
            stats.update(objective.run_stats(self))
        return stats

    def monitor_features(self, batch: PairBatch, query: dict,
                         instance_queries: torch.Tensor | None = None) -> dict:
        """What the collapse monitors read: the query embeddings of a configured objective
        (issue #26), as keyword arguments of :class:`CollapseMonitor`.

        Cells or features no objective reads can be alike without harm: with
        ``background: ignore`` the bag around pasted segments (often one uniform texture) is
        neither query nor key, and reading it raised false collapse alarms. So the first
        objective, by ``monitor_priority``, with features this step
        (:meth:`Objective.monitor_features`): the global objective's query embeddings
        (image-level, one per image); else the dense objective's drawn query cells; else the
        instance objective's RoI queries (``instance_queries`` when given, else the last
        step's); else (no objective reads anything) the global head's output or every 2nd
        dense cell. Pairs within one image are left out of ``mean_cosine``.
        """
        for objective in sorted(self.objectives, key=lambda o: o.monitor_priority):
            state = instance_queries if objective.name == "instance" else None
            features = objective.monitor_features(batch, query, state)
            if features is not None:
                return features
        if "global" in query:
            return {"features": query["global"]}
        features, groups = dense_cells(query["dense"])
        return {"features": features, "groups": groups, "num_groups": batch.batch_size}

    def objective(self, name: str) -> Objective | None:
        """The configured objective ``name`` (None when it is off)."""
        return next((o for o in self.objectives if o.name == name), None)

    @property
    def roi_levels(self) -> list[str]:
        """The FPN levels the instance objective's RoIAlign reads."""
        return self.objective("instance").levels

    def instance_losses(self, batch: PairBatch, query: dict, key: dict,
                        queries: torch.Tensor | None = None):
        """The instance objective's (unweighted) loss and stats
        (:class:`densessl.methods.objectives.instance.InstanceObjective`); ``queries``:
        :meth:`instance_queries` when already computed."""
        if queries is None:
            queries = self.instance_queries(batch, query)
        return self.objective("instance").losses(batch, key, self, queries)

    def robust_detection(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        """How well the robust dense objective singles out the truly noisy pairs, over the
        run so far (analysis only: the pairs' ``noisy`` flags are read here, never by a loss).

        ``dense_robust_precision``: down-weighted query cells that belong to noisy pairs / all
        down-weighted cells; ``dense_robust_recall``: down-weighted cells of noisy pairs / the
        query cells of noisy pairs. Pair level: every cell of a noisy pair counts as wrong,
        which is exact for ``mismatch`` and overstates the truth for ``partial_change`` (only
        part of B changed).

        ``dense_robust_cell_precision`` / ``_recall``: the same per cell, where a cell is wrong
        when its pair is noisy and, if the batch has a ``noise_mask_a`` (``partial_change``),
        its positive lies on replaced content; without a mask every cell of a noisy pair is
        wrong (so these equal the pair-level ones, e.g. for ``mismatch``). The mask also
        comes from a source that knows its own change (noisy-seg with ``data.options.change``
        > 0: the pixels that differ between the dates), so these score the criterion on the
        benchmark's natural change too, with or without injected noise.
        ``dense_robust_cell_noisy_share``: wrong query cells / all query cells, the chance
        level of the cell precision (a criterion that drops cells at random scores it).
        NaN while a denominator is 0. Totals since this process started.

        With ``loss.robust.kind: rank``, whether *any* threshold on its score could beat
        chance: ``dense_robust_rank_wrong`` / ``_clean``, the mean score (share of a query's
        allowed negatives more similar than its positive) of the wrong and of the clean query
        cells, and ``dense_robust_rank_auroc``, the probability that a wrong cell scores above
        a clean one (ties count half; scores binned in steps of 1/RANK_BINS): 0.5 when the
        score carries nothing about the wrong pairs, 1 when a threshold separates them.
        """
        cells = self.dense_loss.last_robust_cells
        device = cells["down"].device
        noisy = batch.noisy.to(device, non_blocking=True)
        noisy_f = noisy.float()
        b = noisy.shape[0]
        slot_cell, keep = cells["slot_cell"].reshape(b, -1), cells["slot_keep"].reshape(b, -1)
        down = cells["slot_down"].reshape(b, -1)
        wrong = noisy[:, None].expand_as(keep)
        if batch.noise_mask_a is not None:
            # a gather at the drawn cells: fixed shapes, no host read
            mask = batch.noise_mask_a.to(device, non_blocking=True).reshape(b, -1)
            wrong = wrong & mask.gather(1, slot_cell)
        wrong = wrong & keep
        step = torch.stack([(cells["down"] * noisy_f).sum(), cells["down"].sum(),
                            (cells["cells"] * noisy_f).sum(), (down & wrong).sum().float(),
                            wrong.sum().float(), keep.sum().float()])
        if self.training:
            self.robust_counts += step.to(self.robust_counts)
            counts = self.robust_counts
        else:
            counts = step
        out = {"dense_robust_precision": counts[0] / counts[1],
               "dense_robust_recall": counts[0] / counts[2],
               "dense_robust_cell_precision": counts[3] / counts[1],
               "dense_robust_cell_recall": counts[3] / counts[4],
               "dense_robust_cell_noisy_share": counts[4] / counts[5]}
        score = cells.get("slot_rank")
        if score is not None:
            score, clean = score.reshape(b, -1).float(), keep & ~wrong
            bins = (score * RANK_BINS).long().clamp(0, RANK_BINS - 1)
            onehot = F.one_hot(bins, RANK_BINS).float()  # B×n×bins: fixed shapes
            hist = torch.stack([(onehot * wrong[..., None]).sum((0, 1)),
                                (onehot * clean[..., None]).sum((0, 1))])
            sums = torch.stack([(score * wrong).sum(), (score * clean).sum()])
            if self.training:
                self.robust_rank_hist += hist.to(self.robust_rank_hist)
                self.robust_rank_sums += sums.to(self.robust_rank_sums)
                hist, sums = self.robust_rank_hist, self.robust_rank_sums
            out.update(rank_separation(hist, sums))
        return out

    def instance_queries(self, batch: PairBatch, query: dict) -> torch.Tensor:
        return self.objective("instance").queries(batch, query, self.model)

    def instance_keys(self, batch: PairBatch, key: dict) -> torch.Tensor:
        return self.objective("instance").keys(batch, key, self.model)

    def encode_keys(self, view_b: torch.Tensor) -> dict:
        """Momentum branch; with ``key_bn`` shuffle/split the batch is shuffled first (across
        processes when there are several) so BN statistics cannot leak which keys are positives.
        """
        if self.recipe.model.key_bn not in ("shuffle", "split"):
            return self.model.encode(view_b, "momentum")
        distributed = world_size() > 1
        shuffle = batch_shuffle_distributed if distributed else batch_shuffle
        unshuffle = batch_unshuffle_distributed if distributed else batch_unshuffle
        shuffled, order = shuffle(view_b)
        key = self.model.encode(shuffled, "momentum")

        def restore(value):
            # nested outputs too: the instance objective reads the whole FPN pyramid
            if isinstance(value, dict):
                return {k: restore(v) for k, v in value.items()}
            return unshuffle(value, order)

        return restore(key)

    def configure_model(self) -> None:
        if self.recipe.train.compile:
            # In place: state-dict keys (and so checkpoints and encoder.pt) stay unchanged.
            self.model.online.compile()

    def final_stats(self) -> dict[str, float]:
        """The last step's losses and monitors as plain floats (for metrics.json). A collapse
        monitor that never had anything to read (:class:`CollapseMonitor`) is left out: absent
        is unknown to densessl.models.health, NaN would read as collapse."""
        stats = {k: float(v) for k, v in self.last_stats.items()}
        for name, known in zip(CollapseMonitor.KEYS, self.collapse_monitor.known.tolist()):
            if not known:
                stats.pop(name, None)
        return stats

    def configure_optimizers(self):
        t = self.recipe.train
        params = [p for p in self.model.online.parameters() if p.requires_grad]
        if t.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        scheduler = warmup_cosine(optimizer, t.warmup_steps, t.max_steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
