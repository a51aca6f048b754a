"""Cut-paste compositing as a batched stage on the batch's device.

The host-side ``cut_paste`` builder warps every segment over the whole canvas with OpenCV, blends
full images in numpy and finds boxes with ``np.nonzero``: at 512-px sources that is ~25× the
cost of decoding the two backgrounds. With ``device_composite`` the DataLoader worker only
decodes the backgrounds (kept as uint8), picks segments (tight crops from the bank) and samples
their paste transforms (a :class:`~densessl.contract.PastePlan`); :func:`composite_pastes` then
does the rest for the whole batch wherever the batch is (GPU or CPU).

Each paste touches only its footprint, so the per-instance work runs in *windows*: collation
(on the host, where the paste matrices are) bounds every paste's footprint and gives the batch
one window size per view, the largest footprint rounded up; each paste gets its window's
origin. On the device:

* one batched ``grid_sample`` places every crop into its window (bilinear, the crop's edge
  replicated for the image and zero outside the crop for the alpha, like ``cv2.warpAffine`` in
  the host builder);
* alpha or transmission blending in paste order, and the coverage maps (last instance with any
  coverage, its coverage, instance on top), each a gather from and a scatter into the canvas at
  the window's pixels;
* the occlusion-aware base correspondence with the rule of
  :func:`~densessl.pairs.correspondence.instance_correspondence` (solid = opaque and nothing
  pasted later, 3×3 erosion in both sources, every pixel a bilinear read touches must show the
  same instance in B): the erosion and the shared background over the canvas, each instance's
  map and reads in its window;
* ``class_map_a`` (class of the top instance, −1 on the bag) and the boxes of the visible parts
  (:func:`torchvision.ops.masks_to_boxes` over each window), with ``box_valid`` marking the
  instances that stay at least ``min_visible`` on top in both sources.

Every shape depends only on the batch's shapes and the window sizes fixed at collation, never
on device values: no ``.item()``, no ``nonzero``, no boolean indexing, so on a GPU the stage
never waits for the device. Boxes that fail ``min_visible`` are dropped later, by the view
augmentation's box filter.
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


def _window_map(theta: Tensor, origin: Tensor, window: tuple[int, int]) -> Tensor:
    """The affine maps ``theta`` (N×3×3) of the pixels of windows placed at ``origin`` (N×2
    long, x, y): N×h×w×2. An affine map of a pixel grid is a row term plus a column term, so
    each coordinate costs one broadcast add (no per-pixel matrix product)."""
    height, width = window
    count = theta.shape[0]
    xs = torch.arange(width, dtype=theta.dtype, device=theta.device).view(1, 1, width)
    ys = torch.arange(height, dtype=theta.dtype, device=theta.device).view(1, height, 1)
    shift = theta[:, :2, :2] @ origin.to(theta.dtype)[..., None]  # the origin's offset
    out = torch.empty(count, height, width, 2, dtype=theta.dtype, device=theta.device)
    for axis in (0, 1):
        m = theta[:, axis, :, None, None]
        torch.add(m[:, 0] * xs, m[:, 1] * ys + (m[:, 2] + shift[:, axis, :, None]),
                  out=out[..., axis])
    return out


class _Windows:
    """Every paste's window in one view: its origin (B×k×2, x, y) and the canvas flat indices
    of its pixels (B×k×N, N = window height × width). A window as large as the source is the
    source itself (every origin is then 0): reads and writes go to the canvas directly."""

    def __init__(self, origin: Tensor, window: tuple[int, int], size: tuple[int, int]) -> None:
        height, width = window
        self.origin, self.window = origin, window
        self.whole = tuple(window) == tuple(size)
        self.index = None
        if not self.whole:
            ys = torch.arange(height, device=origin.device).view(1, 1, height, 1)
            xs = torch.arange(width, device=origin.device).view(1, 1, 1, width)
            rows = (origin[..., 1, None, None] + ys) * size[1]
            self.index = (rows + origin[..., 0, None, None] + xs).flatten(2)

    def _index(self, canvas: Tensor, j: int) -> Tensor:
        index = self.index[:, j]
        return index[:, None].expand(-1, canvas.shape[1], -1) if canvas.dim() == 3 else index

    def take(self, canvas: Tensor, j: int) -> Tensor:
        """Values of a B×HW (or B×C×HW, B×HW×2) canvas at window ``j``'s pixels."""
        if self.whole:
            return canvas
        if canvas.dim() == 3 and canvas.shape[-1] == 2:  # point grids: B×HW×2
            return canvas.gather(1, self.index[:, j, :, None].expand(-1, -1, 2))
        return canvas.gather(canvas.dim() - 1, self._index(canvas, j))

    def put(self, canvas: Tensor, j: int, values: Tensor) -> Tensor:
        """``canvas`` with ``values`` (shaped like :meth:`take`'s result) at window ``j``. A
        window holds each canvas pixel once, so the write is deterministic."""
        if self.whole:
            return values
        if canvas.dim() == 3 and canvas.shape[-1] == 2:
            return canvas.scatter_(1, self.index[:, j, :, None].expand(-1, -1, 2), values)
        return canvas.scatter_(canvas.dim() - 1, self._index(canvas, j), values)


