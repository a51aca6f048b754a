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

from densessl.contract import BLENDS, PairSample, PasteBatch, SourceBatch
from densessl.errors import PairContractError
from densessl.pairs.collate import collate_pairs
from densessl.pairs.correspondence import OPAQUE, pixel_grid


def _affine(matrix: Tensor, points: Tensor) -> Tensor:
    """Affine ``matrix`` (…×3×3) applied to an H×W×2 point grid → …×H×W×2."""
    m = matrix[..., None, None, :2, :]  # …×1×1×2×3
    x, y = points[..., 0, None], points[..., 1, None]
    return m[..., 0] * x + m[..., 1] * y + m[..., 2]


def _warp(paste: PasteBatch, inverse: Tensor, size: tuple[int, int], dtype: torch.dtype
          ) -> tuple[Tensor, Tensor]:
    """Every crop pasted on an ``size`` canvas: (B×k×C×H×W image, B×k×H×W coverage), with one
    bilinear ``grid_sample`` of the image and mask channels together."""
    batch, k, channels, crop_h, crop_w = paste.layers.shape
    layers = paste.layers.to(dtype)
    if paste.layers.dtype == torch.uint8:
        layers = layers / 255.0
    # source pixel → crop pixel (+ 1: the crop starts one pixel in, after the replicated
    # edge), written between grid_sample's normalised coordinates (align_corners=False) so
    # that affine_grid builds the sampling grid in one batched product
    height, width = size
    to_pixel = inverse.new_tensor([[width / 2, 0, (width - 1) / 2],
                                   [0, height / 2, (height - 1) / 2], [0, 0, 1]])
    to_crop = inverse.new_tensor([[2 / crop_w, 0, 3 / crop_w - 1],
                                  [0, 2 / crop_h, 3 / crop_h - 1], [0, 0, 1]])
    theta = (to_crop @ inverse @ to_pixel)[..., :2, :].reshape(batch * k, 2, 3)
    grid = F.affine_grid(theta.to(dtype), [batch * k, channels, *size], align_corners=False)
    out = F.grid_sample(layers.reshape(batch * k, channels, crop_h, crop_w), grid,
                        mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(batch, k, channels, *size)
    return out[:, :, :-1], out[:, :, -1].clamp(0.0, 1.0)


def _blend(background: Tensor, layers: Tensor, alpha: Tensor, blend: str) -> Tensor:
    image = background
    for j in range(layers.shape[1]):  # paste order: a later segment covers earlier ones
        a = alpha[:, j, None]
        if blend == "alpha":
            image = (1.0 - a) * image + a * layers[:, j]
        else:  # transmissions multiply (Beer–Lambert)
            image = image * (1.0 - a + a * layers[:, j])
    return image


def _last(alpha: Tensor, threshold: float) -> Tensor:
    """B×H×W long: 1 + index of the last instance with coverage above ``threshold`` (0 if
    none): the instance on top there."""
    k = alpha.shape[1]
    ranks = torch.arange(1, k + 1, device=alpha.device).view(1, k, 1, 1)
    return torch.where(alpha > threshold, ranks, 0).amax(1)


def _eroded_labels(alpha: Tensor, background_label: Tensor) -> Tensor:
    """B×H×W long: j + 1 where instance j shows alone and fully (coverage >= OPAQUE, nothing
    pasted later covers it), ``background_label`` (B, 0 = none) where no instance covers the
    pixel, 0 elsewhere; then kept only where the pixel and its eight neighbours carry the same
    label, outside the image counting as 0: the 3×3 erosion of every region at once."""
    last = _last(alpha, 0.0)  # the last instance covering the pixel at all
    on_top = alpha.gather(1, (last - 1).clamp_min(0)[:, None])[:, 0]
    labels = torch.where(on_top >= OPAQUE, last, 0)
    labels = torch.where(last == 0, background_label[:, None, None], labels)
    padded = F.pad(labels[:, None].float(), (1, 1, 1, 1), value=0.0)
    high = F.max_pool2d(padded, 3, stride=1)[:, 0]
    low = -F.max_pool2d(-padded, 3, stride=1)[:, 0]
    return torch.where((high == low) & (labels > 0), labels, 0)


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

    top_a, top_b = _last(alpha_a, 0.5), _last(alpha_b, 0.5)  # as the host builder's ``top``
    same = paste.same_background
    label_a = _eroded_labels(alpha_a, torch.where(same, k + 1, 0))
    label_b = _eroded_labels(alpha_b, torch.full_like(same, k + 1, dtype=torch.long))

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
    mask_area = (paste.layers[:, :, -1] > 0).sum((2, 3))  # the mask's pixels, exactly
    boxes_a, seen_a = _visible_boxes(top_a, k, mask_area * paste.paste_scale[..., 0])
    boxes_b, seen_b = _visible_boxes(top_b, k, mask_area * paste.paste_scale[..., 1])
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
    if sample.paste is None:
        return sample
    done = composite_pastes(collate_pairs([sample]))
    keep = done.box_valid
    return replace(sample, source_a=done.source_a[0], source_b=done.source_b[0],
                   base_grid=done.base_grid[0], base_valid=done.base_valid[0],
                   class_map_a=done.class_map_a[0], boxes_a=done.boxes_a[keep],
                   boxes_b=done.boxes_b[keep], instance_ids=done.instance_ids[keep],
                   labels=done.box_label[keep], paste=None)
