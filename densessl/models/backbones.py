"""The backbone registry: what ``model.backbone`` may name and everything known about each.

One :class:`BackboneSpec` per name, in the style of smp's and timm's encoder registries:
how to build the ``{"c2".."c5"}`` feature extractor :class:`~densessl.models.DenseEncoder`
wraps, its channels and strides per level, where its cells sit (``cell_alignment``,
:mod:`densessl.cells`), the key layout of its ``encoder.pt`` and how those keys map onto
smp's encoder, its smp encoder name and the targets ``densessl export`` can write it to.

* ``resnet18`` / ``resnet34`` / ``resnet50`` are entries: a torchvision ResNet
  (:class:`~densessl.models.backbone.ResNetBackbone`, torchvision's key layout).
* ``timm:<name>`` is a resolver: any timm CNN whose ``features_only`` model has outputs at
  strides 4..32 (:class:`~densessl.models.timm_backbone.TimmBackbone`, timm's key layout). Its
  spec is read off timm's ``feature_info`` of the model built on the meta device (no weights
  allocated, none downloaded), once per name.

Every consumer asks :func:`get_backbone_spec` instead of testing the name; an unknown name is
a :class:`~densessl.errors.RecipeError` listing :func:`list_backbones`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from densessl.errors import RecipeError
from densessl.models.backbone import STAGE_CHANNELS, ResNetBackbone, resnet_reference_state
from densessl.models.levels import LEVEL_STRIDES, LEVELS
from densessl.models.timm_backbone import TIMM_PREFIX, MissingLevelsError, TimmBackbone

#: ``densessl export --to`` targets of each family (``densessl.workflows.export``)
TORCHVISION_EXPORTS = ("torchvision", "smp", "timm", "detectron2")
TIMM_EXPORTS = ("timm", "smp")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything densessl needs to know about one backbone.

    Attributes:
        name: what ``model.backbone`` says: ``"resnet18"``, ``"timm:convnext_atto"``.
        family: the library whose architecture (and key layout) it is: ``"torchvision"`` or
            ``"timm"``.
        model_name: its name in that library (``"resnet18"``, ``"convnext_atto"``).
        builder: ``builder(in_channels) -> nn.Module``: the randomly initialised feature
            extractor, ``forward(x) -> {"c2".."c5"}``, with ``channels``, ``strides`` and
            ``cell_alignment`` attributes equal to this spec's.
        channels: output channels of ``c2..c5``.
        strides: input stride of ``c2..c5`` (:data:`~densessl.models.levels.LEVEL_STRIDES`).
        cell_alignment: where its cells sit: ``"centre"`` or ``"block"`` (:mod:`densessl.cells`).
        key_layout: what ``encoder.pt``'s keys follow (``encoder.json``'s ``key_layout``).
        smp_encoder: the ``encoder_name`` of the smp model that takes these weights.
        smp_key_prefix: prepended to every ``encoder.pt`` key to get smp's ``model.encoder``
            key (``""`` for ResNets; ``"model."`` for smp's ``tu-`` encoder, which holds the
            timm ``features_only`` model as ``model``).
        export_targets: the ``densessl export --to`` targets with a counterpart.
        reference: ``reference(in_channels) -> state dict``: keys and shapes an ``encoder.pt``
            of this backbone must have (random values).
    """

    name: str
    family: str
    model_name: str
    builder: Callable[[int], nn.Module] = field(repr=False)
    channels: dict[str, int]
    strides: dict[str, int]
    cell_alignment: str
    key_layout: str
    smp_encoder: str
    smp_key_prefix: str
    export_targets: tuple[str, ...]
    reference: Callable[[int], dict[str, Tensor]] = field(repr=False)

    def build(self, in_channels: int = 3) -> nn.Module:
        """The feature extractor, randomly initialised (:attr:`builder`)."""
        return self.builder(in_channels)

    def reference_state(self, in_channels: int = 3) -> dict[str, Tensor]:
        return self.reference(in_channels)

    def to_smp_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``encoder.pt`` keys → the ``model.encoder`` state of an smp model built with
        :attr:`smp_encoder`."""
        return {self.smp_key_prefix + k: v for k, v in state.items()}

    def from_smp_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`to_smp_state`."""
        return {k.removeprefix(self.smp_key_prefix): v for k, v in state.items()}


