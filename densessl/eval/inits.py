"""Encoder initialisations compared downstream: pretrained, random, supervised and imagenet.

* ``pretrained``: ``encoder.pt`` written by ``densessl pretrain`` (torchvision ResNet keys);
* ``random``: the architecture's default random init (no state loaded);
* ``supervised``: the same encoder trained supervised on the labeled source split (segmentation
  labels): the in-domain ceiling;
* ``imagenet``: torchvision's / timm's ImageNet weights (supervised on ImageNet-1k labels), the
  start a practitioner would otherwise use, read offline (:mod:`densessl.models.imagenet`:
  ``model.weights_file`` or the torch hub / Hugging Face cache; the first conv adapted to
  ``data.channels``).

An init is an :class:`~densessl.models.weights.EncoderInit`: the ResNet state dict (or ``None``
for random) plus the FPN neck state when one was pretrained. Reading and checking ``encoder.pt``
against the recipe's backbone and channel count lives in :mod:`densessl.models.weights`.
"""

from __future__ import annotations

import torch

from densessl.errors import DensesslError
from densessl.eval.augmentation import build_transform
from densessl.eval.finetune import channel_stats, train_dense
from densessl.eval.segmentation import build_segmentation_model
from densessl.models.imagenet import imagenet_state
from densessl.models.weights import EncoderInit, from_smp_state

INITS = ("pretrained", "random", "supervised", "imagenet")


def supervised_init(recipe, data, log=print) -> EncoderInit:
    """Train the recipe's encoder supervised (smp FPN, all labels) on ``data.source`` — or on
    ``data.train`` when the dataset has no separate source split — and return its weights."""
    if "mask" not in data.keys:
        raise DensesslError(f"finetune.inits: 'supervised' trains on segmentation labels, but "
                            f"dataset {recipe.finetune.dataset!r} has no 'mask'")
    source = data.source if data.source is not None else data.train
    where = "source" if data.source is not None else "train (no separate source split)"
    if len(source) == 0:
        raise DensesslError(f"finetune.inits: 'supervised' needs labeled samples, the {where} "
                            "split is empty")
    cfg = recipe.finetune
    mean, std = channel_stats(recipe)
    torch.manual_seed(recipe.seed)
    model = build_segmentation_model("fpn", recipe.model.backbone, recipe.data.channels,
                                     data.num_classes)
    log(f"  supervised init: {cfg.supervised_steps} steps on the {where} split "
        f"({len(source)} images)")
    size = (cfg.image_size, cfg.image_size)
    train_dense(model, source, steps=cfg.supervised_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                weight_decay=cfg.weight_decay, seed=recipe.seed, mean=mean, std=std,
                augment=build_transform(cfg.augment, size, recipe.data.channels, recipe.seed))
    state = from_smp_state(recipe.model.backbone,
                           {k: v.detach().clone() for k, v in model.encoder.state_dict().items()})
    return EncoderInit("supervised", state, None, {"trained_on": where,
                                                   "steps": cfg.supervised_steps})


def imagenet_init(recipe) -> EncoderInit:
    """``finetune.inits: imagenet``: the recipe backbone's ImageNet weights (a
    :class:`DensesslError` saying how to provide them when they are not on this machine);
    ``provenance`` is their record (weights, file, sha256, first-conv adaptation)."""
    state, record = imagenet_state(recipe)
    return EncoderInit("imagenet", state, None, record)


def imagenet_labels(init: EncoderInit) -> str:
    """What the imagenet init's weights were trained on, for the table's label disclosure."""
    conv = init.provenance.get("first_conv")
    adapted = f"; first conv adapted: {conv['rule']}" if conv else ""
    return f"ImageNet-1k class labels ({init.provenance.get('weights')}{adapted})"
