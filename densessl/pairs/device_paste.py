"""Cut-paste compositing as a batched stage on the batch's device.

The host-side ``cut_paste`` builder warps every segment over the whole canvas with OpenCV, blends
full images in numpy and finds boxes with ``np.nonzero``: at 512-px sources that is ~55× the
cost of decoding the two backgrounds. With ``device_composite`` the DataLoader worker only
decodes the backgrounds, picks segments (tight crops from the bank) and samples their paste
transforms (a :class:`~densessl.contract.PastePlan`); :func:`composite_pastes` then does the rest
for the whole batch wherever the batch is (GPU or CPU):

* one batched ``grid_sample`` places every crop (bilinear, the crop's edge replicated for the
  image and zero outside the crop for the alpha, like ``cv2.warpAffine`` in the host builder);
* alpha or transmission blending in paste order;
* the occlusion-aware base correspondence with the rule of
  :func:`~densessl.pairs.correspondence.instance_correspondence` (solid = opaque and nothing
  pasted later, 3×3 erosion in both sources, every pixel a bilinear read touches must show the
  same instance in B), evaluated with fixed-shape gathers;
* ``class_map_a`` (class of the top instance, −1 on the bag) and the boxes of the visible parts
  (:func:`torchvision.ops.masks_to_boxes`), with ``box_valid`` marking the instances that stay
  at least ``min_visible`` on top in both sources.

Every shape depends only on the batch's shapes, never on its values: no ``.item()``, no
``nonzero``, no boolean indexing, so on a GPU the stage never waits for the device. Boxes that
fail ``min_visible`` are dropped later, by the view augmentation's box filter.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import masks_to_boxes

from densessl.contract import PairSample, PasteBatch, PastePlan, SourceBatch
from densessl.errors import PairContractError
from densessl.pairs.correspondence import OPAQUE, pixel_grid

BLENDS = ("alpha", "transmission")
#: padded crop sides are rounded up to a multiple of this, so consecutive batches mostly share
#: shapes (allocator and kernel caches stay warm)
_PAD_MULTIPLE = 16


def _round_up(value: int) -> int:
    return -(-value // _PAD_MULTIPLE) * _PAD_MULTIPLE


def collate_pastes(plans: list[PastePlan]) -> PasteBatch:
    """Stack per-sample plans (host side): crops zero-padded to the batch's largest crop."""
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
    height = _round_up(max(c.shape[1] for c in every))
    width = _round_up(max(c.shape[2] for c in every))
    as_uint8 = all(c.dtype == torch.uint8 for c in every)  # 4× less to copy to the device
    crops = torch.zeros(size, k, channels, height, width,
                        dtype=torch.uint8 if as_uint8 else torch.float32)
    masks = torch.zeros(size, k, height, width, dtype=torch.bool)
    crop_size = torch.zeros(size, k, 2)
    for b, plan in enumerate(plans):
        for j, (crop, mask) in enumerate(zip(plan.crops, plan.masks)):
            _, h, w = crop.shape
            if crop.dtype == torch.uint8 and not as_uint8:
                crop = crop.float() / 255.0
            crops[b, j, :, :h, :w] = crop
            masks[b, j, :h, :w] = mask
            crop_size[b, j] = torch.tensor([w, h])
    matrix_a = torch.stack([torch.as_tensor(p.matrix_a, dtype=torch.float64) for p in plans])
    matrix_b = torch.stack([torch.as_tensor(p.matrix_b, dtype=torch.float64) for p in plans])
    inverse_a, inverse_b = torch.linalg.inv(matrix_a), torch.linalg.inv(matrix_b)
    area = masks.sum((2, 3)).double()
    scale_a = torch.linalg.det(matrix_a[..., :2, :2]).abs()
    scale_b = torch.linalg.det(matrix_b[..., :2, :2]).abs()
    return PasteBatch(
        crops=crops, masks=masks, crop_size=crop_size, inverse_a=inverse_a.float(),
        inverse_b=inverse_b.float(), matrix_ab=(matrix_b @ inverse_a).float(),
        pasted_area=torch.stack([area * scale_a, area * scale_b], -1).float(),
        labels=torch.stack([torch.as_tensor(p.labels, dtype=torch.long) for p in plans]),
        same_background=torch.tensor([bool(p.same_background) for p in plans]),
        blend=plans[0].blend, min_visible=float(plans[0].min_visible))


def _affine(matrix: Tensor, points: Tensor) -> Tensor:
    """Affine ``matrix`` (…×3×3) applied to an H×W×2 point grid → …×H×W×2."""
    linear, shift = matrix[..., :2, :2], matrix[..., :2, 2]
    out = torch.einsum("...ij,hwj->...hwi", linear, points)
    return out + shift[..., None, None, :]


