"""``densessl pretrain``: recipe → pretrained encoder, metrics, resolved recipe, checkpoint."""

from __future__ import annotations

import datetime
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from densessl.build import build_pair_builder
from densessl.data.bad_samples import count_read_skips
from densessl.data.manifest import attribution_csv, find_image_provenance
from densessl.data.wrapped import wrapped_objects
from densessl.errors import DensesslError, RecipeError
from densessl.io import make_folder, save_torch, write_json, write_text
from densessl.methods import DensePretraining, PairThroughputMonitor
from densessl.methods.guards import NonFiniteGuard
from densessl.models.box_head import conv_fc_head_spec
from densessl.models.imagenet import init_weights_state
from densessl.models.weights import key_layout, read_side_json
from densessl.pairs import collate_pairs
from densessl.recipe import Recipe, dump_recipe, load_recipe
from densessl.seeding import SeededSamples, StreamSampler, rng_states, set_rng_states
from densessl.workflows.data_settings import inherit_data_settings, resolve_data_settings
from densessl.workflows.resume import (
    ResumeState,
    check_writable,
    clear_run,
    prepare_out,
    read_checkpoint,
    remove_stale_temporaries,
)
from densessl.workflows.validation import load_valid_recipe


def make_dataloader(recipe: Recipe, builder=None, start: int = 0) -> DataLoader:
    """An endless stream of batches: sample p of the run (over all processes) is the pair at
    the p-th place of seeded epoch permutations, built with generators seeded by (seed, p)
    (densessl.seeding). ``start`` is the number of samples already seen (a resume)."""
    builder = builder if builder is not None else build_pair_builder(recipe)
    t = recipe.train
    if len(builder) < t.batch_size:  # needs the data: not a Recipe validator
        raise DensesslError(f"train.batch_size ({t.batch_size}) is larger than the number of "
                            f"pairs the builder offers ({len(builder)})")
    sampler = StreamSampler(len(builder), t.batch_size, recipe.seed, start=start,
                            group=sample_group(builder))
    return DataLoader(SeededSamples(builder, recipe.seed), batch_size=t.batch_size,
                      sampler=sampler, num_workers=t.num_workers, collate_fn=collate_pairs,
                      persistent_workers=t.num_workers > 0,
                      pin_memory=torch.cuda.is_available())


def sample_group(builder) -> int:
    """How many consecutive indices the sampler keeps together: the ``sample_group`` (int)
    of the builder or of what it wraps (``geotiff_tiles``: windows cut from one internal
    block, read right after each other so the block is decoded once), else 1. Only from an
    object as long as the builder: another length means the builder maps its indices to the
    object's some other way, where grouping builder indices would group nothing."""
    for obj in wrapped_objects(builder):
        group = getattr(obj, "sample_group", None)
        if isinstance(group, int) and not isinstance(group, bool) and group > 1 and \
                len(obj) == len(builder):
            return group
    return 1


def check_class_ids(recipe: Recipe, builder) -> None:
    """Resolve ``loss.num_classes: null`` from the data and refuse, before training, class ids
    the per-class queues have no ring for (the queue would fail mid-run on the device).

    The ids are those the builder (or anything it wraps) says it emits (``label_ids()``). A
    null ``loss.num_classes`` becomes their largest + 1, set on ``recipe`` (so recipe.yaml
    and the checkpoint record it); an explicit one must exceed every id. Needs the builder's
    data, so not a Recipe validator."""
    ids: set[int] = set()
    for obj in wrapped_objects(builder):
        if callable(getattr(obj, "label_ids", None)):
            ids |= set(obj.label_ids())
    ids.discard(-1)  # -1 is "unknown", never a ring
    if recipe.loss.num_classes is None:
        if ids:
            recipe.loss.num_classes = max(ids) + 1
        elif recipe.loss.queue == "per_class":
            raise RecipeError(f"loss.num_classes: null means the pair builder's class ids, but "
                              f"{recipe.pairs.builder!r} reports none (no label_ids()); set "
                              "loss.num_classes for loss.queue: per_class")
        return
    if recipe.loss.queue != "per_class":
        return  # one queue: labels are not read
    if ids and max(ids) >= recipe.loss.num_classes:
        raise RecipeError(f"loss.num_classes: {recipe.loss.num_classes}, but pair builder "
                          f"{recipe.pairs.builder!r} emits class ids up to {max(ids)} "
                          f"({sorted(ids)}); set loss.num_classes >= {max(ids) + 1}")


