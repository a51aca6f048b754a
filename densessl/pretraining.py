"""``densessl pretrain``: recipe → pretrained encoder, metrics, resolved recipe, checkpoint."""

from __future__ import annotations

import datetime
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from densessl.build import build_pair_builder
from densessl.errors import DensesslError
from densessl.io import save_torch, write_json, write_text
from densessl.methods import DensePretraining, ThroughputMonitor
from densessl.models.box_head import conv_fc_head_spec
from densessl.pairs import collate_pairs
from densessl.recipe import Recipe, dump_recipe, load_recipe


def make_dataloader(recipe: Recipe, builder=None) -> DataLoader:
    builder = builder if builder is not None else build_pair_builder(recipe)
    t = recipe.train
    if len(builder) < t.batch_size:
        raise DensesslError(f"train.batch_size ({t.batch_size}) is larger than the number of "
                            f"pairs the builder offers ({len(builder)})")
    generator = torch.Generator().manual_seed(recipe.seed)
    return DataLoader(builder, batch_size=t.batch_size, shuffle=True, drop_last=True,
                      num_workers=t.num_workers, collate_fn=collate_pairs,
                      persistent_workers=t.num_workers > 0, generator=generator,
                      pin_memory=torch.cuda.is_available())


def collect_provenance(builder) -> tuple[list[dict], list[str]]:
    """Dataset cards and skipped samples exposed by the builder and the datasets it wraps
    (attributes ``dataset_cards`` and ``skipped_samples``)."""
    cards: list[dict] = []
    skipped: list[str] = []
    seen: set[int] = set()
    stack = [builder]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        for card in getattr(obj, "dataset_cards", None) or []:
            if card not in cards:
                cards.append(card)
        skipped.extend(getattr(obj, "skipped_samples", None) or [])
        for name in ("dataset", "datasets", "source", "backgrounds", "segments"):
            child = getattr(obj, name, None)
            stack.extend(child if isinstance(child, (list, tuple)) else [child])
    return cards, skipped


def export_encoder(task: DensePretraining, out: Path, provenance: dict) -> Path:
    """``encoder.pt``: the online backbone's state dict in torchvision's ResNet key layout,
    loadable with ``torchvision.models.resnet18().load_state_dict(sd, strict=False)``.

    Next to it, the parts a detector can start from (densessl.eval.detection): ``neck.pt``
    (the FPN; ``encoder.json`` records its ``fpn_upsample``) and ``box_head.pt`` (InsLoc's
    4conv-1fc head, torchvision's FastRCNNConvFCHead; ``encoder.json`` ``box_head`` holds
    its construction parameters). A part this run does not have is removed, so a stale one
    from an earlier run in ``out`` is never taken for this run's."""

    def cpu(module) -> dict:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    path = save_torch(out / "encoder.pt", cpu(task.encoder.backbone))
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
    write_json(out / "encoder.json", provenance)
    return path


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    # Resuming mid-epoch restarts the shuffled epoch; harmless for contrastive pretraining.
    warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")


def pretrain(recipe: str | Path | dict | Recipe, out: str | Path,
             overrides: list[str] | None = None, resume: bool = False,
             progress: bool | None = None) -> dict[str, Any]:
    """Run dense contrastive pretraining and write the outputs into ``out``.

    Writes ``encoder.pt`` (+ ``encoder.json`` provenance), ``metrics.json``, ``recipe.yaml``
    and ``checkpoints/last.ckpt``. With ``resume=True`` training continues from
    ``checkpoints/last.ckpt`` up to ``train.max_steps``. Returns the metrics dict.
    """
    recipe = load_recipe(recipe, overrides)
    out = Path(out)
    ckpt = out / "checkpoints" / "last.ckpt"
    if resume and not ckpt.is_file():
        raise DensesslError(f"--resume: no checkpoint at {ckpt}")
    _quiet_lightning()
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    builder = build_pair_builder(recipe)
    cards, skipped = collect_provenance(builder)
    loader = make_dataloader(recipe, builder)
    task = DensePretraining(recipe)
    task.dataset_cards = cards
    monitor = ThroughputMonitor()
    if progress is None:
        progress = sys.stderr.isatty()
    callbacks: list[pl.Callback] = [monitor]
    t = recipe.train
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
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=t.log_every,
        default_root_dir=str(out), num_sanity_val_steps=0,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "recipe.yaml", dump_recipe(recipe))
    trainer.fit(task, loader, ckpt_path=str(ckpt) if resume else None)
    # Written after fit, atomically: an interrupted run keeps the previous checkpoint intact.
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_name(".last.ckpt.tmp")
    trainer.save_checkpoint(str(tmp))  # collective: every rank calls it, rank 0 writes
    stats = monitor.summary(task.augment_seconds, world_size=trainer.world_size)
    metrics = {
        "recipe": recipe.name,
        "steps": int(trainer.global_step),
        "resumed_from_step": monitor.start_step,
        "final": task.final_stats(),
        **stats,
        "datasets": cards,
        "skipped_samples": len(skipped),
        "device": str(task.device),
        "torch": torch.__version__,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    provenance = {"backbone": recipe.model.backbone, "in_channels": recipe.data.channels,
                  "key_layout": "torchvision.models.resnet", "recipe": recipe.name,
                  "steps": int(trainer.global_step), "pair_builder": recipe.pairs.builder,
                  "data_source": recipe.data.source, "datasets": cards}
    if trainer.is_global_zero:
        os.replace(tmp, ckpt)
        export_encoder(task, out, provenance)
        write_json(out / "metrics.json", metrics)
    return metrics