def _warp(paste: PasteBatch, inverse: Tensor, size: tuple[int, int], dtype: torch.dtype
          ) -> tuple[Tensor, Tensor]:
    """Every crop pasted on an ``size`` canvas: (B×k×C×H×W image, B×k×H×W coverage)."""
    batch, k, channels, crop_h, crop_w = paste.crops.shape
    crops = paste.crops.to(dtype)
    if paste.crops.dtype == torch.uint8:
        crops = crops / 255.0
    at = _affine(inverse, pixel_grid(*size, device=inverse.device))  # crop pixel of each pixel
    scale = at.new_tensor([2.0 / crop_w, 2.0 / crop_h])
    # the image repeats its edge beyond the crop (BORDER_REPLICATE); the mask is zero there,
    # which the zero padding up to the batch's crop size and grid_sample's zeros both give
    edge = (paste.crop_size - 1.0)[:, :, None, None, :].to(at)
    inside = torch.minimum(at.clamp_min(0.0), edge)
    flat = (batch * k, *size, 2)
    image = F.grid_sample(crops.reshape(batch * k, channels, crop_h, crop_w),
                          ((inside + 0.5) * scale - 1.0).reshape(flat).to(dtype),
                          mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = F.grid_sample(paste.masks.to(dtype).reshape(batch * k, 1, crop_h, crop_w),
                          ((at + 0.5) * scale - 1.0).reshape(flat).to(dtype),
                          mode="bilinear", padding_mode="zeros", align_corners=False)
    return (image.reshape(batch, k, channels, *size),
            alpha.reshape(batch, k, *size).clamp(0.0, 1.0))


def _blend(background: Tensor, layers: Tensor, alpha: Tensor, blend: str) -> Tensor:
    image = background
    for j in range(layers.shape[1]):  # paste order: a later segment covers earlier ones
        a = alpha[:, j, None]
        if blend == "alpha":
            image = (1.0 - a) * image + a * layers[:, j]
        else:  # transmissions multiply (Beer–Lambert)
            image = image * (1.0 - a + a * layers[:, j])
    return image


def _erode(mask: Tensor) -> Tensor:
    """3×3 erosion of …×H×W bool masks, outside the image counting as False."""
    shape = mask.shape
    holes = F.pad((~mask).reshape(-1, 1, *shape[-2:]).float(), (1, 1, 1, 1), value=1.0)
    return (F.max_pool2d(holes, 3, stride=1) < 0.5).reshape(shape)


def _solid_labels(alpha: Tensor, background_label: Tensor) -> Tensor:
    """B×H×W long: j + 1 where instance j shows alone and fully with its eight neighbours
    (coverage >= OPAQUE, nothing pasted later), ``background_label`` (B, 0 = none) where no
    instance covers the pixel or its neighbours, 0 elsewhere."""
    k = alpha.shape[1]
    covered = alpha > 0
    # covered by instance j or a later one; shifted by one: covered by a later one only
    from_here = covered.flip(1).to(torch.int32).cumsum(1).flip(1) > 0
    later = torch.cat([from_here[:, 1:], torch.zeros_like(from_here[:, :1])], dim=1)
    solid = _erode((alpha >= OPAQUE) & ~later)  # disjoint across j
    ranks = torch.arange(1, k + 1, device=alpha.device).view(1, k, 1, 1)
    labels = (solid.long() * ranks).sum(1)
    bare = _erode(~covered.any(1))
    return torch.where(bare, background_label[:, None, None], labels)


def _reads_only(labels: Tensor, xy: Tensor, want: Tensor) -> Tensor:
    """True where a bilinear read of ``labels``' image (B×H×W) at ``xy`` (B×h×w×2 pixels) gives
    weight only to pixels inside the image whose label is ``want`` (B×h×w)."""
    batch, height, width = labels.shape
    finite = torch.isfinite(xy).all(-1)
    # far outside is outside either way; clamping keeps the integer conversion safe
    x = torch.where(finite, xy[..., 0], -2.0).clamp(-2.0, width + 1.0)
    y = torch.where(finite, xy[..., 1], -2.0).clamp(-2.0, height + 1.0)
    fx, fy = torch.floor(x), torch.floor(y)
    x0, y0 = fx.long(), fy.long()
    dx, dy = (x > fx).long(), (y > fy).long()  # an integer position reads one pixel
    ok = finite & (x0 >= 0) & (y0 >= 0) & (x0 + dx < width) & (y0 + dy < height)
    x0, y0 = x0.clamp(0, width - 1), y0.clamp(0, height - 1)
    x1, y1 = (x0 + dx).clamp(max=width - 1), (y0 + dy).clamp(max=height - 1)
    flat = labels.reshape(batch, -1)
    for yy, xx in ((y0, x0), (y0, x1), (y1, x0), (y1, x1)):
        ok = ok & (flat.gather(1, (yy * width + xx).reshape(batch, -1)).view_as(want) == want)
    return ok


def _visible_boxes(top: Tensor, k: int, pasted_area: Tensor) -> tuple[Tensor, Tensor]:
    """COCO-edge boxes (B×k×4) of each instance's pixels on top, and its visible fraction."""
    batch, height, width = top.shape
    ranks = torch.arange(1, k + 1, device=top.device).view(1, k, 1, 1)
    visible = top[:, None] == ranks
    count = visible.sum((2, 3))
    boxes = masks_to_boxes(visible.reshape(batch * k, height, width)).view(batch, k, 4)
    boxes = (boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])) * (count > 0)[..., None]
    return boxes, count / pasted_area.clamp_min(1.0)


