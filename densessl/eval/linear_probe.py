"""Frozen dense linear probe: the cheap, primary downstream signal.

Each labelled image is encoded once per encoder and its feature maps are cached
(:func:`encode_split`); a per-pixel linear classifier (:class:`DenseLinearHead`: BatchNorm
without affine parameters, then a 1×1 convolution, over a hypercolumn of backbone stages) is
trained on the cached features in seconds (:func:`train_probe`) and scored with the same
metrics as fine-tuning (:func:`evaluate_probe`).

Why a hypercolumn computed level by level: BatchNorm in eval mode, a 1×1 convolution and
bilinear upsampling are all linear per channel, and bilinear weights sum to one, so
``Σ_l up(conv_l(bn_l(f_l)))`` is exactly a linear classifier of the upsampled, concatenated
levels — without ever materialising the upsampled hypercolumn (8× less memory at stride 4).

A random encoder's BatchNorm running statistics are the defaults (mean 0, variance 1), which
do not describe its activations; :func:`recompute_bn_stats` re-estimates them on the train
images first, so the random baseline is fair and strong (Kornblith et al.'s and MAE's probes do
the same for the same reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from densessl.cells import cell_offset
from densessl.errors import DensesslError
from densessl.eval.normalise import normalise
from densessl.models.backbones import build_backbone
from densessl.models.levels import LEVEL_STRIDES, LEVELS
from densessl.models.weights import load_encoder


def _feature_coords(pixels: Tensor, length: int, stride: float, alignment: str) -> Tensor:
    """grid_sample coordinates (align_corners=False) along one axis of a ``length``-cell map
    of pixel positions ``pixels``: the cell index is (pixel − offset) / stride, where the
    cell is centred (:mod:`densessl.cells`: a ResNet cell ``i`` sits on pixel ``s·i``, not on
    the middle of its block, which ``F.interpolate(align_corners=False)`` would assume)."""
    index = (pixels - cell_offset(stride, alignment)) / stride
    return (2 * index + 1) / length - 1


def upsample_level(f: Tensor, size: tuple[int, int], stride: float,
                   alignment: str = "centre") -> Tensor:
    """A stride-``stride`` map B×C×h×w bilinearly resampled at every pixel of a ``size``
    image, each pixel reading the cells centred around it (edges: the border cell)."""
    (height, width), (fh, fw) = size, f.shape[-2:]
    ys = _feature_coords(torch.arange(height, dtype=f.dtype, device=f.device), fh, stride,
                         alignment)
    xs = _feature_coords(torch.arange(width, dtype=f.dtype, device=f.device), fw, stride,
                         alignment)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]
    return F.grid_sample(f, grid.expand(f.shape[0], -1, -1, -1), mode="bilinear",
                         padding_mode="border", align_corners=False)


def _strides(feats: Sequence[Tensor], size: tuple[int, int],
             strides: Sequence[float] | None) -> list[float]:
    """Each level's stride: given, or the image height over the map's (exact for sides that
    are multiples of the coarsest stride)."""
    return list(strides) if strides is not None else [size[0] / f.shape[-2] for f in feats]


class DenseLinearHead(nn.Module):
    """A linear classifier of the hypercolumn: BatchNorm without affine parameters, then a
    linear map (a 1×1 convolution when applied densely).

    It trains on sampled pixels (``forward``: P×ΣC_l rows of upsampled features) and predicts
    densely (:meth:`dense`: level by level at native resolution, upsampled and summed — the
    same linear map, see the module docstring).

    Args:
        channels: channels of each level, in order.
        num_classes: output classes including background.

    Shapes:
        ``forward(x: P×ΣC_l) -> P×num_classes``; ``dense(feats: list of B×C_l×h_l×w_l,
        size=(H, W)) -> B×num_classes×H×W`` (eval mode: BatchNorm's running statistics).
    """

    def __init__(self, channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if not channels:
            raise DensesslError("linear probe: no feature levels given")
        self.channels = list(channels)
        self.norm = nn.BatchNorm1d(sum(channels), affine=False)
        self.linear = nn.Linear(sum(channels), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))

    def dense(self, feats: Sequence[Tensor], size: tuple[int, int],
              strides: Sequence[float] | None = None, alignment: str = "centre") -> Tensor:
        if self.training:
            raise RuntimeError("DenseLinearHead.dense needs eval mode (running statistics)")
        if len(feats) != len(self.channels):
            raise DensesslError(f"linear probe: {len(feats)} feature levels for a head of "
                                f"{len(self.channels)}")
        scale = (self.norm.running_var + self.norm.eps).rsqrt()
        shift = -self.norm.running_mean * scale
        # BN folded into the linear map: W·((f − μ)/σ) + b = (W/σ)·f + (b + W·(−μ/σ))
        weight = self.linear.weight * scale[None]
        bias = self.linear.bias + self.linear.weight @ shift
        out, at = None, 0
        for f, stride in zip(feats, _strides(feats, size, strides)):
            c = f.shape[1]
            w = weight[:, at:at + c, None, None].to(f.dtype)
            logits = upsample_level(F.conv2d(f, w), size, stride, alignment)
            out = logits if out is None else out + logits
            at += c
        return out + bias[None, :, None, None].to(out.dtype)


class LinearProbe(nn.Module):
    """End-to-end module: a frozen ResNet and a :class:`DenseLinearHead` (for use outside the
    cached path, e.g. exporting a probe; the evaluation protocol uses cached features).

    Args:
        backbone, in_channels: the encoder architecture.
        num_classes: output classes including background.
        encoder_state: torchvision-layout ResNet weights (``None``: random, frozen).
        levels: backbone levels fed to the head.

    Shapes:
        ``forward(x: B×C×H×W) -> B×num_classes×H×W`` logits.
    """

    def __init__(self, backbone: str, in_channels: int, num_classes: int,
                 encoder_state: dict[str, Tensor] | None = None,
                 levels: tuple[str, ...] = ("c3", "c4", "c5")) -> None:
        super().__init__()
        self.encoder = build_backbone(backbone, in_channels)
        if encoder_state is not None:
            load_encoder(self.encoder, encoder_state, "linear probe encoder")
        self.encoder.requires_grad_(False)
        self.levels = check_levels(levels)
        self.head = DenseLinearHead([self.encoder.channels[k] for k in levels], num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen means frozen BN statistics too
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            feats = self.encoder(x)
        feats = [feats[k] for k in self.levels]
        strides = [LEVEL_STRIDES[k] for k in self.levels]
        alignment = getattr(self.encoder, "cell_alignment", "centre")
        if not self.training:
            return self.head.dense(feats, x.shape[-2:], strides, alignment)
        # training: every pixel is a row (the cached protocol samples pixels instead)
        b, (h, w) = x.shape[0], x.shape[-2:]
        rows = upsampled(feats, (h, w), strides, alignment).permute(0, 2, 3, 1).reshape(
            b * h * w, -1)
        return self.head(rows).reshape(b, h, w, -1).permute(0, 3, 1, 2)


def upsampled(feats: Sequence[Tensor], size: tuple[int, int],
              strides: Sequence[float] | None = None, alignment: str = "centre") -> Tensor:
    """The hypercolumn: every level bilinearly upsampled to ``size`` (each pixel reading the
    cells centred around it, :func:`upsample_level`) and concatenated."""
    return torch.cat([upsample_level(f, size, s, alignment)
                      for f, s in zip(feats, _strides(feats, size, strides))], dim=1)


def check_levels(levels: Sequence[str]) -> tuple[str, ...]:
    bad = [k for k in levels if k not in LEVELS]
    if bad or not levels:
        raise DensesslError(f"finetune.probe_levels: expected a non-empty subset of "
                            f"{list(LEVELS)}, got {list(levels)}")
    return tuple(levels)


def _images(dataset: Dataset, batch_size: int):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=0,
                        collate_fn=lambda s: (torch.stack([d["image"] for d in s]),
                                              torch.stack([d["mask"] for d in s])))
    yield from loader


@torch.no_grad()
def recompute_bn_stats(encoder: nn.Module, dataset: Dataset, mean: Sequence[float],
                       std: Sequence[float], batch_size: int = 16) -> int:
    """Replace every BatchNorm's running mean / variance by the average of their per-batch
    values over one pass through ``dataset``'s images (``momentum=None``: a cumulative
    average, not a decaying one). Returns the BN layer count."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        # a trailing batch of one image joins the batch before it: BatchNorm in train mode
        # cannot take one value per channel (a small image's c5 map is 1×1)
        pending = None
        for image, _ in _images(dataset, batch_size):
            if pending is not None and image.shape[0] > 1:
                encoder(normalise(pending, mean, std))
                pending = image
            else:
                pending = image if pending is None else torch.cat([pending, image])
        if pending is not None:
            encoder(normalise(pending, mean, std))
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    return len(bns)


