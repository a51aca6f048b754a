"""Fine-tuning loops (plain PyTorch: tiny models on CPU, where Lightning's overhead shows).

One run = (init, task, architecture, label fraction, seed): build the model from the init,
train it on a seeded fraction of the labeled train split, score it on every evaluation split.
:func:`evaluate_inits` runs the whole grid from a recipe's ``finetune`` section.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import albumentations as A
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from densessl.data.labeled import TASK_KEYS, LabeledData
from densessl.errors import DensesslError, RecipeError
from densessl.eval.artifact_probe import attach_channel_drop, read_drop_channels
from densessl.eval.augmentation import AugmentedSamples, build_transform
from densessl.eval.detection import build_detector, detector_modules
from densessl.eval.linear_probe import (
    PixelFeatures,
    ProbeFeatures,
    check_levels,
    class_weights,
    encode_pixels,
    encode_split,
    predict_probe,
    recompute_bn_stats,
    train_probe,
)
from densessl.eval.metrics import DetectionMetrics, SegmentationMetrics
from densessl.eval.normalise import normalise
from densessl.eval.segmentation import build_segmentation_model
from densessl.methods.schedule import warmup_cosine
from densessl.models.backbones import build_backbone
from densessl.models.trained_modules import unit_of
from densessl.models.weights import EncoderInit, load_encoder
from densessl.recipe import Recipe

IGNORE = 255


def channel_stats(recipe: Recipe) -> tuple[list[float], list[float]]:
    """Per-channel mean / std of the pretraining normalisation (fine-tuning reuses it)."""
    c = recipe.data.channels

    def expand(v):  # a list has data.channels values (a Recipe validator)
        return [float(v)] * c if isinstance(v, (int, float)) else [float(x) for x in v]

    mean, std = recipe.augment.normalisation()
    return expand(mean), expand(std)


def label_subset(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """A seeded random ``fraction`` of ``dataset`` (at least two samples: BatchNorm cannot train
    on a batch of one)."""
    n = len(dataset)
    if fraction >= 1.0:
        return dataset
    k = min(n, max(2, round(fraction * n)))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    return Subset(dataset, sorted(idx.tolist()))


def _batches(dataset: Dataset, batch_size: int, seed: int, collate: Callable) -> Iterator:
    """Endless shuffled batches (the train subset may be smaller than one batch)."""
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                        drop_last=True, collate_fn=collate, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


def _stack(samples: list[dict]) -> tuple[Tensor, Tensor]:
    return (torch.stack([s["image"] for s in samples]),
            torch.stack([s["mask"] for s in samples]))


def _as_list(samples: list[dict]) -> list[dict]:
    return samples


def param_groups(model: nn.Module, slow: list[nn.Module], lr: float, mult: float
                 ) -> list[dict]:
    """AdamW groups: the parameters of the ``slow`` modules (transferred weights) at
    ``lr * mult``, everything else at ``lr``; frozen parameters left out."""
    slow_ids = {id(p) for m in slow for p in m.parameters()}
    groups = [{"params": [p for p in model.parameters()
                          if p.requires_grad and id(p) in slow_ids], "lr": lr * mult},
              {"params": [p for p in model.parameters()
                          if p.requires_grad and id(p) not in slow_ids], "lr": lr}]
    return [g for g in groups if g["params"]]


def _optimizer(params, lr: float, weight_decay: float, steps: int):
    """``params``: parameters or :func:`param_groups` (each group keeps its own lr)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [{"params": [p for p in params if p.requires_grad], "lr": lr}]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # warmup over the first tenth, then cosine decay: short runs still end on a small rate
    return opt, warmup_cosine(opt, max(1, steps // 10), steps)


def _augmented(dataset: Dataset, augment: A.Compose | None) -> Dataset:
    return dataset if augment is None else AugmentedSamples(dataset, augment)


def train_dense(model: nn.Module, dataset: Dataset, *, steps: int, batch_size: int, lr: float,
                weight_decay: float, seed: int, mean: list[float], std: list[float],
                slow: list[nn.Module] = (), encoder_lr_mult: float = 1.0,
                class_weights: Tensor | None = None, augment: A.Compose | None = None
                ) -> nn.Module:
    """Per-pixel cross-entropy (255 ignored, optional class weights) on ``augment``ed samples
    (:func:`~densessl.eval.augmentation.build_transform`; None: as they are); the ``slow``
    modules train at ``lr * encoder_lr_mult``."""
    model.train()
    opt, sched = _optimizer(param_groups(model, list(slow), lr, encoder_lr_mult), lr,
                            weight_decay, steps)
    batches = _batches(_augmented(dataset, augment), batch_size, seed, _stack)
    for _ in range(steps):
        image, mask = next(batches)
        loss = F.cross_entropy(model(normalise(image, mean, std)), mask, weight=class_weights,
                               ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


@torch.no_grad()
def evaluate_dense(model: nn.Module, dataset: Dataset, data: LabeledData, *, batch_size: int,
                   mean: list[float], std: list[float]) -> dict[str, float]:
    model.eval()
    metrics = [SegmentationMetrics(data.class_names, IGNORE)]
    if data.extra_segmentation_metrics is not None:
        metrics.append(data.extra_segmentation_metrics())
    for image, mask in DataLoader(dataset, batch_size=batch_size, collate_fn=_stack):
        pred = model(normalise(image, mean, std)).argmax(1)
        for m in metrics:
            m.update(pred, mask)
    out: dict[str, float] = {}
    for m in metrics:
        out.update(m.compute())
    return out


def _det_targets(samples: list[dict], masks: bool) -> tuple[list, list]:
    images, targets = [], []
    for s in samples:
        image, boxes = s["image"], s["boxes"]
        inst = s["instance_masks"] if masks else None
        t = {"boxes": boxes, "labels": s["labels"]}
        if inst is not None:
            t["masks"] = inst.to(torch.uint8)
        images.append(image)
        targets.append(t)
    return images, targets


def train_detector(model: nn.Module, dataset: Dataset, *, steps: int, batch_size: int,
                   lr: float, weight_decay: float, seed: int, masks: bool,
                   slow: list[nn.Module] = (), encoder_lr_mult: float = 1.0,
                   augment: A.Compose | None = None) -> nn.Module:
    """torchvision's summed detection losses on ``augment``ed samples (boxes and instance
    masks move with the image), gradient clipping (early RPN/RoI losses from a random init
    can spike); the ``slow`` modules (transferred weights) train at ``lr * encoder_lr_mult``."""
    model.train()
    opt, sched = _optimizer(param_groups(model, list(slow), lr, encoder_lr_mult), lr,
                            weight_decay, steps)
    batches = _batches(_augmented(dataset, augment), batch_size, seed, _as_list)
    for _ in range(steps):
        samples = next(batches)
        images, targets = _det_targets(samples, masks)
        loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
    return model


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset: Dataset, *, batch_size: int, masks: bool
                      ) -> dict[str, float]:
    model.eval()
    metric = DetectionMetrics(masks=masks)
    for samples in DataLoader(dataset, batch_size=batch_size, collate_fn=_as_list):
        preds = model([s["image"] for s in samples])
        metric.update(preds, samples)
    return metric.compute()


def check_data(recipe: Recipe, data: LabeledData) -> None:
    """Fail before any training when the data cannot serve the recipe's tasks (checks on
    the data read, so not Recipe validators; densessl/recipe.py has the recipe-only ones)."""
    cfg = recipe.finetune
    needed = {t for t in cfg.tasks}
    if "detection" in cfg.tasks and "mask_rcnn" in cfg.detection_archs:
        needed.add("instance_segmentation")
    for task in sorted(needed):
        lacking = [k for k in TASK_KEYS[task] if k not in data.keys]
        if lacking:
            raise RecipeError(f"finetune.tasks: {task} needs {lacking} labels, but dataset "
                              f"{cfg.dataset!r} provides only {sorted(data.keys)}")
    if len(data.train) == 0:
        raise DensesslError(f"finetune.dataset {cfg.dataset!r}: the train split is empty")
    for name, split in data.eval_splits().items():
        if len(split) == 0:
            raise DensesslError(f"finetune.dataset {cfg.dataset!r}: the {name!r} split is "
                                "empty; results need held-out samples")
    image = data.train[0]["image"]
    if image.shape[0] != recipe.data.channels:
        raise RecipeError(f"finetune.dataset {cfg.dataset!r} gives {image.shape[0]}-channel "
                          f"images but data.channels is {recipe.data.channels}")


def _split_metrics(data: LabeledData, score: Callable[[str, Dataset], dict[str, float]]
                   ) -> dict[str, float]:
    """``score`` on every evaluation split; names get a ``<split>/`` prefix when the data has
    several test subsets (e.g. ``easy/box_mAP``)."""
    splits = data.eval_splits()
    out: dict[str, float] = {}
    for name, split in splits.items():
        prefix = f"{name}/" if len(splits) > 1 else ""
        out.update({prefix + k: v for k, v in score(name, split).items()})
    return out


def _masks(dataset: Dataset) -> Tensor:
    return torch.stack([dataset[i]["mask"] for i in range(len(dataset))])


def _segmentation_scores(data: LabeledData, preds: Tensor, masks: Tensor) -> dict[str, float]:
    metrics = [SegmentationMetrics(data.class_names, IGNORE)]
    if data.extra_segmentation_metrics is not None:
        metrics.append(data.extra_segmentation_metrics())
    out: dict[str, float] = {}
    for m in metrics:
        m.update(preds, masks)
        out.update(m.compute())
    return out


class ProbeCache:
    """Features of every labelled image under one encoder, computed once and reused by every
    probe seed and label fraction (``get`` re-encodes only when the encoder changes)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.train: PixelFeatures | None = None
        self.splits: dict[str, ProbeFeatures] = {}

    def get(self, recipe: Recipe, data: LabeledData, init: EncoderInit, seed: int
            ) -> tuple[PixelFeatures, dict[str, ProbeFeatures]]:
        cfg = recipe.finetune
        # a random encoder differs by seed; a loaded one is the same for every seed
        key = (init.name, id(init.encoder), seed if init.encoder is None else None)
        if key != self.key:
            self.key, self.train, self.splits = None, None, {}  # free the previous features
            mean, std = channel_stats(recipe)
            torch.manual_seed(seed)  # random encoder weights
            encoder = build_backbone(recipe.model.backbone, recipe.data.channels)
            if init.encoder is not None:
                load_encoder(encoder, init.encoder, f"{init.name} encoder (linear probe)")
            drop_channels(recipe, encoder)
            if cfg.probe_recompute_bn == "all" or (cfg.probe_recompute_bn == "random"
                                                   and init.encoder is None):
                recompute_bn_stats(encoder, data.train, mean, std, cfg.batch_size)
            levels = check_levels(cfg.probe_levels)
            self.train = encode_pixels(encoder, data.train, levels, mean, std,
                                       cfg.probe_pixels_per_image, seed=recipe.seed,
                                       batch_size=cfg.batch_size, ignore_index=IGNORE)
            self.splits = {name: encode_split(encoder, split, levels, mean, std,
                                              cfg.batch_size)
                           for name, split in data.eval_splits().items()}
            self.key = key
        return self.train, self.splits


def drop_channels(recipe: Recipe, encoder: nn.Module) -> None:
    """``finetune.drop_channels``: zero the top-ranked artifact channels of ``encoder``'s
    stage outputs (densessl.eval.artifact_probe) for training and evaluation alike."""
    cfg = recipe.finetune.drop_channels
    if cfg is not None:
        attach_channel_drop(encoder, read_drop_channels(cfg.from_, cfg.top_k))


def run_probe(recipe: Recipe, data: LabeledData, init: EncoderInit, fraction: float,
              seed: int, cache: ProbeCache | None = None) -> dict[str, float]:
    """Frozen dense linear probe (:mod:`densessl.eval.linear_probe`) on cached features."""
    cfg = recipe.finetune
    train, splits = (cache or ProbeCache()).get(recipe, data, init, seed)
    train = train.of_images(label_subset(list(range(train.num_images)), fraction, seed))
    weights = (class_weights(train.labels, data.num_classes, IGNORE)
               if cfg.class_balance == "balanced" else None)
    head = train_probe(train, data.num_classes, steps=cfg.probe_steps, lr=cfg.probe_lr,
                       batch_size=cfg.probe_batch_size, seed=seed, weights=weights)
    return _split_metrics(data, lambda name, _: _segmentation_scores(
        data, predict_probe(head, splits[name]), splits[name].masks))


def floor_metrics(recipe: Recipe, data: LabeledData) -> dict[str, list[dict[str, float]]]:
    """The floor: what predicting the train split's majority class at every pixel scores
    (segmentation, probe), and what predicting no box scores (detection) — shaped like one
    seed of an init, ``{task_key: [metrics]}``."""
    majority = None
    raw: dict[str, list[dict[str, float]]] = {}
    for task, arch, _, key in task_runs(recipe):
        if task == "detection":
            masks = arch == "mask_rcnn"

            def score(_, split, masks=masks):
                metric = DetectionMetrics(masks=masks)
                for i in range(len(split)):
                    sample = split[i]
                    h, w = sample["image"].shape[-2:]
                    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                             "labels": torch.zeros(0, dtype=torch.long)}
                    if masks:
                        empty["masks"] = torch.zeros(0, 1, h, w)
                    metric.update([empty], [sample])
                return metric.compute()
        else:
            if majority is None:
                train = _masks(data.train)
                counts = torch.bincount(train[train != IGNORE].flatten(),
                                        minlength=data.num_classes)
                majority = int(counts.argmax())

            def score(_, split, majority=majority):
                masks = _masks(split)
                return _segmentation_scores(data, torch.full_like(masks, majority), masks)
        raw[key] = [_split_metrics(data, score)]
    return raw


def run_one(recipe: Recipe, data: LabeledData, init: EncoderInit, task: str, arch: str | None,
            fraction: float, seed: int, probe_cache: ProbeCache | None = None, *,
            box_head_spec: dict | None = None, parameters: dict | None = None
            ) -> dict[str, float]:
    """Fine-tune one model (or fit one probe) and score it. Metric names get a ``<split>/``
    prefix when the data has several test subsets (e.g. ``easy/box_mAP``).

    ``box_head_spec``: the detectors' box head, the same for every init
    (:func:`detection_box_head_spec`). ``parameters``, when given, receives ``{"loaded": [...],
    "fresh": [...]}``: the model's parameter groups that started from the init's weights and
    those that started fresh (a detector's FPN module by module, ``fpn.inner_blocks.0`` …:
    :func:`~densessl.eval.detection.detector_modules`), plus ``"trained_modules": "not
    recorded"`` when the detector loaded neck.pt / box_head.pt whole because the weights do
    not say which of their modules pretraining trained (:func:`detection_start`). Only loaded
    weights train at ``encoder_lr_mult``; fresh ones (an untrained FPN level too) at the full
    learning rate.
    """
    cfg, backbone, c = recipe.finetune, recipe.model.backbone, recipe.data.channels
    if task == "linear_probe":
        # a frozen encoder (from the init, or random) under a fresh linear head
        _record(parameters, {"encoder": None, "head": None},
                ["encoder"] if init.encoder is not None else [])
        return run_probe(recipe, data, init, fraction, seed, probe_cache)
    mean, std = channel_stats(recipe)
    torch.manual_seed(seed)  # head init (and random encoder init) differ by seed
    train = label_subset(data.train, fraction, seed)
    # transferred weights move slowly; a random encoder has nothing to keep
    mult = cfg.encoder_lr_mult if init.encoder is not None else 1.0
    common = {"batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay, "seed": seed,
              "augment": build_transform(cfg.augment, (cfg.image_size, cfg.image_size), c, seed,
                                         boxes=task == "detection")}
    if task == "detection":
        masks = arch == "mask_rcnn"
        neck, box_head = detection_start(recipe, init)
        model = build_detector(arch, backbone, c, data.num_classes - 1, cfg.image_size, mean,
                               std, fpn_dim=recipe.model.neck_dim, encoder_state=init.encoder,
                               neck_state=neck, fpn_upsample=recipe.model.fpn_upsample,
                               box_head_spec=box_head_spec, box_head_state=box_head)
        modules = detector_modules(model)
        _record(parameters, modules, model.loaded_modules)
        if parameters is not None and unrecorded_parts(recipe, init):
            parameters["trained_modules"] = "not recorded"
        train_detector(model, train, steps=cfg.detection_steps, lr=cfg.lr, masks=masks,
                       slow=[modules[g] for g in model.loaded_modules],
                       encoder_lr_mult=mult, **common)
        score = lambda ds: evaluate_detector(model, ds, batch_size=cfg.batch_size,  # noqa: E731
                                             masks=masks)
    else:
        model = build_segmentation_model(arch, backbone, c, data.num_classes, init.encoder)
        drop_channels(recipe, model.encoder)
        # smp's encoder / decoder / segmentation_head; only the encoder has a counterpart
        _record(parameters, {n: m for n, m in model.named_children()
                             if any(True for _ in m.parameters())},
                ["encoder"] if init.encoder is not None else [])
        weights = (class_weights(_masks(train), data.num_classes, IGNORE)
                   if cfg.class_balance == "balanced" else None)
        train_dense(model, train, steps=cfg.steps, lr=cfg.lr, mean=mean, std=std,
                    slow=[model.encoder], encoder_lr_mult=mult, class_weights=weights,
                    **common)
        score = lambda ds: evaluate_dense(model, ds, data, batch_size=cfg.batch_size,  # noqa: E731
                                          mean=mean, std=std)
    return _split_metrics(data, lambda _, split: score(split))


def _record(parameters: dict | None, groups: dict, loaded: list[str]) -> None:
    """Fill ``parameters`` (when asked for) with the loaded and the fresh parameter groups."""
    if parameters is not None:
        parameters.clear()  # a dict reused across runs keeps nothing of the last one
        parameters.update(loaded=list(loaded), fresh=[g for g in groups if g not in loaded])


def detection_start(recipe: Recipe, init: EncoderInit
                    ) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
    """The (neck, box head) states the detector of ``init`` loads, as ``finetune.detection_neck``
    / ``detection_box_head`` say: ``auto`` loads what the weights have, ``true`` requires it
    (an init read from a file without it is an error naming the file), ``false`` loads
    nothing. A neck pretrained with another top-down upsampling than ``model.fpn_upsample``
    is an error: the detector's FPN would compute something else with its weights.

    Only modules pretraining trained are loaded: with ``encoder.json`` ``trained_modules``
    (densessl.models.trained_modules) a state keeps the keys of the modules that received a
    gradient, the others start fresh in the detector (``auto`` with none trained loads
    nothing; ``true`` with none trained is an error). Without the record (weights of older
    runs) the whole state loads, as :func:`unrecorded_parts` says."""
    cfg = recipe.finetune
    chosen = []
    for setting, state, file, key, part in (
            (cfg.detection_neck, init.neck, "neck.pt", "detection_neck", "neck"),
            (cfg.detection_box_head, init.box_head, "box_head.pt", "detection_box_head",
             "box_head")):
        if state is None and setting is True and init.path is not None:
            raise RecipeError(f"finetune.{key}: true, but {init.path.parent / file} does not "
                              f"exist (the pretraining had no such part); set finetune.{key}: "
                              "auto or false")
        if state is not None and setting is not False:
            state = _trained_state(init, part, state, file, key, setting)
        chosen.append(state if setting is not False else None)
    trained = init.provenance.get("fpn_upsample")
    if chosen[0] is not None and trained is not None and trained != recipe.model.fpn_upsample:
        where = init.path.with_suffix(".json") if init.path is not None else "encoder.json"
        raise RecipeError(f"model.fpn_upsample: the recipe has {recipe.model.fpn_upsample!r} but "
                          f"the neck was pretrained with {trained!r} ({where}); set "
                          f"model.fpn_upsample: {trained} (or finetune.detection_neck: false)")
    return chosen[0], chosen[1]


def _trained_units(init: EncoderInit, part: str) -> list[str] | None:
    """``encoder.json`` ``trained_modules[part]``, or ``None`` when not recorded."""
    record = init.provenance.get("trained_modules")
    if not isinstance(record, dict) or not isinstance(record.get(part), list):
        return None
    return [str(u) for u in record[part]]


def _trained_state(init: EncoderInit, part: str, state: dict[str, Tensor], file: str,
                   key: str, setting) -> dict[str, Tensor] | None:
    """``state`` restricted to the modules pretraining trained (all of it when not recorded;
    ``None`` when none was trained and ``setting`` is ``auto``)."""
    units = _trained_units(init, part)
    if units is None:
        return state
    name = str(init.path.parent / file) if init.path is not None else file
    empty = [u for u in units if not any(k.startswith(u + ".") for k in state)]
    if empty:
        raise DensesslError(f"weights {name}: encoder.json trained_modules lists {empty[:3]} "
                            f"but {file} has no weights for them")
    if not units:
        if setting is True:
            raise RecipeError(f"finetune.{key}: true, but no module of {name} received a "
                              "gradient in pretraining (encoder.json trained_modules); set "
                              f"finetune.{key}: auto or false")
        return None
    return {k: v for k, v in state.items() if unit_of(k, units) is not None}


def unrecorded_parts(recipe: Recipe, init: EncoderInit) -> list[str]:
    """The parts (``neck.pt``, ``box_head.pt``) the detector of ``init`` loads whole because
    ``encoder.json`` does not record which of their modules pretraining trained."""
    cfg = recipe.finetune
    return [file for setting, state, file, part in (
        (cfg.detection_neck, init.neck, "neck.pt", "neck"),
        (cfg.detection_box_head, init.box_head, "box_head.pt", "box_head"))
        if setting is not False and state is not None and _trained_units(init, part) is None]


def detection_box_head_spec(inits: list[EncoderInit]) -> dict | None:
    """The box head every init's detector is built with: the pretrained one's (``encoder.json``
    ``box_head``) whenever an init has one, so that inits differ in weights only; ``None``
    (torchvision's two-layer MLP head) otherwise."""
    specs = {json.dumps(i.provenance["box_head"], sort_keys=True): i for i in inits
             if i.box_head is not None}
    if len(specs) > 1:
        raise DensesslError("inits " + ", ".join(f"{i.name} ({i.path})" for i in specs.values())
                            + " have box heads of different shapes; fine-tune them apart")
    return json.loads(next(iter(specs))) if specs else None


def task_runs(recipe: Recipe) -> list[tuple[str, str | None, float, str]]:
    """(task, arch, fraction, key) for every fine-tuning configuration of the recipe."""
    cfg = recipe.finetune
    runs = []
    for fraction in cfg.label_fractions:
        pct = f"{100 * fraction:g}%"
        for task in cfg.tasks:
            archs = {"segmentation": cfg.segmentation_archs, "detection": cfg.detection_archs,
                     "linear_probe": [None]}[task]
            for arch in archs:
                runs.append((task, arch, fraction, f"{task}{'/' + arch if arch else ''}@{pct}"))
    return runs


def group_replicas(inits: list[EncoderInit], seeds: list[int]
                   ) -> dict[str, list[EncoderInit]]:
    """Inits by name, in order. Several inits of one name are replicas (e.g. one pretraining
    per seed): there must be one, or one per fine-tuning seed (zipped with the seeds)."""
    groups: dict[str, list[EncoderInit]] = {}
    for init in inits:
        groups.setdefault(init.name, []).append(init)
    for name, group in groups.items():
        if len(group) not in (1, len(seeds)):
            raise DensesslError(f"init {name!r}: {len(group)} encoders for {len(seeds)} "
                                f"finetune.seeds; expected 1 or {len(seeds)}")
    return groups


def evaluate_inits(recipe: Recipe, data: LabeledData, inits: list[EncoderInit],
                   log: Callable[[str], None] = print, parameters: dict | None = None
                   ) -> dict[str, dict[str, list[dict]]]:
    """Every (init × seed × task × fraction) run. Several inits with one name are replicas
    zipped with ``finetune.seeds`` (:func:`group_replicas`). Returns ``{init: {task_key:
    [metrics per seed]}}`` for :func:`densessl.eval.report.aggregate`.

    ``parameters``, when given, receives ``{init: {task_key: {"loaded": [...], "fresh":
    [...]}}}``: which parameter groups each run loaded from the init and which started fresh.
    """
    check_data(recipe, data)
    box_head_spec = None
    if "detection" in recipe.finetune.tasks:
        box_head_spec = detection_box_head_spec(inits)
        for init in inits:  # transfer errors before any training
            detection_start(recipe, init)
    seeds = recipe.finetune.seeds
    raw: dict[str, dict[str, list[dict]]] = {}
    cache = ProbeCache()
    for name, group in group_replicas(inits, seeds).items():
        for i, seed in enumerate(seeds):
            init = group[i] if len(group) > 1 else group[0]
            for task, arch, fraction, key in task_runs(recipe):
                start = time.perf_counter()
                groups: dict = {}
                metrics = run_one(recipe, data, init, task, arch, fraction, seed, cache,
                                  box_head_spec=box_head_spec, parameters=groups)
                if parameters is not None:
                    parameters.setdefault(name, {})[key] = groups
                raw.setdefault(name, {}).setdefault(key, []).append(metrics)
                head = {k: round(v, 4) for k, v in metrics.items()
                        if k.split("/")[-1] in ("mIoU", "fg_mIoU", "box_mAP", "mask_mAP")}
                log(f"  {name:<10} {key:<28} seed {seed}: {head} "
                    f"({time.perf_counter() - start:.0f}s)")
    return raw