def collect_provenance(builder) -> tuple[list[dict], list[str]]:
    """Dataset cards and skipped samples exposed by the builder and the datasets it wraps
    (attributes ``dataset_cards`` and ``skipped_samples``)."""
    cards: list[dict] = []
    skipped: list[str] = []
    lists: set[int] = set()  # a wrapper may hand out its source's list (NoisyPairs does)
    for obj in wrapped_objects(builder):
        for card in getattr(obj, "dataset_cards", None) or []:
            if card not in cards:
                cards.append(card)
        found = getattr(obj, "skipped_samples", None) or []
        if id(found) not in lists:
            lists.add(id(found))
            skipped.extend(found)
    return cards, skipped


def export_encoder(task: DensePretraining, out: Path, provenance: dict) -> Path:
    """``encoder.pt``: the online backbone's state dict in torchvision's ResNet key layout,
    loadable with ``torchvision.models.resnet18().load_state_dict(sd, strict=False)`` (a
    ``timm:<name>`` backbone: timm's ``features_only`` layout, see ``key_layout``).

    Next to it, the parts a detector can start from (densessl.eval.detection): ``neck.pt``
    (the FPN; ``encoder.json`` records its ``fpn_upsample``, and the backbone's
    ``cell_alignment``) and ``box_head.pt`` (InsLoc's
    4conv-1fc head, torchvision's FastRCNNConvFCHead; ``encoder.json`` ``box_head`` holds
    its construction parameters). A part this run does not have is removed, so a stale one
    from an earlier run in ``out`` is never taken for this run's.

    ``encoder.json`` ``trained_modules`` (``{"neck": [...], "box_head": [...]}``, names of
    densessl.models.trained_modules.module_units, prefixes of the part's keys) lists the
    modules of each exported part that ever received a gradient; a detector loads those only.
    Absent when the task cannot tell (resumed from a checkpoint of a run without the record)."""

    def cpu(module) -> dict:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    path = save_torch(out / "encoder.pt", cpu(task.encoder.backbone))
    # where the backbone's feature cells sit (densessl.cells): code that reads features at
    # pixels (a probe, a dense head, a correspondence) needs it and should not guess it
    provenance = {**provenance, "cell_alignment": task.encoder.cell_alignment}
    neck = task.encoder.neck
    if neck is not None:
        save_torch(out / "neck.pt", cpu(neck))
        provenance = {**provenance, "neck": "fpn", "neck_dim": neck.out_channels,
                      "fpn_upsample": neck.fpn.upsample}
    else:
        (out / "neck.pt").unlink(missing_ok=True)
    box_head = getattr(getattr(task.encoder, "instance_head", None), "box_head", None)
    if isinstance(box_head, FastRCNNConvFCHead):
        save_torch(out / "box_head.pt", cpu(box_head))
        provenance = {**provenance, "box_head": conv_fc_head_spec(box_head)}
    else:
        (out / "box_head.pt").unlink(missing_ok=True)
    trained = getattr(task, "trained_modules", None)
    record = trained() if callable(trained) else None
    if record is not None:  # the task records the parts exported here (neck, box head)
        provenance = {**provenance, "trained_modules": record}
    write_json(out / "encoder.json", provenance)
    return path


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    # Resuming mid-epoch restarts the shuffled epoch; harmless for contrastive pretraining.
    warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")


def _repair_outputs(out: Path, ckpt: Path, state: ResumeState) -> None:
    """After a kill between the renames of a save, encoder files and metrics.json are of an
    earlier step than the checkpoint: rewrite them from it."""
    steps = [(read_side_json(f) or {}).get("steps")
             for f in (out / "metrics.json", out / "encoder.json")]
    if steps == [state.step, state.step]:
        return
    checkpoint = read_checkpoint(ckpt)
    recipe_dict = checkpoint["hyper_parameters"]["recipe"]
    task = DensePretraining(recipe_dict)
    task.load_state_dict(checkpoint["state_dict"])
    task.on_load_checkpoint(checkpoint)  # the trained-modules record
    recipe = task.recipe
    cards = checkpoint.get("dataset_cards") or []
    image_provenance = checkpoint.get("provenance")
    export_encoder(task, out, {"backbone": recipe.model.backbone,
                               "in_channels": recipe.data.channels,
                               "key_layout": key_layout(recipe.model.backbone),
                               "recipe": recipe.name,
                               "pair_builder": recipe.pairs.builder,
                               "data_source": recipe.data.source, "datasets": cards,
                               **({"provenance": image_provenance} if image_provenance else {}),
                               "init_weights": (state.metrics or {}).get(
                                   "init_weights", {"from": "random"}),
                               "steps": state.step})
    if state.metrics:
        write_json(out / "metrics.json", state.metrics)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writes through :func:`densessl.io.save_torch`: a temporary next
    to the file (``.last.ckpt.tmp``), renamed over it only when complete, removed on any
    failure. A save that fails (a full disk, a read-only file system) keeps the previous
    checkpoint and is one :class:`~densessl.errors.OutputError` naming the file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)  # one name: a run killed mid-save leaves what resume removes
        save_torch(path, checkpoint, temporary=f".{path.name}.tmp")


