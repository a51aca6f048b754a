"""Encoder initialisations compared downstream: pretrained, random and supervised.

* ``pretrained``: ``encoder.pt`` written by ``densessl pretrain`` (torchvision ResNet keys);
* ``random``: the architecture's default random init (no state loaded);
* ``supervised``: the same encoder trained supervised on the labeled source split (segmentation
  labels) — the domain stand-in for ImageNet-supervised weights, which cannot be used here.

An init is an :class:`EncoderInit`: the ResNet state dict (or ``None`` for random) plus the FPN
neck state when one was pretrained. Weights are checked against the recipe's backbone and channel
count before any model sees them, so a mismatch is one clear error instead of a shape traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import Tensor

from densessl.errors import DensesslError

INITS = ("pretrained", "random", "supervised")


@dataclass
class EncoderInit:
    """Weights one fine-tuning run starts from.

    Attributes:
        name: ``pretrained`` / ``random`` / ``supervised``.
        encoder: ResNet state dict in torchvision key layout without ``fc.*``, or ``None``.
        neck: ``FPNNeck`` state dict (keys ``fpn.inner_blocks…``), or ``None``.
        provenance: encoder.json contents (backbone, in_channels, datasets, …; ``box_head``
            holds the box head's construction parameters, ``fpn_upsample`` the neck's).
        box_head: the pretrained ``FastRCNNConvFCHead`` state dict (``box_head.pt``), or ``None``.
        path: the ``encoder.pt`` the weights came from (``None``: not read from a file).
    """

    name: str
    encoder: dict[str, Tensor] | None = None
    neck: dict[str, Tensor] | None = None
    provenance: dict = field(default_factory=dict)
    box_head: dict[str, Tensor] | None = None
    path: Path | None = None


def reference_state(backbone: str, in_channels: int) -> dict[str, Tensor]:
    """Key → tensor of a randomly initialised torchvision ResNet (no ``fc``), our layout."""
    net = getattr(torchvision.models, backbone)(weights=None)
    if in_channels != 3:
        net.conv1 = torch.nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def check_encoder_state(state: dict, backbone: str, in_channels: int, where: str) -> None:
    """Raise a :class:`DensesslError` naming the problem unless ``state`` is exactly a
    ``backbone`` ResNet with ``in_channels`` inputs in torchvision key layout."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DensesslError(f"{where}: not a state dict of tensors")
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[1] != in_channels:
        raise DensesslError(f"{where}: weights take {conv1.shape[1]} input channels but the "
                            f"recipe has data.channels={in_channels}")
    ref = reference_state(backbone, in_channels)
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref) - {k for k in state if k.startswith("fc.")})
    if missing or unexpected:
        guess = guess_backbone(state)
        hint = f" (they look like {guess})" if guess and guess != backbone else ""
        raise DensesslError(
            f"{where}: not a {backbone} encoder in torchvision key layout{hint}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]})")
    for key, ref_value in ref.items():
        if state[key].shape != ref_value.shape:
            raise DensesslError(f"{where}: {key} has shape {tuple(state[key].shape)}, a "
                                f"{backbone} needs {tuple(ref_value.shape)}")


def guess_backbone(state: dict) -> str | None:
    """Which torchvision ResNet a state dict comes from, judged by its block keys."""
    keys = {k for k in state if not k.startswith("fc.")}
    for name in ("resnet18", "resnet34", "resnet50"):
        ref = reference_state(name, 3)
        # Exact key sets: resnet34's keys contain all of resnet18's.
        if set(ref) == keys and all(
                state[k].shape == ref[k].shape for k in ref if k != "conv1.weight"):
            return name
    return None


def load_encoder_file(path: str | Path, backbone: str, in_channels: int) -> EncoderInit:
    """Read ``encoder.pt`` (+ ``encoder.json``, ``neck.pt`` and ``box_head.pt`` next to it) and
    check it."""
    path = Path(path)
    if not path.is_file():
        raise DensesslError(f"weights {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise DensesslError(f"weights {path}: cannot be read as a torch state dict ({exc})"
                            ) from None
    if isinstance(state, dict) and "state_dict" in state:
        raise DensesslError(f"weights {path}: looks like a training checkpoint; pass the "
                            "exported encoder.pt instead")
    check_encoder_state(state, backbone, in_channels, f"weights {path}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    provenance = {}
    if path.with_suffix(".json").is_file():
        provenance = json.loads(path.with_suffix(".json").read_text())
    neck = _load_part(path.parent / "neck.pt")
    box_head = _load_part(path.parent / "box_head.pt")
    if box_head is not None and not isinstance(provenance.get("box_head"), dict):
        raise DensesslError(f"weights {path.parent / 'box_head.pt'}: its construction "
                            f"parameters are missing from {path.with_suffix('.json')} "
                            "('box_head': input_size, conv_layers, fc_layers, norm_layer)")
    return EncoderInit("pretrained", state, neck, provenance, box_head, path)


def _load_part(path: Path) -> dict[str, Tensor] | None:
    """A state dict written next to encoder.pt (neck.pt, box_head.pt), or ``None`` if absent."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise DensesslError(f"weights {path}: cannot be read as a torch state dict ({exc})"
                            ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DensesslError(f"weights {path}: not a state dict of tensors")
    return state


def supervised_init(recipe, data, log=print) -> EncoderInit:
    """Train the recipe's encoder supervised (smp FPN, all labels) on ``data.source`` — or on
    ``data.train`` when the dataset has no separate source split — and return its weights."""
    from densessl.eval.finetune import channel_stats, train_dense
    from densessl.eval.segmentation import build_segmentation_model

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
    train_dense(model, source, steps=cfg.supervised_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                weight_decay=cfg.weight_decay, seed=recipe.seed, mean=mean, std=std)
    state = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    return EncoderInit("supervised", state, None, {"trained_on": where,
                                                   "steps": cfg.supervised_steps})
