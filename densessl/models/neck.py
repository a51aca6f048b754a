"""FPN neck (Lin et al. 2017, "Feature Pyramid Networks for Object Detection") whose top-down
path keeps every cell where :mod:`densessl.cells` places it, for the backbone's cell alignment
(``"centre"``: :func:`upsample_centred`; ``"block"``: :func:`upsample_block`)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import FeaturePyramidNetwork

from densessl.cells import CELL_ALIGNMENTS


def upsample_centred(coarse: Tensor, size: tuple[int, int]) -> Tensor:
    """2× upsampling that puts coarse cell ``j`` on fine cell ``2j``.

    A ResNet's stride-2s cell ``j`` sits on pixel ``2s·j`` and stride-s cell ``i`` on ``s·i``,
    so fine cell ``i`` is at coarse position ``i / 2``: even cells copy a coarse cell, odd cells
    are the mean of their two neighbours (the last one, past the coarse grid, repeats the edge).
    torchvision's nearest upsampling gives odd cell ``2j + 1`` the value of coarse cell ``j``,
    one fine cell (s pixels) away from where the cell is.

    Bilinear with ``align_corners=True`` onto ``2n − 1`` cells is exactly that; repeating the
    edge covers a fine map of ``2n`` cells (a ResNet halves ``H`` to ``ceil(H / 2)``).
    """
    h, w = coarse.shape[-2:]
    if not (2 * h - 1 <= size[0] <= 2 * h and 2 * w - 1 <= size[1] <= 2 * w):
        raise ValueError(f"upsample_centred: {tuple(size)} is not 2× of {(h, w)}")
    up = F.interpolate(coarse, size=(2 * h - 1, 2 * w - 1), mode="bilinear",
                       align_corners=True)
    # repeat the edge by concatenation (replication_pad2d's backward breaks torch.compile)
    if size[0] > up.shape[-2]:
        up = torch.cat([up, up[..., -1:, :]], dim=-2)
    if size[1] > up.shape[-1]:
        up = torch.cat([up, up[..., -1:]], dim=-1)
    return up


def upsample_block(coarse: Tensor, size: tuple[int, int]) -> Tensor:
    """2× upsampling for ``"block"``-aligned cells (:mod:`densessl.cells`, e.g. ConvNeXt).

    Stride-``s`` cell ``i`` sits on pixel ``s·i + (s − 1)/2`` and stride-``2s`` cell ``j`` on
    ``2s·j + s − 1/2``, so fine cell ``i`` is at coarse position ``i/2 − 1/4``: fine cells
    ``2j`` and ``2j + 1`` at ``j − 1/4`` and ``j + 1/4``. That is bilinear with
    ``align_corners=False`` at exactly 2× (clamped at the borders: the edge repeats).
    """
    h, w = coarse.shape[-2:]
    if tuple(size) != (2 * h, 2 * w):
        # another scale factor would move the sample points
        raise ValueError(f"upsample_block: {tuple(size)} is not exactly 2× of {(h, w)}")
    return F.interpolate(coarse, size=tuple(size), mode="bilinear", align_corners=False)


# Not torchvision's FPN as is: its nearest top-down upsampling puts odd cells one fine cell off
# where densessl.cells places them; subclassing keeps its modules and state-dict keys.
class CentredFeaturePyramidNetwork(FeaturePyramidNetwork):
    """torchvision's FPN (same modules, same state-dict keys, same ``extra_blocks``) with a
    choice of top-down upsampling, and optionally only some output levels.

    Args:
        upsample: ``"centred"`` (the default: keeps each cell where the backbone's
            ``alignment`` puts it) or ``"nearest"`` (torchvision's own, for weights trained
            with it; whatever the alignment).
        alignment: the backbone's cell alignment (:data:`densessl.cells.CELL_ALIGNMENTS`):
            ``"centre"`` → :func:`upsample_centred`, ``"block"`` → :func:`upsample_block`.
    """

    def __init__(self, in_channels_list: list[int], out_channels: int, extra_blocks=None,
                 upsample: Literal["centred", "nearest"] = "centred",
                 alignment: str = "centre") -> None:
        super().__init__(in_channels_list, out_channels, extra_blocks=extra_blocks)
        if upsample not in ("centred", "nearest"):
            raise ValueError(f"unknown FPN upsampling {upsample!r}; valid: 'centred', 'nearest'")
        if alignment not in CELL_ALIGNMENTS:
            raise ValueError(f"unknown cell alignment {alignment!r}; valid: "
                             f"{list(CELL_ALIGNMENTS)}")
        self.upsample = upsample
        self.alignment = alignment

    def _up(self, inner: Tensor, size: tuple[int, int]) -> Tensor:
        if self.upsample == "nearest":
            return F.interpolate(inner, size=size, mode="nearest")
        if self.alignment == "block":
            return upsample_block(inner, size)
        return upsample_centred(inner, size)

    def forward(self, x: dict[str, Tensor], finest: int = 0) -> dict[str, Tensor]:
        """``x`` ordered from high to low resolution, as torchvision's; levels finer than
        index ``finest`` are not computed (and ``extra_blocks`` only run with all levels)."""
        names, feats = list(x.keys()), list(x.values())
        top = len(feats) - 1
        inner = self.get_result_from_inner_blocks(feats[top], top)
        results = [self.get_result_from_layer_blocks(inner, top)]
        for idx in range(top - 1, finest - 1, -1):
            lateral = self.get_result_from_inner_blocks(feats[idx], idx)
            inner = lateral + self._up(inner, tuple(lateral.shape[-2:]))
            results.insert(0, self.get_result_from_layer_blocks(inner, idx))
        names = names[finest:]
        if self.extra_blocks is not None and finest == 0:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict(zip(names, results))


class FPNNeck(nn.Module):
    """The FPN with our level names.

    Dense pretraining benefits from a stride-8 map with high-level semantics, which an FPN gives
    (DenseCL / PixPro / SegLoc pretrain through one for the same reason).

    Args:
        in_channels: channels of each backbone level, e.g. ``{"c2": 64, …, "c5": 512}``.
        out_channels: channels of every output level.
        upsample, alignment: top-down upsampling, see :class:`CentredFeaturePyramidNetwork`.

    Shapes:
        ``forward({"cK": B×Ck×hK×wK}) -> {"pK": B×out_channels×hK×wK}`` for the same K.
    """

    def __init__(self, in_channels: dict[str, int], out_channels: int = 128,
                 upsample: Literal["centred", "nearest"] = "centred",
                 alignment: str = "centre") -> None:
        super().__init__()
        self.levels = list(in_channels)
        self.out_channels = out_channels
        self.fpn = CentredFeaturePyramidNetwork([in_channels[k] for k in self.levels],
                                                out_channels, upsample=upsample,
                                                alignment=alignment)

    def forward(self, features: dict[str, Tensor],
                outputs: set[str] | None = None) -> dict[str, Tensor]:
        """FPN levels ``pK``; with ``outputs`` (e.g. ``{"p3"}``) only those, and the top-down
        path stops at the finest one asked for: levels nobody reads would get no gradient and
        only cost time (p2 alone is about a quarter of a ResNet-18's forward)."""
        names = ["p" + k[1:] for k in self.levels]
        finest = 0
        if outputs is not None:
            unknown = set(outputs) - set(names)
            if unknown:
                raise ValueError(f"unknown FPN levels {sorted(unknown)}; valid: {names}")
            finest = min(names.index(n) for n in outputs)
        out = self.fpn(OrderedDict((k, features[k]) for k in self.levels), finest)
        out = {"p" + k[1:]: v for k, v in out.items()}
        return out if outputs is None else {k: v for k, v in out.items() if k in outputs}