@dataclass
class ProbeFeatures:
    """Cached features of one evaluation split: ``feats[l]`` N×C_l×h_l×w_l (float32, CPU) at
    native resolution, ``masks`` N×H×W long, each level's ``strides`` and the encoder's cell
    ``alignment`` (where its cells sit, for upsampling)."""

    feats: list[Tensor]
    masks: Tensor
    strides: list[float] | None = None
    alignment: str = "centre"

    def __len__(self) -> int:
        return self.masks.shape[0]


@dataclass
class PixelFeatures:
    """Hypercolumn rows of sampled labelled pixels of one split: ``x`` P×ΣC_l (levels of
    ``channels`` channels, in order), ``labels`` P long, ``image`` P long (index of the
    pixel's image in the split), ``num_images``."""

    x: Tensor
    labels: Tensor
    image: Tensor
    num_images: int
    channels: list[int]

    def of_images(self, images: Sequence[int]) -> PixelFeatures:
        keep = torch.isin(self.image, torch.as_tensor(list(images), dtype=torch.long))
        return PixelFeatures(self.x[keep], self.labels[keep], self.image[keep], self.num_images,
                             self.channels)


@torch.no_grad()
def encode_split(encoder: nn.Module, dataset: Dataset, levels: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], batch_size: int = 16
                 ) -> ProbeFeatures:
    """Encode every image of ``dataset`` once with the (eval-mode) encoder."""
    encoder.eval()
    feats: list[list[Tensor]] = [[] for _ in levels]
    masks = []
    for image, mask in _images(dataset, batch_size):
        out = encoder(normalise(image, mean, std))
        for store, k in zip(feats, levels):
            store.append(out[k].float().cpu())
        masks.append(mask)
    if not masks:
        raise DensesslError("linear probe: a split to encode is empty")
    return ProbeFeatures([torch.cat(f) for f in feats], torch.cat(masks),
                         [LEVEL_STRIDES[k] for k in levels],
                         getattr(encoder, "cell_alignment", "centre"))