def composite_pastes(batch: SourceBatch) -> SourceBatch:
    """Paste ``batch.paste`` onto the backgrounds in ``source_a`` / ``source_b``; returns the
    batch with composited sources, base correspondence, class map and ``k`` box pairs per
    image (``box_valid`` False where an instance stays under ``min_visible``)."""
    paste = batch.paste
    if paste is None:
        return batch
    if paste.blend not in BLENDS:
        raise PairContractError(f"paste blend: expected one of {BLENDS}, got {paste.blend!r}")
    size_a, size_b = tuple(batch.source_a.shape[-2:]), tuple(batch.source_b.shape[-2:])
    dtype, device = batch.source_a.dtype, batch.source_a.device
    b, k = paste.labels.shape
    layers_a, alpha_a = _warp(paste, paste.inverse_a, size_a, dtype)
    layers_b, alpha_b = _warp(paste, paste.inverse_b, size_b, dtype)
    source_a = _blend(batch.source_a, layers_a, alpha_a, paste.blend)
    source_b = _blend(batch.source_b, layers_b, alpha_b, paste.blend)

    ranks = torch.arange(1, k + 1, device=device).view(1, k, 1, 1)
    top_a = torch.where(alpha_a > 0.5, ranks, 0).amax(1)  # last instance with alpha > 0.5
    top_b = torch.where(alpha_b > 0.5, ranks, 0).amax(1)
    same = paste.same_background
    label_a = _solid_labels(alpha_a, torch.where(same, k + 1, 0))
    label_b = _solid_labels(alpha_b, torch.full_like(same, k + 1, dtype=torch.long))

    # the top instance's map (A pixel → B pixel), the shared background's identity elsewhere
    pixels = pixel_grid(*size_a, device=device)
    grid = torch.where(same[:, None, None, None], pixels, torch.zeros_like(pixels))
    for j in range(k):
        grid = torch.where((top_a == j + 1)[..., None], _affine(paste.matrix_ab[:, j], pixels),
                           grid)
    valid = (label_a > 0) & _reads_only(label_b, grid, label_a)

    labels = paste.labels
    class_map = torch.where(top_a > 0, labels.gather(1, (top_a - 1).clamp_min(0).view(b, -1))
                            .view_as(top_a), -1)
    boxes_a, seen_a = _visible_boxes(top_a, k, paste.pasted_area[..., 0])
    boxes_b, seen_b = _visible_boxes(top_b, k, paste.pasted_area[..., 1])
    keep = torch.minimum(seen_a, seen_b) >= paste.min_visible
    return replace(
        batch, source_a=source_a, source_b=source_b, base_grid=grid, base_valid=valid,
        class_map_a=class_map, boxes_a=boxes_a.reshape(-1, 4), boxes_b=boxes_b.reshape(-1, 4),
        box_batch=torch.arange(b, device=device).repeat_interleave(k),
        box_label=labels.reshape(-1),
        instance_ids=torch.arange(1, k + 1, device=device).repeat(b),
        box_valid=keep.reshape(-1), paste=None)


def composite_sample(sample: PairSample) -> PairSample:
    """One deferred sample composited on the host: a complete PairSample (for code that reads
    the pixels before collation, e.g. the noise injectors)."""
    from densessl.pairs.collate import collate_pairs

    if sample.paste is None:
        return sample
    done = composite_pastes(collate_pairs([sample]))
    keep = done.box_valid
    return replace(sample, source_a=done.source_a[0], source_b=done.source_b[0],
                   base_grid=done.base_grid[0], base_valid=done.base_valid[0],
                   class_map_a=done.class_map_a[0], boxes_a=done.boxes_a[keep],
                   boxes_b=done.boxes_b[keep], instance_ids=done.instance_ids[keep],
                   labels=done.box_label[keep], paste=None)