def _as_float(image: Tensor) -> Tensor:
    """uint8 0..255 → float32 in [0, 1]; a float image as it is."""
    return image.float() / 255.0 if image.dtype == torch.uint8 else image


def _layers(paste: PasteBatch, dtype: torch.dtype) -> Tensor:
    """The crop-and-mask layers as ``dtype`` in [0, 1] (uint8 layers scaled), once per batch."""
    layers = paste.layers.to(dtype)
    return layers / 255.0 if paste.layers.dtype == torch.uint8 else layers


def _warp(layers: Tensor, inverse: Tensor, origin: Tensor, window: tuple[int, int]
          ) -> tuple[Tensor, Tensor]:
    """Every crop placed in its window: (B×k×C×N image, B×k×N coverage), one bilinear
    ``grid_sample`` of the image and mask channels together."""
    batch, k, channels, crop_h, crop_w = layers.shape
    # window pixel → canvas pixel (+ origin) → crop pixel (inverse) → layer pixel (+ 1: the
    # crop starts one pixel in, after the replicated edge) → grid_sample's normalised
    # coordinates (align_corners=False): one affine map per paste
    to_crop = inverse.new_tensor([[2 / crop_w, 0, 3 / crop_w - 1],
                                  [0, 2 / crop_h, 3 / crop_h - 1], [0, 0, 1]])
    theta = (to_crop @ inverse).reshape(batch * k, 3, 3).to(layers.dtype)
    grid = _window_map(theta, origin.reshape(batch * k, 2), window)
    out = F.grid_sample(layers.reshape(batch * k, channels, crop_h, crop_w), grid,
                        mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(batch, k, channels, window[0] * window[1])
    # bilinear weights of values in [0, 1] stay in [0, 1] up to rounding: no clamp pass
    return out[:, :, :-1], out[:, :, -1]


def _paint(background: Tensor, windows: _Windows, layers: Tensor, alpha: Tensor, blend: str
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Blend the layers onto ``background`` in paste order (a later segment covers earlier
    ones) and label every canvas pixel (B×HW uint8) with 1 + the index of the last instance
    with any coverage (``last``, 0 = none), whether that instance is opaque there (``opaque``)
    and 1 + the index of the last instance with coverage above 0.5 (``top``, as the host
    builder's). Returns (image B×C×H×W, last, opaque, top)."""
    batch, channels, height, width = background.shape
    image = background.reshape(batch, channels, -1)
    if not windows.whole:
        image = image.clone()  # written in place, window by window
    last = torch.zeros(batch, height * width, dtype=torch.uint8, device=image.device)
    top, opaque = torch.zeros_like(last), torch.zeros_like(last, dtype=torch.bool)
    for j in range(layers.shape[1]):
        a = alpha[:, j]
        under, a_c = windows.take(image, j), a[:, None]
        if blend == "alpha":
            over = torch.lerp(under, layers[:, j], a_c)
        else:  # transmissions multiply (Beer–Lambert)
            over = under * torch.lerp(torch.ones_like(a_c), layers[:, j], a_c)
        image = windows.put(image, j, over)
        covers = a > 0.0
        last = windows.put(last, j, torch.where(covers, j + 1, windows.take(last, j)))
        opaque = windows.put(opaque, j, torch.where(covers, a >= OPAQUE,
                                                    windows.take(opaque, j)))
        top = windows.put(top, j, torch.where(a > 0.5, j + 1, windows.take(top, j)))
    return image.view_as(background), last, opaque, top


def _eroded_labels(last: Tensor, opaque: Tensor, background_label: Tensor,
                   size: tuple[int, int]) -> Tensor:
    """B×H×W uint8: j + 1 where instance j shows alone and fully (opaque, nothing pasted later
    covers it), ``background_label`` (B, 0 = none) where no instance covers the pixel, 0
    elsewhere; kept only where the pixel and its eight neighbours carry the same label, outside
    the image counting as 0: the 3×3 erosion of every region at once, as separable neighbour
    comparisons."""
    labels = torch.where(last == 0, background_label.to(last.dtype)[:, None],
                         torch.where(opaque, last, 0))
    padded = F.pad(labels.view(-1, *size), (1, 1, 1, 1), value=0)
    centre = padded[:, 1:-1, 1:-1]
    rows = (padded[:, :, :-2] == padded[:, :, 1:-1]) & (padded[:, :, 2:] == padded[:, :, 1:-1])
    same = (rows[:, :-2] & rows[:, 1:-1] & rows[:, 2:]
            & (padded[:, :-2, 1:-1] == centre) & (padded[:, 2:, 1:-1] == centre))
    return torch.where(same, centre, 0)


def _reads_only(labels: Tensor, xy: Tensor, want: Tensor) -> Tensor:
    """True where a bilinear read of ``labels``' image (B×H×W) at ``xy`` (B×…×2 pixels) gives
    weight only to pixels inside the image whose label is ``want`` (B×…, non-zero)."""
    batch, height, width = labels.shape
    # a ring of label 0 around the image stands for "outside": a read that touches it fails
    # the label test, so positions only need clamping onto the ring (NaN and ±inf included)
    ring = F.pad(labels, (1, 1, 1, 1), value=0).reshape(batch, -1)
    x = torch.nan_to_num(xy[..., 0], nan=-1.0).clamp(-1.0, float(width))
    y = torch.nan_to_num(xy[..., 1], nan=-1.0).clamp(-1.0, float(height))
    fx, fy = torch.floor(x), torch.floor(y)
    step_x = (x > fx).long().reshape(batch, -1)  # an integer position reads one pixel
    step_y = (y > fy).long().reshape(batch, -1) * (width + 2)
    corner = ((fy.long() + 1) * (width + 2) + fx.long() + 1).reshape(batch, -1)
    want = want.reshape(batch, -1).to(labels.dtype)
    ok = ring.gather(1, corner) == want
    for offset in (step_x, step_y, step_x + step_y):
        ok &= ring.gather(1, corner + offset) == want
    return ok.view(xy.shape[:-1])


def _window_boxes(top: Tensor, windows: _Windows, j: int) -> tuple[Tensor, Tensor]:
    """COCO-edge box (B×4) of instance ``j``'s pixels on top, and their number (B)."""
    visible = windows.take(top, j) == j + 1
    boxes = masks_to_boxes(visible.view(-1, *windows.window))
    corner = windows.origin[:, j].to(boxes.dtype).repeat(1, 2)  # window → canvas pixels
    boxes = boxes + corner + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    count = visible.sum(1)
    return boxes * (count > 0)[:, None], count


def composite_pastes(batch: SourceBatch) -> SourceBatch:
    """Paste ``batch.paste`` onto the backgrounds in ``source_a`` / ``source_b``; returns the
    batch with composited sources (float; uint8 backgrounds are scaled to [0, 1]), base
    correspondence, class map and ``k`` box pairs per image (``box_valid`` False where an
    instance stays under ``min_visible``)."""
    paste = batch.paste
    if paste is None:
        return batch
    if paste.blend not in BLENDS:
        raise PairContractError(f"paste blend: expected one of {BLENDS}, got {paste.blend!r}")
    size_a, size_b = tuple(batch.source_a.shape[-2:]), tuple(batch.source_b.shape[-2:])
    for name, window, size in (("a", paste.window_a, size_a), ("b", paste.window_b, size_b)):
        if window[0] > size[0] or window[1] > size[1]:
            raise PairContractError(f"paste window_{name} {window} is larger than source_{name} "
                                    f"{size}; collate the plans with the sources' sizes")
    # workers ship 8-bit backgrounds as uint8 (4× fewer bytes); they are scaled here
    background_a, background_b = _as_float(batch.source_a), _as_float(batch.source_b)
    dtype, device = background_a.dtype, background_a.device
    b, k = paste.labels.shape
    win_a = _Windows(paste.origin_a, paste.window_a, size_a)
    win_b = _Windows(paste.origin_b, paste.window_b, size_b)
    layers = _layers(paste, dtype)
    layers_a, alpha_a = _warp(layers, paste.inverse_a, paste.origin_a, paste.window_a)
    layers_b, alpha_b = _warp(layers, paste.inverse_b, paste.origin_b, paste.window_b)
    del layers
    source_a, last_a, opaque_a, top_a = _paint(background_a, win_a, layers_a, alpha_a,
                                               paste.blend)
    source_b, last_b, opaque_b, top_b = _paint(background_b, win_b, layers_b, alpha_b,
                                               paste.blend)

    same = paste.same_background
    label_a = _eroded_labels(last_a, opaque_a, torch.where(same, k + 1, 0), size_a)
    label_b = _eroded_labels(last_b, opaque_b, torch.full_like(same, k + 1, dtype=torch.long),
                             size_b)

    # the top instance's map (A pixel → B pixel) in its window, the shared background's
    # identity elsewhere; valid where the pixel is solid in A and every pixel the read touches
    # in B shows the same label (an instance, or the shared bag)
    pixels = pixel_grid(*size_a, device=device).reshape(1, -1, 2)
    grid = torch.where(same[:, None, None], pixels, torch.zeros_like(pixels))
    boxes_a, boxes_b, seen_a, seen_b = [], [], [], []
    for j in range(k):
        mapped = _window_map(paste.matrix_ab[:, j], paste.origin_a[:, j], paste.window_a)
        mapped = mapped.view(b, -1, 2)
        on_top = (win_a.take(top_a, j) == j + 1)[..., None]
        grid = win_a.put(grid, j, torch.where(on_top, mapped, win_a.take(grid, j)))
        for boxes, seen, top, windows in ((boxes_a, seen_a, top_a, win_a),
                                          (boxes_b, seen_b, top_b, win_b)):
            box, count = _window_boxes(top, windows, j)
            boxes.append(box)
            seen.append(count)
    grid = grid.view(b, *size_a, 2)
    valid = (label_a > 0) & _reads_only(label_b, grid, label_a)

    labels = paste.labels
    class_map = torch.where(top_a > 0, labels.gather(1, (top_a.long() - 1).clamp_min(0)), -1)
    mask_area = (paste.layers[:, :, -1] > 0).sum((2, 3))  # the mask's pixels, exactly
    seen_a = torch.stack(seen_a, 1) / (mask_area * paste.paste_scale[..., 0]).clamp_min(1.0)
    seen_b = torch.stack(seen_b, 1) / (mask_area * paste.paste_scale[..., 1]).clamp_min(1.0)
    keep = torch.minimum(seen_a, seen_b) >= paste.min_visible
    return replace(
        batch, source_a=source_a, source_b=source_b, base_grid=grid, base_valid=valid,
        class_map_a=class_map.view(b, *size_a),
        boxes_a=torch.stack(boxes_a, 1).reshape(-1, 4),
        boxes_b=torch.stack(boxes_b, 1).reshape(-1, 4),
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
