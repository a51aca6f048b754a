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
from torch import Tensor

from densessl.data.cache import torch_load_problem as load_problem
from densessl.errors import DensesslError
from densessl.models.backbones import backbone_entries, get_backbone_spec


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
    """Key → tensor of a randomly initialised ``backbone`` in its ``encoder.pt`` key layout
    (a torchvision ResNet without ``fc``; for ``timm:<name>`` the timm ``features_only``
    model's state dict): :meth:`~densessl.models.backbones.BackboneSpec.reference_state`."""
    return get_backbone_spec(backbone).reference_state(in_channels)


def check_encoder_state(state: dict, backbone: str, in_channels: int, where: str) -> None:
    """Raise a :class:`DensesslError` naming the problem unless ``state`` is exactly a
    ``backbone`` ResNet with ``in_channels`` inputs in torchvision key layout."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DensesslError(f"{where}: not a state dict of tensors")
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[1] != in_channels:
        raise DensesslError(f"{where}: weights take {conv1.shape[1]} input channels but the "
                            f"recipe has data.channels={in_channels}")
    spec = get_backbone_spec(backbone)
    ref = spec.reference_state(in_channels)
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref) - {k for k in state if k.startswith("fc.")})
    if (missing or unexpected) and spec.family == "timm":
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
                                   if spec.family == "timm" else ""))


def key_layout(backbone: str) -> str:
    """``encoder.json``'s ``key_layout``: what ``encoder.pt``'s keys follow."""
    return get_backbone_spec(backbone).key_layout


def to_smp_state(backbone: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our encoder layout → the ``model.encoder`` state of an smp model built with the
    backbone's ``smp_encoder``: unchanged for ResNets; smp's ``tu-`` encoder keeps the timm
    features_only model as ``model``."""
    return get_backbone_spec(backbone).to_smp_state(state)


def from_smp_state(backbone: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`to_smp_state`."""
    return get_backbone_spec(backbone).from_smp_state(state)


def guess_backbone(state: dict) -> str | None:
    """Which torchvision ResNet a state dict comes from, judged by its block keys."""
    keys = {k for k in state if not k.startswith("fc.")}
    for name in [s.name for s in backbone_entries() if s.family == "torchvision"]:
        ref = reference_state(name, 3)
        # Exact key sets: resnet34's keys contain all of resnet18's.
        if set(ref) == keys and all(
                state[k].shape == ref[k].shape for k in ref if k != "conv1.weight"):
            return name
    return None


def read_state_file(path: str | Path, where: str = "weights") -> object:
    """``torch.load`` of a file densessl did not just write, with ``weights_only=True``: only
    tensors and plain types; anything else (or a damaged file) is one :class:`DensesslError`
    line naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise DensesslError(f"{where} {path}: cannot be read as a torch state dict "
                            f"({load_problem(exc)})") from None


def read_side_json(path: str | Path) -> dict | None:
    """The JSON object in a file written next to ``encoder.pt`` (``encoder.json``,
    ``metrics.json``), or ``None`` when there is none. A file that is there but cannot be read,
    is not JSON or not a JSON object is a :class:`DensesslError` naming it and what is wrong:
    never read as missing (that would turn a damaged provenance record into "unknown")."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DensesslError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DensesslError(f"{path}: not JSON (not UTF-8 text); the file is damaged") from None
    except json.JSONDecodeError as exc:
        raise DensesslError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column "
                            f"{exc.colno}); the file is damaged or truncated") from None
    if not isinstance(data, dict):
        raise DensesslError(f"{path}: expected a JSON object, found a JSON "
                            f"{type(data).__name__}; the file is damaged")
    return data


def load_encoder_file(path: str | Path, backbone: str, in_channels: int) -> EncoderInit:
    """Read ``encoder.pt`` (+ ``encoder.json``, ``neck.pt`` and ``box_head.pt`` next to it) and
    check it. A side file that is there but damaged is an error naming it (a ``metrics.json``
    too, which the encoder checks read), never taken for a missing one."""
    path = Path(path)
    if not path.is_file():
        raise DensesslError(f"weights {str(path)!r} not found")
    state = read_state_file(path)
    if isinstance(state, dict) and "state_dict" in state:
        raise DensesslError(f"weights {path}: looks like a training checkpoint; pass the "
                            "exported encoder.pt instead")
    check_encoder_state(state, backbone, in_channels, f"weights {path}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    provenance = read_side_json(path.with_suffix(".json")) or {}
    read_side_json(path.parent / "metrics.json")  # damaged: named now, not as a traceback later
    neck = read_side_state(path.parent / "neck.pt")
    box_head = read_side_state(path.parent / "box_head.pt")
    if box_head is not None and not isinstance(provenance.get("box_head"), dict):
        raise DensesslError(f"weights {path.parent / 'box_head.pt'}: its construction "
                            f"parameters are missing from {path.with_suffix('.json')} "
                            "('box_head': input_size, conv_layers, fc_layers, norm_layer)")
    return EncoderInit("pretrained", state, neck, provenance, box_head, path)


def read_side_state(path: Path) -> dict[str, Tensor] | None:
    """A state dict written next to encoder.pt (neck.pt, box_head.pt), or ``None`` if absent."""
    if not path.exists():
        return None
    state = read_state_file(path)
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
