"""Collate PairSamples into a SourceBatch (stack sources, concatenate instances, collate paste
plans for the device-side compositing)."""

from __future__ import annotations

import torch

from densessl.contract import BLENDS, PairSample, PasteBatch, PastePlan, SourceBatch
from densessl.errors import PairContractError
from densessl.pairs.correspondence import pixel_grid

#: padded crop sides are rounded up to a multiple of this, so consecutive batches mostly share
#: shapes (allocator and kernel caches stay warm)
_PAD_MULTIPLE = 16


#: the paste windows are used only when each is at most this share of the source's area
_WINDOW_SHARE = 0.5


def _round_up(value: int) -> int:
    return -(-value // _PAD_MULTIPLE) * _PAD_MULTIPLE


def paste_windows(matrix: torch.Tensor, crop_hw: torch.Tensor, size: tuple[int, int]
                  ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Window origins (B×k×2 long, x, y) and the batch's window (height, width) that hold every
    paste's footprint in a ``size`` source.

    A bilinear read of a crop's mask is non-zero only strictly inside (−1, w) × (−1, h) crop
    pixels, so the footprint is the bounding box of those corners under ``matrix`` (B×k×3×3,
    crop pixel → source pixel, float64), widened by a pixel for rounding. One window size for
    the batch (the largest footprint, rounded up, at most the source) keeps the device's
    shapes fixed; each window is then moved inside the source, still covering the footprint's
    part in it. A window above :data:`_WINDOW_SHARE` of the source becomes the source."""
    height, width = size
    h, w = crop_hw[..., 0].double(), crop_hw[..., 1].double()
    xs = torch.stack([-torch.ones_like(w), w, -torch.ones_like(w), w], -1)
    ys = torch.stack([-torch.ones_like(h), -torch.ones_like(h), h, h], -1)
    x = matrix[..., 0, :1] * xs + matrix[..., 0, 1:2] * ys + matrix[..., 0, 2:]
    y = matrix[..., 1, :1] * xs + matrix[..., 1, 1:2] * ys + matrix[..., 1, 2:]
    low = torch.stack([x.amin(-1), y.amin(-1)], -1).floor() - 1
    high = torch.stack([x.amax(-1), y.amax(-1)], -1).ceil() + 1
    extent = (high - low + 1).amax((0, 1)) if matrix.numel() else torch.ones(2)
    window = (min(_round_up(int(extent[1])), height), min(_round_up(int(extent[0])), width))
    if window[0] * window[1] > _WINDOW_SHARE * height * width:
        # windows this large save little and cost a gather and a scatter per pixel: use the
        # source itself (the device stage then reads and writes the canvas directly)
        window = (height, width)
    limit = torch.tensor([width - window[1], height - window[0]], dtype=low.dtype)
    origin = torch.minimum(low.clamp_min(0), limit).long()
    return origin, window


def collate_pastes(plans: list[PastePlan], size_a: tuple[int, int], size_b: tuple[int, int]
                   ) -> PasteBatch:
    """Stack per-sample plans (host side): each crop and its mask as one ``C + 1``-channel
    layer, placed one pixel in from the corner of a zero canvas the size of the batch's largest
    crop, with that one-pixel ring repeating the crop's edge in the image channels (so one
    bilinear read gives OpenCV's replicated border for the image and zero for the mask); and
    the paste windows in sources of ``size_a`` / ``size_b`` (:func:`paste_windows`)."""
    counts = {len(p.crops) for p in plans}
    if len(counts) != 1 or any(len(p.masks) != len(p.crops) for p in plans):
        raise PairContractError(f"paste plans in one batch need the same number of segments "
                                f"(crops and masks), got {sorted(counts)}")
    if {p.blend for p in plans} - set(BLENDS) or len({p.blend for p in plans}) != 1:
        raise PairContractError(f"paste plans in one batch need one blend out of {BLENDS}, got "
                                f"{sorted({p.blend for p in plans})}")
    if len({float(p.min_visible) for p in plans}) != 1:
        raise PairContractError("paste plans in one batch need one min_visible")
    k, size = counts.pop(), len(plans)
    every = [c for p in plans for c in p.crops]
    channels = every[0].shape[0]
    height = _round_up(max(c.shape[1] for c in every) + 2)
    width = _round_up(max(c.shape[2] for c in every) + 2)
    as_uint8 = all(c.dtype == torch.uint8 for c in every)  # 4× less to copy to the device
    layers = torch.zeros(size, k, channels + 1, height, width,
                         dtype=torch.uint8 if as_uint8 else torch.float32)
    opaque = 255 if as_uint8 else 1.0
    for b, plan in enumerate(plans):
        for j, (crop, mask) in enumerate(zip(plan.crops, plan.masks)):
            _, h, w = crop.shape
            if crop.dtype == torch.uint8 and not as_uint8:
                crop = crop.float() / 255.0
            image = layers[b, j, :channels]
            image[:, 1:h + 1, 1:w + 1] = crop
            image[:, 0, 1:w + 1], image[:, h + 1, 1:w + 1] = crop[:, 0], crop[:, -1]
            image[:, :h + 2, 0] = image[:, :h + 2, 1]
            image[:, :h + 2, w + 1] = image[:, :h + 2, w]
            layers[b, j, channels, 1:h + 1, 1:w + 1] = mask.to(layers.dtype) * opaque
    matrix_a = torch.stack([torch.as_tensor(p.matrix_a, dtype=torch.float64) for p in plans])
    matrix_b = torch.stack([torch.as_tensor(p.matrix_b, dtype=torch.float64) for p in plans])
    inverse_a = torch.linalg.inv(matrix_a)
    scale = torch.stack([torch.linalg.det(m[..., :2, :2]).abs() for m in (matrix_a, matrix_b)],
                        -1)
    crop_hw = torch.tensor([[c.shape[1:] for c in p.crops] for p in plans]).view(size, k, 2)
    origin_a, window_a = paste_windows(matrix_a, crop_hw, size_a)
    origin_b, window_b = paste_windows(matrix_b, crop_hw, size_b)
    return PasteBatch(
        layers=layers, inverse_a=inverse_a.float(), inverse_b=torch.linalg.inv(matrix_b).float(),
        matrix_ab=(matrix_b @ inverse_a).float(), paste_scale=scale.float(),
        labels=torch.stack([torch.as_tensor(p.labels, dtype=torch.long) for p in plans]),
        same_background=torch.tensor([bool(p.same_background) for p in plans]),
        blend=plans[0].blend, min_visible=float(plans[0].min_visible),
        origin_a=origin_a, origin_b=origin_b, window_a=window_a, window_b=window_b)


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack sources; uint8 ones (8-bit backgrounds awaiting the device stage) stay uint8
    unless the batch also holds float ones (e.g. a 16-bit file), which they then join."""
    if all(i.dtype == torch.uint8 for i in images) or not any(
            i.dtype == torch.uint8 for i in images):
        return torch.stack(images)
    return torch.stack([i.float() / 255.0 if i.dtype == torch.uint8 else i for i in images])


def _ones(h: int, w: int) -> torch.Tensor:
    return torch.ones(h, w, dtype=torch.bool)


def collate_pairs(samples: list[PairSample]) -> SourceBatch:
    shapes_a = {tuple(s.source_a.shape) for s in samples}
    shapes_b = {tuple(s.source_b.shape) for s in samples}
    if len(shapes_a) != 1 or len(shapes_b) != 1:
        raise PairContractError(f"all sources in a batch must share one shape; got source_a "
                                f"{sorted(shapes_a)} and source_b {sorted(shapes_b)}")
    planned = [s.paste is not None for s in samples]
    if any(planned) and not all(planned):
        raise PairContractError("a batch mixes samples with and without a paste plan; a "
                                "builder must defer compositing for all of its samples or none")
    _, ha, wa = samples[0].source_a.shape
    _, hb, wb = samples[0].source_b.shape
    any_grid = any(s.base_grid is not None for s in samples)
    base_grid = None
    if any_grid:
        base_grid = torch.stack([s.base_grid if s.base_grid is not None else pixel_grid(ha, wa)
                                 for s in samples])
    counts = [s.boxes_a.shape[0] for s in samples]
    box_batch = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts))
    class_map = None
    if any(s.class_map_a is not None for s in samples):
        class_map = torch.stack([
            s.class_map_a if s.class_map_a is not None
            else torch.full((ha, wa), -1, dtype=torch.long) for s in samples])
    return SourceBatch(
        source_a=_stack_images([s.source_a for s in samples]),
        source_b=_stack_images([s.source_b for s in samples]),
        valid_a=torch.stack([s.valid_a if s.valid_a is not None else _ones(ha, wa)
                             for s in samples]),
        valid_b=torch.stack([s.valid_b if s.valid_b is not None else _ones(hb, wb)
                             for s in samples]),
        base_grid=base_grid,
        base_valid=torch.stack([s.base_valid if s.base_valid is not None else _ones(ha, wa)
                                for s in samples]),
        boxes_a=torch.cat([s.boxes_a.float() for s in samples]),
        boxes_b=torch.cat([s.boxes_b.float() for s in samples]),
        box_batch=box_batch,
        box_label=torch.cat([s.labels.long() for s in samples]),
        instance_ids=torch.cat([s.instance_ids.long() for s in samples]),
        class_map_a=class_map,
        noisy=torch.tensor([bool(s.noisy) for s in samples]),
        meta=[s.meta for s in samples],
        # analysis-only noise mask and per-pair loss weights: None unless a sample has one
        noise_mask_a=(torch.stack([s.noise_mask_a if s.noise_mask_a is not None
                                   else torch.zeros(ha, wa, dtype=torch.bool) for s in samples])
                      if any(s.noise_mask_a is not None for s in samples) else None),
        pair_weight=(torch.tensor([1.0 if s.pair_weight is None else float(s.pair_weight)
                                   for s in samples], dtype=torch.float32)
                     if any(s.pair_weight is not None for s in samples) else None),
        paste=(collate_pastes([s.paste for s in samples], (ha, wa), (hb, wb)) if all(planned)
               else None),
    )