class PeriodicCheckpoint(pl.Callback):
    """Saves ``checkpoints/last.ckpt`` with ``encoder.pt`` and ``metrics.json`` of the same
    step every ``every_steps`` steps and every ``every_minutes`` minutes (the clock is read
    every ``check_every`` steps; with several processes rank 0's clock decides). The checkpoint
    also carries every random state, the stream position and the metrics it was saved with."""

    def __init__(self, save, every_steps: int, every_minutes: float, check_every: int,
                 guard: NonFiniteGuard) -> None:
        self.save, self.every_steps, self.every_minutes = save, every_steps, every_minutes
        self.check_every, self.guard = check_every, guard
        self.pending_metrics: dict | None = None
        self.samples_per_step = 0
        self.image_provenance: dict | None = None
        self._last = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step >= trainer.max_steps:
            return  # the final save follows fit
        due = bool(self.every_steps) and step % self.every_steps == 0
        if not due and self.every_minutes and step % self.check_every == 0:
            due = time.monotonic() - self._last >= 60 * self.every_minutes
            if trainer.world_size > 1:
                due = trainer.strategy.broadcast(due, 0)
        if due:
            self.guard.check(trainer)  # never save a diverged state
            self.save(trainer, finished=False)
            self._last = time.monotonic()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.image_provenance is not None:
            # the per-image provenance summary travels with the weights, like dataset cards
            checkpoint["provenance"] = self.image_provenance
        checkpoint["densessl"] = {
            "metrics": self.pending_metrics,
            "samples_seen": int(trainer.global_step) * self.samples_per_step,
            "rng": rng_states(),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get("densessl") or {}
        if "rng" in state:
            set_rng_states(state["rng"])


def pretrain(recipe: str | Path | dict | Recipe, out: str | Path,
             overrides: list[str] | None = None, resume: bool = False,
             progress: bool | None = None, overwrite: bool = False,
             validate: bool = True) -> dict[str, Any]:
    """Run dense contrastive pretraining and write the outputs into ``out``.

    Writes ``encoder.pt`` (+ ``encoder.json`` provenance), ``metrics.json``, ``recipe.yaml``
    and ``checkpoints/last.ckpt`` — during training too, every ``train.checkpoint_every`` steps
    and every ``train.checkpoint_minutes`` minutes, all three of one step. With ``resume=True``
    training continues from ``checkpoints/last.ckpt`` up to ``train.max_steps`` and ends where
    the uninterrupted run would have; a recipe that differs in anything but
    ``train.max_steps`` and logging keys is refused. ``out`` holding a run is refused unless
    ``resume`` or ``overwrite``. ``validate=False``: the caller has already run
    :func:`~densessl.workflows.validation.validate_recipe` on this recipe (the CLI, ``run``).
    Returns the metrics dict.
    """
    # the API entry refuses what the CLI refuses; callers that checked already skip it
    recipe = load_valid_recipe(recipe, overrides, finetuning=False) if validate \
        else load_recipe(recipe, overrides)
    out = Path(out)
    ckpt = out / "checkpoints" / "last.ckpt"
    # Everything that can refuse runs before anything in ``out`` is written or removed.
    state: ResumeState | None = prepare_out(recipe, out, resume=resume, overwrite=overwrite)
    if state is not None and state.nothing_to_do:
        _repair_outputs(out, ckpt, state)
        return {**state.metrics, "nothing_to_do": True}
    # model.init_weights: read (or refused) before anything is written; a resume restores the
    # checkpoint's weights over them and keeps the record of the run it continues
    if state is None:
        start_state, start_record = init_weights_state(recipe)
    else:
        start_state, start_record = None, (state.metrics or {}).get("init_weights",
                                                                    {"from": "random"})
    check_writable(out)
    _quiet_lightning()
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    if state is not None:  # what the interrupted run resolved from the data, not a new draw
        inherit_data_settings(recipe, out / "encoder.pt")
    builder = build_pair_builder(recipe)
    check_class_ids(recipe, builder)
    resolve_data_settings(recipe, builder)  # data.bit_depth, augment.mean / std: auto
    cards, skipped = collect_provenance(builder)
    image_provenance, attribution = find_image_provenance(builder)
    before = ((state.metrics if state is not None else None) or {}).get("provenance") or {}
    if before.get("manifest_sha256") and image_provenance is not None and \
            before["manifest_sha256"] != image_provenance["manifest_sha256"]:
        # the same recipe over a changed manifest is another image set: not a resume
        raise DensesslError(f"--resume: the manifest {recipe.data.manifest} changed since the "
                            "checkpoint (sha256 differs); restore it or start a new run")
    t = recipe.train
    loader = make_dataloader(recipe, builder, start=state.samples_seen if state else 0)
    task = DensePretraining(recipe, start_weights=start_state)
    task.dataset_cards = cards
    monitor = PairThroughputMonitor()
    guard = NonFiniteGuard(t.on_nonfinite, t.log_every)
    if progress is None:
        progress = sys.stderr.isatty()
    provenance = {"backbone": recipe.model.backbone, "in_channels": recipe.data.channels,
                  "key_layout": key_layout(recipe.model.backbone),
                  "recipe": recipe.name,
                  "pair_builder": recipe.pairs.builder, "data_source": recipe.data.source,
                  "datasets": cards, "init_weights": start_record}
    if image_provenance is not None:
        provenance["provenance"] = image_provenance

    def metrics_now(trainer, finished: bool) -> dict:
        stats = monitor.summary(task.augment_seconds, world_size=trainer.world_size)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return {
            "recipe": recipe.name,
            "num_classes": recipe.loss.num_classes,  # resolved from the builder when null
            # resolved from the data when auto (densessl.workflows.data_settings)
            "bit_depth": recipe.data.bit_depth,
            "normalisation": {"mean": recipe.augment.mean, "std": recipe.augment.std},
            "status": "finished" if finished else "running",
            "steps": int(trainer.global_step),
            "max_steps": t.max_steps,
            "resumed_from_step": monitor.start_step,
            "final": task.final_stats(),
            # whole-run figures (the resumed steps' too), e.g. dense_query_cells_per_image
            **task.run_stats(),
            **stats,
            "nonfinite_steps_skipped": guard.skipped,
            "init_weights": start_record,  # what the backbone started from (model.init_weights)
            "datasets": cards,
            # found at start-up, plus those skipped while reading (in any DataLoader worker)
            "skipped_samples": len(skipped) + count_read_skips(builder),
            # images used, dropped and why, licences, inherited terms (densessl.data.manifest)
            **({"provenance": image_provenance} if image_provenance is not None else {}),
            "device": str(task.device),
            "torch": str(torch.__version__),
            "saved": now,
            **({"finished": now} if finished else {}),
        }

    def save(trainer, finished: bool) -> dict:
        """Checkpoint, then the encoder files, then metrics.json (the last rename marks the
        step complete; a kill between renames leaves the checkpoint newest, and --resume
        rewrites the others from it)."""
        metrics = metrics_now(trainer, finished)
        saver.pending_metrics = metrics
        # collective: every rank calls it, rank 0 writes (AtomicCheckpointIO: temporary, then
        # rename; a failed save keeps the previous last.ckpt)
        trainer.save_checkpoint(str(ckpt))
        if trainer.is_global_zero:
            export_encoder(task, out, {**provenance, "steps": metrics["steps"]})
            write_json(out / "metrics.json", metrics)
        return metrics

    saver = PeriodicCheckpoint(save, t.checkpoint_every, t.checkpoint_minutes, t.log_every, guard)
    saver.image_provenance = image_provenance
    callbacks: list[pl.Callback] = [monitor, guard, saver]
    if progress:
        # the bar reads the logged loss off the device: every log_every steps, not every step
        callbacks.append(pl.callbacks.RichProgressBar(refresh_rate=t.log_every))
    # Not every FPN level feeds every objective (e.g. the dense head reads one level), so DDP
    # must look for parameters without gradients.
    strategy = "ddp_find_unused_parameters_true" if t.strategy == "ddp" else t.strategy
    trainer = pl.Trainer(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices,
        strategy=strategy, num_nodes=t.num_nodes,
        sync_batchnorm=recipe.model.key_bn == "sync",
        precision=t.precision, callbacks=callbacks, logger=False, enable_checkpointing=False,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=t.log_every,
        default_root_dir=str(out), num_sanity_val_steps=0,
        # the stream sampler splits each global batch by rank itself
        use_distributed_sampler=False,
    )
    saver.samples_per_step = t.batch_size * trainer.world_size
    if trainer.is_global_zero:
        remove_stale_temporaries(out)  # left by a run killed during a save
    make_folder(out)
    if overwrite and trainer.is_global_zero:
        clear_run(out)
    write_text(out / "recipe.yaml", dump_recipe(recipe))
    if trainer.is_global_zero:
        if attribution:  # per image: file, licence, author, url (export copies it)
            write_text(out / "attribution.csv", attribution_csv(attribution))
        else:  # never leave an earlier run's attribution next to this run's weights
            (out / "attribution.csv").unlink(missing_ok=True)
    trainer.fit(task, loader, ckpt_path=str(ckpt) if state is not None else None)
    guard.check(trainer)
    return save(trainer, finished=True)
