"""Any timm CNN as a backbone: ``model.backbone: timm:<name>`` (e.g. ``timm:convnext_atto``).

timm builds the network with ``features_only=True`` and reports each output's stride and
channels in ``feature_info``; the outputs at strides 4, 8, 16 and 32 become ``c2..c5``, the
levels the FPN, the dense head and RoIAlign (stride ``2^K`` for ``pK``/``cK``) read. A
stride-2 output (ResNet-style stems) is computed by timm but not used.

``state_dict()`` is the timm ``features_only`` model's own (no wrapper prefix), so
``encoder.pt`` loads into ``timm.create_model(name, features_only=True, in_chans=C)`` key for
key, and into smp's ``tu-<name>`` encoder with a ``model.`` prefix
(:func:`densessl.models.weights.to_smp_state`).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from densessl.models.levels import LEVEL_STRIDES

#: how a recipe names a timm model (``model.backbone: timm:<name>``)
TIMM_PREFIX = "timm:"


def create_features_model(name: str, in_channels: int) -> nn.Module:
    """timm's ``features_only`` model, randomly initialised (never downloads weights)."""
    import timm  # only backbones that name a timm model pay for importing it

    return timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels)


def stem_cell_alignment(model: nn.Module) -> str:
    """Where the model's cells sit (:mod:`densessl.cells`), read off its first convolution:
    ``"block"`` when it is a patchify conv (kernel size == stride > 1 on both axes, no
    padding: each output covers its own s×s block, ConvNeXt's 4×4/4 stem), else ``"centre"``.

    The rule assumes the rest of the network downsamples the same way as its stem, which
    timm's hierarchical CNNs do (ConvNeXt: unpadded 2×2/2 downsamples; ResNet / RegNet /
    EfficientNet / MobileNet: symmetrically padded strided convs). Its limits: a network that
    mixes the two (e.g. a ResNet-D, whose shortcut downsamples by a 2×2 average pool, block
    aligned, while the main path's 3×3/2 conv is centre aligned, so its cells sit between the
    two), a stem conv with padding that is not symmetric (timm's ``*_same`` TF ports pad
    right/bottom only, a fraction of a pixel per layer) or a first conv that is not the stem
    are classified by the stem alone.
    """
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return "centre"
    kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
    unpadded = padding in ("valid", 0) or (not isinstance(padding, str) and not any(padding))
    patchify = all(k == s > 1 for k, s in zip(kernel, stride))
    return "block" if patchify and unpadded else "centre"


class MissingLevelsError(ValueError):
    """A timm model without an output at one of the strides 4..32 that ``c2..c5`` need."""


def level_indices(name: str, reductions: list[int]) -> dict[str, int]:
    """Output index of ``c2..c5`` in a features_only model whose outputs have ``reductions``:
    the deepest output at each stride. A :class:`MissingLevelsError` naming the model when
    one is missing."""
    found = {}
    for level, stride in LEVEL_STRIDES.items():
        at = [i for i, r in enumerate(reductions) if r == stride]
        if not at:
            raise MissingLevelsError(
                f"model.backbone: timm:{name} has feature strides {list(reductions)}; a dense "
                f"encoder needs outputs at strides 4, 8, 16 and 32 (c2..c5) and stride "
                f"{stride} is missing (hierarchical CNNs such as convnext, efficientnet, "
                f"regnet, resnest, resnet have them; plain ViTs do not)")
        found[level] = at[-1]
    return found


class TimmBackbone(nn.Module):
    """A timm ``features_only`` CNN returning ``{"c2".."c5"}`` at strides 4..32.

    Args:
        name: timm model name, e.g. ``"convnext_atto"`` (or ``"timm:convnext_atto"``); random
            init.
        in_channels: input channels; timm adapts the stem (any count).

    Shapes:
        ``forward(x: B×in_channels×H×W) -> {"c2": …H/4, "c3": …H/8, "c4": …H/16, "c5": …H/32}``
        with H, W multiples of 32; ``self.channels`` gives their channels and
        ``self.cell_alignment`` where their cells sit (:func:`stem_cell_alignment`).
    """

    strides = dict(LEVEL_STRIDES)

    def __init__(self, name: str, in_channels: int = 3) -> None:
        import timm

        super().__init__()
        name = name.removeprefix(TIMM_PREFIX)
        if not timm.is_model(name):
            raise ValueError(f"model.backbone: timm:{name} is not a timm model name "
                             "(timm.list_models() lists them)")
        try:
            self.model = create_features_model(name, in_channels)
        except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
            raise ValueError(f"model.backbone: timm:{name} cannot be built with "
                             f"features_only=True ({exc})") from None
        info = self.model.feature_info
        self._index = level_indices(name, list(info.reduction()))
        channels = info.channels()
        self.channels: dict[str, int] = {k: int(channels[i]) for k, i in self._index.items()}
        self.name = TIMM_PREFIX + name
        self.in_channels = in_channels
        self.cell_alignment = stem_cell_alignment(self.model)
        # NHWC outputs (a few timm families) are permuted back to the NCHW every consumer reads
        self._channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        # encoder.pt is the timm features model's own state dict: no "model." prefix
        self._register_state_dict_hook(_strip_prefix)
        self._register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            # timm's stages round odd sizes their own way (ConvNeXt floors, ResNets ceil), and
            # the FPN and the cell grid (densessl.cells) need each level exactly 2× the next
            raise ValueError(f"{self.name}: input sides must be multiples of 32, got "
                             f"{tuple(x.shape[-2:])} (augment.view_size, finetune.image_size)")
        feats = self.model(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        out = {k: feats[i] for k, i in self._index.items()}
        if self._channels_last:
            out = {k: v.permute(0, 3, 1, 2) for k, v in out.items()}
        return out


def _strip_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_prefix(state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    # every key under prefix is in the stripped layout (the timm model's own keys may
    # themselves start with "model.")
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)
