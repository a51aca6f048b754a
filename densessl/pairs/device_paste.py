"""Cut-paste compositing as a batched stage on the batch's device.

The host-side ``cut_paste`` builder warps every segment over the whole canvas with OpenCV, blends
full images in numpy and finds boxes with ``np.nonzero``: at 512-px sources that is ~25× the
cost of decoding the two backgrounds. With ``device_composite`` the DataLoader worker only
decodes the backgrounds (kept as uint8), picks segments (tight crops from the bank) and samples
their paste transforms (a :class:`~densessl.contract.PastePlan`); :func:`composite_pastes` then
does the rest for the whole batch wherever the batch is (GPU or CPU).

Each paste touches only its footprint, so the per-instance work runs in square *tiles*: the
sources are cut into ``tile``-px tiles and collation (on the host, where the paste matrices
are) lists the tiles under every paste's footprint, about a third of k whole canvases at
512 px. Work per paste is then proportional to its footprint, not to the canvas. On the device:

* one ``grid_sample`` over an *atlas* holding every crop places each crop into its tiles
  (bilinear, the crop's edge replicated for the image and zero outside the crop for the
  alpha, like ``cv2.warpAffine`` in the host builder);
* alpha or transmission blending in paste order, and the coverage maps (last instance with any
  coverage, its coverage, instance on top): per paste order ``j``, one ``index_select`` of the
  tiles it touches and one ``index_copy_`` back (tiles of one ``j`` never repeat);
* the occlusion-aware base correspondence with the rule of
  :func:`~densessl.pairs.correspondence.instance_correspondence` (solid = opaque and nothing
  pasted later, 3×3 erosion in both sources, every pixel a bilinear read touches must show the
  same instance in B): the erosion over the canvas, each instance's map and reads in its
  tiles; the shared bag maps to itself, so its read is one pixel, compared in place;
* ``class_map_a`` (class of the top instance, −1 on the bag) and the boxes of the visible parts
  (per-tile extents reduced per paste), with ``box_valid`` marking the instances that stay at
  least ``min_visible`` on top in both sources.

Every shape depends only on the batch's shapes and the tile lists fixed at collation, never on
device values: no ``.item()``, no ``nonzero``, no boolean indexing, so on a GPU the stage never
waits for the device. Boxes that fail ``min_visible`` are dropped later, by the view
augmentation's box filter.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.contract import BLENDS, PairSample, PasteBatch, SourceBatch
from densessl.errors import PairContractError
from densessl.pairs.collate import collate_pairs
from densessl.pairs.correspondence import OPAQUE

#: coverage at or below this counts as none. Float32 atlas coordinates round by up to ~1e-4 px
#: at a few thousand pixels, so a point exactly on a crop's outer edge can pick up that much
#: of the mask; OpenCV's warp in the host builder quantises its bilinear weights to 1/32 px,
#: so its smallest non-zero coverage is 1/1024 and it can show nothing finer either
_COVERAGE_FLOOR = 1e-3

#: larger than any pixel coordinate: the empty extent of a tile without the instance
_FAR = 1 << 30


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


class _Tiles:
    """One view's sources cut into ``tile``-px tiles, and the tiles the pastes touch (rows of
    ``PasteBatch.tiles_a`` / ``tiles_b``): their index among the batch's ``B·ny·nx`` tiles,
    their paste (``b·k + j``), image and pixel origin (x, y)."""

    def __init__(self, rows: Tensor, rounds: tuple[int, ...], batch: int,
                 size: tuple[int, int], tile: int) -> None:
        self.batch, self.size, self.tile = batch, size, tile
        self.ny, self.nx = -(-size[0] // tile), -(-size[1] // tile)
        self.rounds = rounds
        self.index, self.paste = rows[:, 0], rows[:, 1]
        self.image_of = self.index // (self.ny * self.nx)
        self.origin = self.origins(self.index)

    def origins(self, index: Tensor) -> Tensor:
        """Pixel origin (x, y) of tiles ``index`` (N, among the batch's B·ny·nx): N×2."""
        within = index % (self.ny * self.nx)
        return torch.stack([within % self.nx, within // self.nx], 1) * self.tile

    def round(self, j: int) -> slice:
        """The rows of paste order ``j``."""
        return slice(self.rounds[j], self.rounds[j + 1])

    def identity(self, keep: Tensor, dtype: torch.dtype) -> Tensor:
        """(B·ny·nx)×2×T×T: every pixel's own (x, y) in the images where ``keep`` (B bool),
        zeros in the others."""
        t, count = self.tile, self.batch * self.ny * self.nx
        steps = torch.arange(t, dtype=dtype, device=keep.device)
        tile = torch.arange(count, device=keep.device)
        origin = self.origins(tile).to(dtype)
        scale = keep.to(dtype)[tile // (self.ny * self.nx)].view(-1, 1, 1)
        grid = torch.empty(count, 2, t, t, dtype=dtype, device=keep.device)
        grid[:, 0] = (steps + origin[:, 0, None])[:, None, :] * scale
        grid[:, 1] = (steps + origin[:, 1, None])[:, :, None] * scale
        return grid

    def inside(self, mask: Tensor, rows: slice) -> Tensor:
        """``mask`` (N×T×T, of tiles ``rows``) without the padding past the source's edge."""
        t, (height, width) = self.tile, self.size
        if height % t == 0 and width % t == 0:
            return mask
        steps = torch.arange(t, device=mask.device)
        origin = self.origin[rows]
        xs = (steps + origin[:, 0, None]) < width
        ys = (steps + origin[:, 1, None]) < height
        return mask & xs[:, None, :] & ys[:, :, None]

    def split(self, image: Tensor) -> Tensor:
        """B×C×H×W → (B·ny·nx)×C×T×T, the source padded to whole tiles (a B×H×W label map →
        (B·ny·nx)×T×T)."""
        if image.dim() == 3:
            return self.split(image[:, None])[:, 0]
        t, (height, width) = self.tile, self.size
        pad_y, pad_x = self.ny * t - height, self.nx * t - width
        if pad_y or pad_x:
            image = F.pad(image, (0, pad_x, 0, pad_y))
        channels = image.shape[1]
        tiles = image.reshape(self.batch, channels, self.ny, t, self.nx, t)
        return tiles.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, t, t)

    def join(self, tiles: Tensor) -> Tensor:
        """(B·ny·nx)×C×T×T → B×C×H×W (the inverse of :meth:`split`; (B·ny·nx)×T×T label
        tiles → B×H×W)."""
        if tiles.dim() == 3:
            return self.join(tiles[:, None])[:, 0]
        t, (height, width) = self.tile, self.size
        channels = tiles.shape[1]
        image = tiles.reshape(self.batch, self.ny, self.nx, channels, t, t)
        image = image.permute(0, 3, 1, 4, 2, 5).reshape(self.batch, channels, self.ny * t,
                                                          self.nx * t)
        return image[:, :, :height, :width]


def _as_float(image: Tensor) -> Tensor:
    """uint8 0..255 → float32 in [0, 1] (one pass: the division promotes); a float image as
    it is."""
    return image / 255.0 if image.dtype == torch.uint8 else image


def _warp(atlas: Tensor, paste: PasteBatch, inverse: Tensor, tiles: _Tiles
          ) -> tuple[Tensor, Tensor]:
    """Every listed tile of its paste's crop: (N×C×T×T image, N×T×T coverage), one bilinear
    ``grid_sample`` of the atlas (image and mask channels together)."""
    t, count = tiles.tile, tiles.paste.shape[0]
    height, width = atlas.shape[-2:]
    cells = paste.cells.reshape(-1, 4).index_select(0, tiles.paste).to(atlas.dtype)
    # tile pixel → source pixel (+ origin) → crop pixel (inverse) → atlas pixel (+ 1: the crop
    # starts one pixel into its cell) → grid_sample's coordinates (align_corners=True): one
    # affine map per tile
    scale = cells.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    to_atlas = torch.zeros(count, 3, 3, dtype=atlas.dtype, device=atlas.device)
    to_atlas[:, 0, 0], to_atlas[:, 1, 1], to_atlas[:, 2, 2] = scale[0], scale[1], 1.0
    to_atlas[:, :2, 2] = (cells[:, :2] + 1.0) * scale - 1.0
    theta = to_atlas @ inverse.reshape(-1, 3, 3).index_select(0, tiles.paste).to(atlas.dtype)
    grid = _window_map(theta, tiles.origin, (t, t))
    # kept inside the paste's cell: on its border ring the mask is zero, as it is outside, and
    # the image is never used where the mask is zero
    low = (cells[:, :2] * scale - 1.0).view(-1, 1, 1, 2)
    high = ((cells[:, :2] + cells[:, 2:] - 1.0) * scale - 1.0).view(-1, 1, 1, 2)
    grid = torch.clamp(grid, low, high, out=grid)
    # one atlas per tile, expanded (stride 0, not copied): grid_sample then writes N×(C+1)×T×T
    # directly and shares the tiles out over a CPU's threads; "border" padding (never reached:
    # the points are clamped into their cells) also keeps it off cuDNN, which wants contiguous
    # inputs
    out = F.grid_sample(atlas.expand(count, -1, -1, -1), grid, mode="bilinear",
                        padding_mode="border", align_corners=True)
    # bilinear weights of values in [0, 1] stay in [0, 1] up to rounding: no clamp pass
    alpha = out[:, -1]
    return out[:, :-1], alpha.masked_fill_(alpha <= _COVERAGE_FLOOR, 0.0)


def _paint(canvas: Tensor, tiles: _Tiles, image: Tensor, alpha: Tensor, blend: str, k: int
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Blend the tiles' layers onto ``canvas`` ((B·ny·nx)×C×T×T, in place) in paste order (a
    later segment covers earlier ones) and label every pixel ((B·ny·nx)×T×T uint8) with 1 +
    the index of the last instance with any coverage (``last``, 0 = none), whether that
    instance is opaque there (``opaque``) and 1 + the index of the last instance with coverage
    above 0.5 (``top``, as the host builder's). Returns (canvas, last, opaque, top)."""
    shape = (canvas.shape[0], *canvas.shape[2:])
    last = torch.zeros(shape, dtype=torch.uint8, device=canvas.device)
    top, opaque = torch.zeros_like(last), torch.zeros_like(last, dtype=torch.bool)
    for j in range(k):
        rows = tiles.round(j)
        if rows.start == rows.stop:
            continue
        index, a = tiles.index[rows], alpha[rows]
        a_c = a[:, None]
        under = canvas.index_select(0, index)
        if blend == "alpha":
            over = torch.lerp(under, image[rows], a_c)
        else:  # transmissions multiply (Beer–Lambert)
            over = under * torch.lerp(torch.ones_like(a_c), image[rows], a_c)
        canvas.index_copy_(0, index, over)
        covers = a > 0.0
        last.index_copy_(0, index, torch.where(covers, j + 1, last.index_select(0, index)))
        opaque.index_copy_(0, index, torch.where(covers, a >= OPAQUE,
                                                 opaque.index_select(0, index)))
        top.index_copy_(0, index, torch.where(a > 0.5, j + 1, top.index_select(0, index)))
    return canvas, last, opaque, top


def _eroded_labels(last: Tensor, opaque: Tensor, background_label: Tensor,
                   size: tuple[int, int]) -> Tensor:
    """B×H×W uint8: j + 1 where instance j shows alone and fully (opaque, nothing pasted later
    covers it), ``background_label`` (B, 0 = none) where no instance covers the pixel, 0
    elsewhere; kept only where the pixel and its eight neighbours carry the same label, outside
    the image counting as 0: the 3×3 erosion of every region at once, as separable neighbour
    comparisons."""
    labels = torch.where(last == 0, background_label.to(last.dtype).view(-1, 1, 1),
                         torch.where(opaque, last, 0))
    padded = F.pad(labels.view(-1, *size), (1, 1, 1, 1), value=0)
    centre = padded[:, 1:-1, 1:-1]
    rows = (padded[:, :, :-2] == padded[:, :, 1:-1]) & (padded[:, :, 2:] == padded[:, :, 1:-1])
    same = (rows[:, :-2] & rows[:, 1:-1] & rows[:, 2:]
            & (padded[:, :-2, 1:-1] == centre) & (padded[:, 2:, 1:-1] == centre))
    return torch.where(same, centre, 0)


def _read_planes(labels: Tensor) -> Tensor:
    """What a bilinear read at a pixel's position may see, for each way the read can straddle
    pixels, from B×H×W ``labels``: four flat planes (B×(H+2)×(W+2) each, a ring of label 0
    around every image standing for "outside") holding the pixel's label where the pixels the
    read touches all carry it, 0 elsewhere, for reads that touch the pixel alone, it and its
    right neighbour, it and the one below, and the 2×2 block. A read then costs one gather."""
    ring = F.pad(labels, (1, 1, 1, 1), value=0)
    right = F.pad(ring[:, :, 1:], (0, 1), value=0)
    below = F.pad(ring[:, 1:], (0, 0, 0, 1), value=0)
    diagonal = F.pad(ring[:, 1:, 1:], (0, 1, 0, 1), value=0)
    same_x, same_y = ring == right, ring == below
    pair_x = torch.where(same_x, ring, 0)
    pair_y = torch.where(same_y, ring, 0)
    block = torch.where(same_x & same_y & (ring == diagonal), ring, 0)
    return torch.stack([ring, pair_x, pair_y, block]).reshape(-1)


def _reads_only(planes: Tensor, size: tuple[int, int], batch: int, xy: Tensor,
                image_of: Tensor, want: int) -> Tensor:
    """True where a bilinear read at ``xy`` (N×…×2 finite pixel positions in image
    ``image_of``, N) gives weight only to pixels inside the image whose label is ``want``
    (``planes``: :func:`_read_planes`). Positions are clamped onto the ring, which fails the
    test; an integer coordinate reads one pixel along its axis."""
    height, width = size
    ring = (height + 2) * (width + 2)
    x = xy[..., 0].clamp(-1.0, float(width))
    y = xy[..., 1].clamp(-1.0, float(height))
    fx, fy = torch.floor(x), torch.floor(y)
    # int32 indices (index_select takes them, at half the bytes) while the four planes allow
    index_type = torch.int32 if 4 * batch * ring < 2 ** 31 else torch.long
    index = (fy.to(index_type) + 1) * (width + 2) + fx.to(index_type) + 1
    index += (image_of.to(index_type) * ring).view(-1, *[1] * (x.dim() - 1))
    index += ((x > fx).to(index_type) * (batch * ring)
              + (y > fy).to(index_type) * (2 * batch * ring))
    return planes.index_select(0, index.reshape(-1)).view(index.shape) == want


class _Extents:
    """Per-paste boxes of the pixels on top, reduced over the paste's tiles: the smallest and
    largest x, y (B·k×2) and the pixel count (B·k)."""

    def __init__(self, pastes: int, device: torch.device) -> None:
        self.low = torch.full((pastes, 2), _FAR, dtype=torch.long, device=device)
        self.high = torch.full((pastes, 2), -1, dtype=torch.long, device=device)
        self.count = torch.zeros(pastes, dtype=torch.long, device=device)

    def add(self, on_top: Tensor, origin: Tensor, paste: Tensor) -> None:
        """``on_top`` (N×T×T bool) of tiles at ``origin`` (N×2, x, y) of ``paste`` (N)."""
        t = on_top.shape[-1]
        steps = torch.arange(t, device=on_top.device)
        low, high = [], []
        for axis, seen in ((0, on_top.any(1)), (1, on_top.any(2))):  # columns, rows
            at = steps + origin[:, axis, None]
            low.append(torch.where(seen, at, _FAR).amin(1))
            high.append(torch.where(seen, at, -1).amax(1))
        rows = paste[:, None].expand(-1, 2)
        self.low.scatter_reduce_(0, rows, torch.stack(low, 1), "amin")
        self.high.scatter_reduce_(0, rows, torch.stack(high, 1), "amax")
        self.count.index_add_(0, paste, on_top.sum((1, 2)))

    def boxes(self) -> Tensor:
        """COCO-edge boxes (B·k×4), zero for an instance with no pixel on top."""
        boxes = torch.cat([self.low, self.high + 1], 1).float()
        return boxes * (self.count > 0)[:, None]


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
    b, k = paste.labels.shape
    for name, rounds in (("rounds_a", paste.rounds_a), ("rounds_b", paste.rounds_b)):
        if len(rounds) != k + 1:
            raise PairContractError(f"paste {name}: expected k + 1 = {k + 1} offsets, got "
                                    f"{len(rounds)}; collate the plans with collate_pastes")
    size_a, size_b = tuple(batch.source_a.shape[-2:]), tuple(batch.source_b.shape[-2:])
    tiles_a = _Tiles(paste.tiles_a, paste.rounds_a, b, size_a, paste.tile)
    tiles_b = _Tiles(paste.tiles_b, paste.rounds_b, b, size_b, paste.tile)
    # workers ship 8-bit backgrounds and crops as uint8 (4× fewer bytes); scaled here
    atlas = _as_float(paste.layers)[None]
    dtype, device = atlas.dtype, atlas.device
    image_a, alpha_a = _warp(atlas, paste, paste.inverse_a, tiles_a)
    image_b, alpha_b = _warp(atlas, paste, paste.inverse_b, tiles_b)
    del atlas
    canvas_a, last_a, opaque_a, top_a = _paint(
        _as_float(tiles_a.split(batch.source_a)).to(dtype), tiles_a, image_a, alpha_a,
        paste.blend, k)
    canvas_b, last_b, opaque_b, top_b = _paint(
        _as_float(tiles_b.split(batch.source_b)).to(dtype), tiles_b, image_b, alpha_b,
        paste.blend, k)
    del image_a, alpha_a, image_b, alpha_b

    same = paste.same_background
    label_a = _eroded_labels(tiles_a.join(last_a), tiles_a.join(opaque_a),
                             torch.where(same, k + 1, 0), size_a)
    label_b = _eroded_labels(tiles_b.join(last_b), tiles_b.join(opaque_b),
                             torch.full_like(same, k + 1, dtype=torch.long), size_b)

    # the top instance's map (A pixel → B pixel) in its tiles, the shared background's identity
    # elsewhere; valid where the pixel is solid in A and every pixel the read touches in B
    # shows the same label (an instance, or the shared bag)
    grid = tiles_a.identity(same, dtype)
    wanted = tiles_a.split(label_a)
    planes_b = _read_planes(label_b)
    instance_valid = torch.zeros_like(wanted, dtype=torch.bool)
    extents_a, extents_b = _Extents(b * k, device), _Extents(b * k, device)
    matrix_ab = paste.matrix_ab.reshape(-1, 3, 3)
    for j in range(k):
        rows = tiles_a.round(j)
        if rows.start != rows.stop:
            index, origin = tiles_a.index[rows], tiles_a.origin[rows]
            mapped = _window_map(matrix_ab.index_select(0, tiles_a.paste[rows]), origin,
                                 (paste.tile, paste.tile))
            on_top = tiles_a.inside(top_a.index_select(0, index) == j + 1, rows)
            grid.index_copy_(0, index, torch.where(on_top[:, None], mapped.permute(0, 3, 1, 2),
                                                   grid.index_select(0, index)))
            ok = (wanted.index_select(0, index) == j + 1) & _reads_only(
                planes_b, size_b, b, mapped, tiles_a.image_of[rows], j + 1)
            instance_valid.index_copy_(0, index, instance_valid.index_select(0, index) | ok)
            extents_a.add(on_top, origin, tiles_a.paste[rows])
        rows = tiles_b.round(j)
        if rows.start != rows.stop:
            on_top = tiles_b.inside(top_b.index_select(0, tiles_b.index[rows]) == j + 1, rows)
            extents_b.add(on_top, tiles_b.origin[rows], tiles_b.paste[rows])
    # the shared bag maps every pixel to itself: its read is that one pixel of B
    bag_b = label_b
    if size_b != size_a:  # outside B counts as no label
        bag_b = F.pad(label_b, (0, max(0, size_a[1] - size_b[1]), 0,
                                max(0, size_a[0] - size_b[0])))[:, :size_a[0], :size_a[1]]
    valid = tiles_a.join(instance_valid) | ((label_a == k + 1) & (bag_b == k + 1))

    top_a = tiles_a.join(top_a)
    labels = paste.labels
    # each image's classes behind a −1 for "no instance": one lookup by the top instance
    table = torch.cat([torch.full_like(labels[:, :1], -1), labels], 1)
    class_map = table.gather(1, top_a.flatten(1).long()).view(top_a.shape)
    area = paste.mask_area.to(dtype)
    seen_a = extents_a.count.view(b, k) / (area * paste.paste_scale[..., 0]).clamp_min(1.0)
    seen_b = extents_b.count.view(b, k) / (area * paste.paste_scale[..., 1]).clamp_min(1.0)
    keep = torch.minimum(seen_a, seen_b) >= paste.min_visible
    return replace(
        batch, source_a=tiles_a.join(canvas_a), source_b=tiles_b.join(canvas_b),
        base_grid=tiles_a.join(grid).permute(0, 2, 3, 1), base_valid=valid,
        class_map_a=class_map,
        boxes_a=extents_a.boxes(), boxes_b=extents_b.boxes(),
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