@torch.no_grad()
def encode_pixels(encoder: nn.Module, dataset: Dataset, levels: Sequence[str],
                  mean: Sequence[float], std: Sequence[float], pixels_per_image: int,
                  seed: int = 0, batch_size: int = 16, ignore_index: int = 255
                  ) -> PixelFeatures:
    """Encode every image once and keep the hypercolumn at ``pixels_per_image`` labelled
    pixels drawn uniformly (seeded) from each image: the probe's training rows. A row equals
    the upsampled hypercolumn (:func:`upsampled`) at that pixel."""
    if pixels_per_image < 1:
        raise DensesslError(f"finetune.probe_pixels_per_image: expected >= 1, got "
                            f"{pixels_per_image}")
    encoder.eval()
    alignment = getattr(encoder, "cell_alignment", "centre")
    gen = torch.Generator().manual_seed(seed)
    xs, labels, images = [], [], []
    first, channels = 0, []
    for image, mask in _images(dataset, batch_size):
        out = encoder(normalise(image, mean, std))
        channels = [out[k].shape[1] for k in levels]
        b, w = image.shape[0], mask.shape[-1]
        for i in range(b):
            flat = mask[i].flatten()
            where = (flat != ignore_index).nonzero()[:, 0]
            pick = where[torch.randperm(len(where), generator=gen)[:pixels_per_image]]
            ys, xs_ = (pick // w).float(), (pick % w).float()
            # the same points upsample_level reads: each pixel between the cells centred
            # around it, border cells at the edges
            rows = []
            for k in levels:
                f = out[k][i:i + 1].float()
                stride, (fh, fw) = LEVEL_STRIDES[k], f.shape[-2:]
                grid = torch.stack([_feature_coords(xs_, fw, stride, alignment),
                                    _feature_coords(ys, fh, stride, alignment)], -1)
                rows.append(F.grid_sample(f, grid[None, None], mode="bilinear",
                                          padding_mode="border",
                                          align_corners=False)[0, :, 0].T)
            xs.append(torch.cat(rows, 1))
            labels.append(flat[pick])
            images.append(torch.full((len(pick),), first + i, dtype=torch.long))
        first += b
    if not first:
        raise DensesslError("linear probe: the train split is empty")
    return PixelFeatures(torch.cat(xs), torch.cat(labels).long(), torch.cat(images), first,
                         channels)


def class_weights(labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """"Balanced" class weights ``n / (K · n_c)`` over the K classes present in ``labels``
    (any shape; the usual inverse-frequency rule, e.g. scikit-learn's); absent classes get 0.
    Returns ``num_classes`` float32 weights."""
    labels = labels[labels != ignore_index].long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DensesslError(f"class weights: labels outside 0..{num_classes - 1} "
                            f"(found {int(labels.min())}..{int(labels.max())})")
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def train_probe(train: PixelFeatures, num_classes: int, *, steps: int, lr: float,
                batch_size: int, seed: int, weight_decay: float = 0.0,
                weights: Tensor | None = None) -> DenseLinearHead:
    """Fit a :class:`DenseLinearHead` on pixel rows (AdamW, cosine decay, cross-entropy with
    optional class ``weights``); ``batch_size`` is in pixels.

    The features are fixed, so the BatchNorm's statistics are those of the whole training set,
    computed once (exact, and no per-step normalisation pass); the rows are standardised once
    and each step reads a contiguous block of a seeded shuffle (no per-step copy).
    """
    if len(train.labels) == 0:
        raise DensesslError("linear probe: no labelled pixels to train on")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # head init
    head = DenseLinearHead(train.channels, num_classes)
    x = train.x
    mean, var = x.mean(0), x.var(0, unbiased=False)
    head.norm.running_mean.copy_(mean)
    head.norm.running_var.copy_(var)
    head.eval()  # BN fixed at those statistics from here on
    perm = torch.randperm(len(x), generator=gen)
    xn = (x[perm] - mean) * (var + head.norm.eps).rsqrt()
    y = train.labels[perm]
    batch = min(batch_size, len(x))
    blocks = len(x) // batch
    opt = torch.optim.AdamW(head.linear.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    order = torch.randperm(blocks, generator=gen)
    for step in range(steps):
        if step and step % blocks == 0:
            order = torch.randperm(blocks, generator=gen)
        at = int(order[step % blocks]) * batch
        loss = F.cross_entropy(head.linear(xn[at:at + batch]), y[at:at + batch],
                               weight=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head


@torch.no_grad()
def predict_probe(head: DenseLinearHead, split: ProbeFeatures, batch_size: int = 64
                  ) -> Tensor:
    """Argmax class map N×H×W of a trained head over a split's cached levels."""
    head.eval()
    size = tuple(split.masks.shape[-2:])
    preds = [head.dense([f[i:i + batch_size] for f in split.feats], size, split.strides,
                        split.alignment).argmax(1)
             for i in range(0, len(split), batch_size)]
    return torch.cat(preds)
