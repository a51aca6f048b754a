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


#: side of the square tiles the device stage works in: each paste touches only the tiles under
#: its footprint (about a third of k whole canvases at 512 px), and a tile is large enough that
#: moving whole tiles (index_select / index_copy_) costs little next to the pixel work
TILE = 32


def _round_up(value: int) -> int:
    return -(-value // _PAD_MULTIPLE) * _PAD_MULTIPLE


def footprints(matrix: torch.Tensor, crop_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each paste's footprint as (low, high) pixel corners (B×k×2 float64, x, y, inclusive).

    A bilinear read of a crop's mask is non-zero only strictly inside (−1, w) × (−1, h) crop
    pixels, so the footprint is the bounding box of those corners under ``matrix`` (B×k×3×3,
    crop pixel → source pixel, float64), widened by a pixel for rounding."""
    h, w = crop_hw[..., 0].double(), crop_hw[..., 1].double()
    xs = torch.stack([-torch.ones_like(w), w, -torch.ones_like(w), w], -1)
    ys = torch.stack([-torch.ones_like(h), -torch.ones_like(h), h, h], -1)
    x = matrix[..., 0, :1] * xs + matrix[..., 0, 1:2] * ys + matrix[..., 0, 2:]
    y = matrix[..., 1, :1] * xs + matrix[..., 1, 1:2] * ys + matrix[..., 1, 2:]
    low = torch.stack([x.amin(-1), y.amin(-1)], -1).floor() - 1
    high = torch.stack([x.amax(-1), y.amax(-1)], -1).ceil() + 1
    return low, high


def paste_tiles(matrix: torch.Tensor, crop_hw: torch.Tensor, size: tuple[int, int],
                tile: int = TILE) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The tiles every paste's footprint touches in a ``size`` source cut into ``tile``-px
    tiles: (N×2 long rows of (tile index in B × tiles_y × tiles_x, paste index b·k + j),
    sorted by j; k + 1 offsets delimiting each j's rows). A paste wholly outside the source
    has no tiles."""
    batch, k = matrix.shape[:2]
    height, width = size
    tiles_y, tiles_x = -(-height // tile), -(-width // tile)
    low, high = footprints(matrix, crop_hw)
    limit = torch.tensor([width - 1, height - 1], dtype=low.dtype)
    inside = ((high >= 0) & (low <= limit)).all(-1)
    first = (low.clamp_min(0) // tile).long()
    last = (torch.minimum(high, limit).clamp_min(0) // tile).long()
    rows, rounds = [], [0]
    for j in range(k):
        count = rounds[-1]
        for b in range(batch):
            if not inside[b, j]:
                continue
            (x0, y0), (x1, y1) = first[b, j].tolist(), last[b, j].tolist()
            ys = torch.arange(y0, y1 + 1).view(-1, 1)
            xs = torch.arange(x0, x1 + 1).view(1, -1)
            index = (b * tiles_y + ys) * tiles_x + xs
            rows.append(torch.stack([index.flatten(), torch.full((index.numel(),), b * k + j)],
                                    1))
            count += index.numel()
        rounds.append(count)
    tiles = torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.long)
    return tiles, tuple(rounds)


def pack_cells(sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Places cells of ``sizes`` ((height, width) each) side by side on shelves in one atlas
    about as wide as it is tall: (x, y, width, height) per cell (N×4 long), in input order.
    Tallest first, so a shelf's cells waste little height; cells never overlap."""
    area = sum(h * w for h, w in sizes)
    width = max(max(w for _, w in sizes), int(area ** 0.5) + 1)
    cells = [(0, 0, 0, 0)] * len(sizes)
    x = y = shelf = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i][0]):
        h, w = sizes[i]
        if x + w > width:  # next shelf
            x, y, shelf = 0, y + shelf, 0
        cells[i] = (x, y, w, h)
        x, shelf = x + w, max(shelf, h)
    return torch.tensor(cells, dtype=torch.long).view(-1, 4)


def collate_pastes(plans: list[PastePlan], size_a: tuple[int, int], size_b: tuple[int, int]
                   ) -> PasteBatch:
    """Stack per-sample plans (host side): each crop and its mask as one ``C + 1``-channel
    cell of an atlas (:func:`pack_cells`), one pixel in from the cell's corner, with that
    one-pixel ring repeating the crop's edge in the image channels (so one bilinear read gives
    OpenCV's replicated border for the image and zero for the mask); and the tiles each paste
    touches in sources of ``size_a`` / ``size_b`` (:func:`paste_tiles`)."""
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
    crops = [c for p in plans for c in p.crops]
    masks = [m for p in plans for m in p.masks]
    channels = crops[0].shape[0]
    cells = pack_cells([(c.shape[1] + 2, c.shape[2] + 2) for c in crops])
    height = _round_up(int((cells[:, 1] + cells[:, 3]).max()))
    width = _round_up(int((cells[:, 0] + cells[:, 2]).max()))
    as_uint8 = all(c.dtype == torch.uint8 for c in crops)  # 4× less to copy to the device
    layers = torch.zeros(channels + 1, height, width,
                         dtype=torch.uint8 if as_uint8 else torch.float32)
    opaque = 255 if as_uint8 else 1.0
    for (x, y, w, h), crop, mask in zip(cells.tolist(), crops, masks):
        if crop.dtype == torch.uint8 and not as_uint8:
            crop = crop.float() / 255.0
        cell = layers[:, y:y + h, x:x + w]
        image = cell[:channels]
        image[:, 1:-1, 1:-1] = crop
        image[:, 0, 1:-1], image[:, -1, 1:-1] = crop[:, 0], crop[:, -1]
        image[:, :, 0], image[:, :, -1] = image[:, :, 1], image[:, :, -2]
        cell[channels, 1:-1, 1:-1] = mask.to(layers.dtype) * opaque
    matrix_a = torch.stack([torch.as_tensor(p.matrix_a, dtype=torch.float64) for p in plans])
    matrix_b = torch.stack([torch.as_tensor(p.matrix_b, dtype=torch.float64) for p in plans])
    inverse_a = torch.linalg.inv(matrix_a)
    scale = torch.stack([torch.linalg.det(m[..., :2, :2]).abs() for m in (matrix_a, matrix_b)],
                        -1)
    crop_hw = (cells[:, [3, 2]] - 2).view(size, k, 2)
    tiles_a, rounds_a = paste_tiles(matrix_a, crop_hw, size_a)
    tiles_b, rounds_b = paste_tiles(matrix_b, crop_hw, size_b)
    return PasteBatch(
        layers=layers, cells=cells.view(size, k, 4),
        mask_area=torch.tensor([int(m.sum()) for m in masks]).view(size, k),
        inverse_a=inverse_a.float(), inverse_b=torch.linalg.inv(matrix_b).float(),
        matrix_ab=(matrix_b @ inverse_a).float(), paste_scale=scale.float(),
        labels=torch.stack([torch.as_tensor(p.labels, dtype=torch.long) for p in plans]),
        same_background=torch.tensor([bool(p.same_background) for p in plans]),
        blend=plans[0].blend, min_visible=float(plans[0].min_visible), tile=TILE,
        tiles_a=tiles_a, tiles_b=tiles_b, rounds_a=rounds_a, rounds_b=rounds_b)


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
