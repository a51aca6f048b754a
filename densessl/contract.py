"""The pair contract every stage speaks (see docs/architecture.md, "The pair contract").

Two dataclasses:

* :class:`PairSample` — one positive pair *before* view augmentation, produced on the CPU by a
  pair builder inside DataLoader workers. It holds the two *source* images and the *base
  correspondence* between them (identity for same-image and temporal pairs, a dense field for
  anything else, e.g. cut-paste).
* :class:`PairBatch` — a batch of augmented views on one device, with the exact correspondence
  ``grid_ab`` / ``valid_ab`` composed from each view's 3×3 transform and the base correspondence.

Coordinates: pixel coordinates are (x, y) with pixel centres at integers (OpenCV / kornia
convention). Normalised coordinates follow ``torch.nn.functional.grid_sample`` with
``align_corners=False``: ``x_norm = (2 * x + 1) / W - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

#: how pasted segments are blended (:attr:`PastePlan.blend`): ``alpha`` covers the background,
#: ``transmission`` multiplies with it (X-ray attenuation adds up, Beer–Lambert)
BLENDS = ("alpha", "transmission")


@dataclass
class PairSample:
    """One positive pair of source images with their base correspondence (CPU, unbatched).

    Attributes:
        source_a: ``C×Ha×Wa`` float image, values roughly in [0, 1].
        source_b: ``C×Hb×Wb`` float image with the same ``C``.
        valid_a: optional ``Ha×Wa`` bool, False where source A has no data (nodata, padding).
        valid_b: optional ``Hb×Wb`` bool, same for source B.
        base_grid: optional ``Ha×Wa×2`` float: for every pixel of source A, the (x, y) *pixel*
            position of the same scene point in source B. ``None`` means identity (same pixel
            grid, e.g. same image or co-registered dates).
        base_valid: optional ``Ha×Wa`` bool: the point of source A exists in source B (e.g. not a
            pasted-over region). ``None`` means all True.
        boxes_a, boxes_b: ``N×4`` float xyxy pixel boxes in source A / B; row i of both is the
            same instance.
        instance_ids: ``N`` long, an id per instance (unique within the sample).
        labels: ``N`` long class ids (−1 = unknown).
        class_map_a: optional ``Ha×Wa`` long, class of each source-A pixel where known,
            −1 elsewhere.
        noisy: the pair was corrupted by a noise injector, or its source marks a change
            between A and B (noisy-seg; analysis only, never read by losses).
        noise_mask_a: optional ``Ha×Wa`` bool: the scene point of this source-A pixel was
            replaced in source B by the noise injector (``partial_change``) or changed
            between the dates (noisy-seg's natural change, OR-ed with injected noise), for
            measuring robust down-weighting per cell (analysis only, never read by losses).
        pair_weight: optional weight of this positive pair in the losses (1 when None), e.g.
            far-in-time dates of a temporal series (``pairs.options.dates: near_far``).
        meta: free-form provenance (dataset, file names, noise kind/amount, …).
        paste: optional :class:`PastePlan`: segments to composite on the device; then the
            sources are the bare backgrounds (float, or uint8 0..255: 4× fewer bytes from the
            worker, scaled on the device) and the correspondence, class map and boxes are
            filled in after collation.
    """

    source_a: Tensor
    source_b: Tensor
    valid_a: Tensor | None = None
    valid_b: Tensor | None = None
    base_grid: Tensor | None = None
    base_valid: Tensor | None = None
    boxes_a: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    boxes_b: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    instance_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    class_map_a: Tensor | None = None
    noisy: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    paste: PastePlan | None = None
    noise_mask_a: Tensor | None = None
    pair_weight: float | None = None


@dataclass
class PastePlan:
    """Segments still to be pasted onto a PairSample's two sources, on the batch's device.

    A builder that defers compositing (``cut_paste`` with ``device_composite``) returns the two
    *backgrounds* as ``source_a`` / ``source_b`` and this plan; its base correspondence, class
    map and boxes are left empty and :func:`densessl.pairs.device_paste.composite_pastes` fills
    them in after collation. Instances are in paste order (a later one covers earlier ones).

    Attributes:
        crops: ``k`` tight crops ``C×h×w`` (uint8 0..255 or float 0..1), one per instance.
        masks: ``k`` ``h×w`` bool masks, same sizes as the crops.
        matrix_a, matrix_b: ``k×3×3`` affine maps, segment pixel → source pixel (pixel centres
            at integers), one per instance and view.
        labels: ``k`` long class ids.
        same_background: both sources show one background (its pixels then correspond).
        blend: one of :data:`BLENDS`.
        min_visible: an instance gets a box pair only if at least this fraction of its pasted
            area stays on top in both sources.
    """

    crops: list[Tensor]
    masks: list[Tensor]
    matrix_a: Tensor
    matrix_b: Tensor
    labels: Tensor
    same_background: bool
    blend: str
    min_visible: float


@dataclass
class PasteBatch:
    """Collated :class:`PastePlan` s (see :func:`densessl.pairs.collate.collate_pastes`).

    ``layers`` ((C+1)×H×W, uint8 or float) is an *atlas*: every crop's C image channels and
    its mask as the last channel, each in a cell of its own two pixels larger than the crop
    (``cells``, B×k×4 long: x, y, width, height in the atlas), the crop one pixel in from the
    cell's corner and its edge repeated on that ring (where the mask is zero). One image, so
    the stage samples every paste with one ``grid_sample``. ``mask_area`` (B×k) is
    each mask's pixel count. ``inverse_a`` / ``inverse_b`` (B×k×3×3) map source pixels back
    to crop pixels; ``matrix_ab`` (B×k×3×3) maps a pixel of instance j in source A to source
    B; ``paste_scale`` (B×k×2) is each paste's area scale (|det|) in A and B. Matrices are
    inverted in float64 on the host, so the device never inverts and the reference's
    precision is kept.

    The stage works in square *tiles* of ``tile`` pixels, a source being cut into
    ``ceil(H / tile) × ceil(W / tile)`` of them. ``tiles_a`` / ``tiles_b`` (N×2 long) list,
    for every paste in source A / B, the tiles its footprint touches as (tile index in
    ``B × tiles_y × tiles_x``, paste index ``b·k + j``), sorted by paste order ``j``;
    ``rounds_a`` / ``rounds_b`` (k + 1 host ints) delimit each ``j``'s rows. Tiles of one
    ``j`` never repeat, so each round writes its tiles once. Collation (on the host, where the
    matrices are) fixes these counts: no shape in the stage depends on device values.
    """

    layers: Tensor
    cells: Tensor
    mask_area: Tensor
    inverse_a: Tensor
    inverse_b: Tensor
    matrix_ab: Tensor
    paste_scale: Tensor
    labels: Tensor
    same_background: Tensor
    blend: str
    min_visible: float
    tile: int
    tiles_a: Tensor
    tiles_b: Tensor
    rounds_a: tuple[int, ...]
    rounds_b: tuple[int, ...]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PasteBatch:
        return _move(self, device, non_blocking)


@dataclass
class SourceBatch:
    """A collated batch of :class:`PairSample` (sources stacked, instances concatenated).

    Shapes: ``source_a`` B×C×Ha×Wa, ``source_b`` B×C×Hb×Wb, ``valid_a`` B×Ha×Wa,
    ``valid_b`` B×Hb×Wb, ``base_grid`` B×Ha×Wa×2 or None (all identity), ``base_valid`` B×Ha×Wa,
    ``boxes_a``/``boxes_b`` N×4, ``box_batch``/``box_label``/``instance_ids`` N,
    ``class_map_a`` B×Ha×Wa or None, ``noisy`` B bool. ``meta`` is a list of B dicts.
    """

    source_a: Tensor
    source_b: Tensor
    valid_a: Tensor
    valid_b: Tensor
    base_grid: Tensor | None
    base_valid: Tensor
    boxes_a: Tensor
    boxes_b: Tensor
    box_batch: Tensor
    box_label: Tensor
    instance_ids: Tensor
    class_map_a: Tensor | None
    noisy: Tensor
    meta: list[dict[str, Any]]
    #: cut-paste still to be composited on the device (None once done, or for other builders)
    paste: PasteBatch | None = None
    #: N bool, the box pair may be used (None: all); the view augmentation drops the others,
    #: so the device-side compositing keeps fixed shapes
    box_valid: Tensor | None = None
    #: B×Ha×Wa bool, source-A pixels whose point was replaced in B by the noise injector or
    #: changed between the dates (analysis only; None when no sample has one)
    noise_mask_a: Tensor | None = None
    #: B float, each pair's weight in the losses (None: all 1)
    pair_weight: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SourceBatch:
        return _move(self, device, non_blocking)

    @property
    def batch_size(self) -> int:
        return self.source_a.shape[0]


@dataclass
class PairBatch:
    """Augmented views with exact correspondence, all tensors on one device.

    Attributes:
        view_a, view_b: ``B×C×H×W`` float, the two augmented (normalised) views.
        grid_ab: ``B×h×w×2`` float: for each cell of view A's ``h×w`` grid (cell centres, stride
            ``H / h``), the normalised (−1..1, ``grid_sample`` with ``align_corners=False``)
            position of the same scene point in view B.
        valid_ab: ``B×h×w`` bool: that point exists in view B (inside both crops, not nodata,
            not pasted over).
        boxes_a, boxes_b: ``N×4`` float xyxy pixel boxes in view A / view B; row i of both is
            the same instance (a positive pair).
        box_batch: ``N`` long, image index of each box in the batch.
        box_label: ``N`` long, class id (−1 = unknown).
        instance_ids: ``N`` long, the instance id from the builder.
        class_map_a: optional ``B×h×w`` long, the class of each cell of view A, −1 where unknown.
        noisy: ``B`` bool, the pair was corrupted by a noise injector (never used by losses).
        matrix_a, matrix_b: ``B×3×3``: source pixel → view pixel transform of each view.
        meta: list of B dicts carried from the builder.
        noise_mask_a: optional ``B×h×w`` bool: the cell's positive (its point in view B) lies
            on content the noise injector replaced or the source changed (analysis only,
            never used by losses).
        pair_weight: optional ``B`` float, each pair's weight in the losses (None: all 1).
    """

    view_a: Tensor
    view_b: Tensor
    grid_ab: Tensor
    valid_ab: Tensor
    boxes_a: Tensor
    boxes_b: Tensor
    box_batch: Tensor
    box_label: Tensor
    instance_ids: Tensor
    class_map_a: Tensor | None
    noisy: Tensor
    matrix_a: Tensor
    matrix_b: Tensor
    meta: list[dict[str, Any]] = field(default_factory=list)
    noise_mask_a: Tensor | None = None
    pair_weight: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        return _move(self, device, non_blocking)

    @property
    def batch_size(self) -> int:
        return self.view_a.shape[0]


def add_random_instances(batch: PairBatch, view_size: int, num_classes: int,
                         per_image: int = 4, seed: int = 0) -> PairBatch:
    """Give ``batch`` seeded random instances, so the instance and class-aware objectives have
    work on a batch whose builder made none (benchmarks, tests): ``per_image`` boxes per image
    in A (the same instances in B, moved and shrunk), labels and a class map of view A's cells
    (−1 included) in 0 .. ``num_classes`` − 1. Sets the fields in place and returns the batch."""
    gen = torch.Generator().manual_seed(seed)
    b, device = batch.batch_size, batch.view_a.device
    xy = torch.rand(b * per_image, 2, generator=gen) * view_size * 0.6
    wh = torch.rand(b * per_image, 2, generator=gen) * view_size * 0.3 + view_size * 0.1
    boxes = torch.cat([xy, xy + wh], dim=1).to(device)
    batch.boxes_a = boxes
    batch.boxes_b = (boxes * 0.9 + 2).clamp(0, view_size)
    batch.box_batch = torch.arange(b).repeat_interleave(per_image).to(device)
    batch.box_label = torch.randint(0, num_classes, (b * per_image,), generator=gen).to(device)
    batch.instance_ids = torch.arange(b * per_image, device=device)
    cells = batch.grid_ab.shape[1]
    batch.class_map_a = torch.randint(-1, num_classes, (b, cells, cells),
                                      generator=gen).to(device)
    return batch


def _move(obj, device, non_blocking):
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, (Tensor, PasteBatch)):
            changes[f.name] = value.to(device, non_blocking=non_blocking)
    return replace(obj, **changes)
