"""Encoder weights: read ``encoder.pt`` and its parts, check them against a backbone, load them.

Pretraining exports the encoder as a torchvision ResNet state dict without ``fc.*``
(``encoder.pt``), with ``encoder.json`` (provenance), and ``neck.pt`` / ``box_head.pt`` when
those were pretrained. Every consumer (fine-tuning, the linear probe, detection transfer,
export) reads and checks weights here, so a mismatch is one clear error naming the file and
the key instead of a shape traceback deep inside a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torch import Tensor

from densessl.errors import DensesslError


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
    """Key → tensor of a randomly initialised torchvision ResNet (no ``fc``), our layout; for
    ``timm:<name>`` the timm ``features_only`` model's state dict."""
    if backbone.startswith("timm:"):
        from densessl.models.timm_backbone import TimmBackbone

        return TimmBackbone(backbone, in_channels).state_dict()
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
    if (missing or unexpected) and backbone.startswith("timm:"):
        raise DensesslError(
            f"{where}: not a {backbone} encoder (timm features_only key layout): "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}); is model.backbone the one it was pretrained with "
            "(encoder.json 'backbone')?")
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
                                f"{backbone} needs {tuple(ref_value.shape)}"
                                + (f" with data.channels={in_channels}"
                                   if backbone.startswith("timm:") else ""))


def key_layout(backbone: str) -> str:
    """``encoder.json``'s ``key_layout``: what ``encoder.pt``'s keys follow."""
    if backbone.startswith("timm:"):
        import timm

        return f"timm features_only ({backbone[len('timm:'):]}, timm {timm.__version__})"
    return "torchvision.models.resnet"


def to_smp_state(backbone: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our encoder layout → the ``model.encoder`` state of an smp model built with
    :func:`smp_encoder_name`: unchanged for ResNets; smp's ``tu-`` encoder keeps the timm
    features_only model as ``model``."""
    if backbone.startswith("timm:"):
        return {f"model.{k}": v for k, v in state.items()}
    return dict(state)


def from_smp_state(backbone: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`to_smp_state`."""
    if backbone.startswith("timm:"):
        return {k.removeprefix("model."): v for k, v in state.items()}
    return dict(state)


def smp_encoder_name(backbone: str) -> str:
    """smp's encoder for our backbone: ``resnet18`` → ``resnet18``, ``timm:X`` → ``tu-X``."""
    return "tu-" + backbone[len("timm:"):] if backbone.startswith("timm:") else backbone


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


def load_encoder(encoder: nn.Module, state: dict[str, Tensor], where: str = "encoder") -> None:
    """Strictly load a torchvision-layout ResNet state into ``encoder``; any missing or
    unexpected key (other than a classifier ``fc.*``) is a :class:`DensesslError`."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise DensesslError(f"{where}: weights do not match the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise DensesslError(f"{where}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, the "
                            f"model needs {tuple(own[bad[0]].shape)}")
    encoder.load_state_dict(state, strict=True)