_ENTRIES: dict[str, BackboneSpec] = {}
#: prefix → (resolver of a full name, how list_backbones shows it)
_RESOLVERS: dict[str, tuple[Callable[[str], BackboneSpec], str]] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a named entry (a name already registered is a ValueError)."""
    if spec.name in _ENTRIES:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _ENTRIES[spec.name] = spec
    return spec


def register_resolver(prefix: str, resolve: Callable[[str], BackboneSpec], shown: str) -> None:
    """Resolve every name starting with ``prefix`` with ``resolve(name)`` (which raises a
    :class:`RecipeError` for names it cannot serve); ``shown`` is how :func:`list_backbones`
    names the family, e.g. ``"timm:<name>"``."""
    if prefix in _RESOLVERS:
        raise ValueError(f"backbone prefix {prefix!r} is already registered")
    _RESOLVERS[prefix] = (resolve, shown)


def list_backbones() -> list[str]:
    """The names a recipe may give: the entries, then one pattern per resolver."""
    return sorted(_ENTRIES) + [shown for _, shown in _RESOLVERS.values()]


def backbone_entries() -> list[BackboneSpec]:
    """The named entries (not the families a resolver serves), sorted by name."""
    return [_ENTRIES[name] for name in sorted(_ENTRIES)]


def _valid() -> str:
    *names, last = list_backbones()
    return (f"valid: {', '.join(names)} or {last} (a timm CNN whose features_only model has "
            "outputs at strides 4, 8, 16 and 32, e.g. timm:convnext_atto)")


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of ``name``; a :class:`RecipeError` listing the valid names when there is none."""
    if not isinstance(name, str):
        raise RecipeError(f"model.backbone: expected a backbone name, got {name!r}; {_valid()}")
    if name in _ENTRIES:
        return _ENTRIES[name]
    for prefix, (resolve, _) in _RESOLVERS.items():
        if name.startswith(prefix):
            return resolve(name)
    close = difflib.get_close_matches(name, list(_ENTRIES), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise RecipeError(f"model.backbone: unknown backbone {name!r}{hint}; {_valid()}")


def build_backbone(name: str, in_channels: int = 3) -> nn.Module:
    """The randomly initialised feature extractor of ``name`` (``forward(x) -> {"c2".."c5"}``
    at strides 4..32, with ``channels``, ``strides`` and ``cell_alignment``)."""
    return get_backbone_spec(name).build(in_channels)


# -- torchvision ResNets -------------------------------------------------------------------------

def _resnet_spec(name: str) -> BackboneSpec:
    return BackboneSpec(
        name=name, family="torchvision", model_name=name,
        builder=functools.partial(ResNetBackbone, name),
        channels=dict(zip(LEVELS, STAGE_CHANNELS[name])), strides=dict(LEVEL_STRIDES),
        cell_alignment=ResNetBackbone.cell_alignment,
        key_layout="torchvision.models.resnet", smp_encoder=name, smp_key_prefix="",
        export_targets=TORCHVISION_EXPORTS,
        reference=functools.partial(resnet_reference_state, name))


for _name in STAGE_CHANNELS:
    register_backbone(_resnet_spec(_name))


# -- any timm CNN ---------------------------------------------------------------------------------

@functools.cache
def _resolve_timm(name: str) -> BackboneSpec:
    import timm

    model_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=1)
        hint = f" (did you mean {TIMM_PREFIX}{close[0]}?)" if close else ""
        raise RecipeError(f"model.backbone: {model_name!r} is not a timm model name{hint}; "
                          f"{_valid()}")
    try:
        with torch.device("meta"):  # the architecture only: no memory, no download
            probe = TimmBackbone(model_name, 3)
    except MissingLevelsError as exc:
        raise RecipeError(str(exc)) from None
    except ValueError:
        try:  # a model that cannot be built on the meta device, or not at all
            with torch.random.fork_rng(devices=[]):
                probe = TimmBackbone(model_name, 3)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
    return BackboneSpec(
        name=TIMM_PREFIX + model_name, family="timm", model_name=model_name,
        builder=functools.partial(TimmBackbone, model_name),
        channels=dict(probe.channels), strides=dict(probe.strides),
        cell_alignment=probe.cell_alignment,
        key_layout=f"timm features_only ({model_name}, timm {timm.__version__})",
        smp_encoder="tu-" + model_name, smp_key_prefix="model.", export_targets=TIMM_EXPORTS,
        reference=functools.partial(_timm_reference_state, model_name))


def _timm_reference_state(model_name: str, in_channels: int) -> dict[str, Tensor]:
    return TimmBackbone(model_name, in_channels).state_dict()


register_resolver(TIMM_PREFIX, _resolve_timm, TIMM_PREFIX + "<name>")
