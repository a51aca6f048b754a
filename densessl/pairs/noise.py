"""Controlled noisy positive pairs: a wrapper that corrupts any pair builder's output.

The question it serves (arXiv 2211.13756): how much does dense downstream performance suffer
when some positive pairs do not really match? Each kind corrupts *source B only* and leaves the
base correspondence (and the instance boxes) exactly as the wrapped builder stated them, so the
losses are told "these pixels are the same place" when they are not:

* ``mismatch`` — source B is taken from another, unrelated sample (a false positive pair).
  ``amount`` is the probability p that a pair is mismatched.
* ``partial_change`` — a fraction f = ``amount`` of source B's area (square patches of ``patch``
  pixels) is replaced by another sample's content at the same place (new or destroyed buildings).
  The pair records which source-A pixels' points were replaced (``noise_mask_a``, through the
  base correspondence; all False when nothing was), so robust down-weighting can be scored per
  cell against the truth. A pair whose source already marked changed pixels (noisy-seg's
  natural change) keeps them: the patches are added to that mask, and ``mismatch`` /
  ``misregistration`` set it everywhere (every cell is then wrong).
* ``misregistration`` — source B is shifted by s = ``amount`` pixels along a random axis
  direction (and rotated by ``rotation_degrees`` about its centre, when set); pixels moved in
  from outside are marked invalid (``valid_b`` False), the correspondence is *not* corrected.
* ``wrong_class`` — the content of an instance's box in source B is replaced by an instance of
  another class taken from another sample; boxes and labels still pair it with view A's
  instance. ``amount`` is the fraction of instances swapped. Needs a builder with instances.

``rate`` is the probability that a pair is touched at all (default 1), so e.g. a partial change
of 30 % on half of the pairs is ``rate: 0.5, amount: 0.3``. Every decision comes from a
generator seeded with (seed, index): the same index always gets the same corruption, in any
DataLoader worker. The pair records what happened in ``noisy`` and ``meta["noise"]``; losses
never read either.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.contract import PairSample
from densessl.data.resize import resize_image, resize_labels
from densessl.errors import PairContractError
from densessl.pairs.base import PairBuilder
from densessl.pairs.device_paste import composite_sample

NOISE_KINDS = ("mismatch", "partial_change", "misregistration", "wrong_class")
#: unit of ``amount`` for each kind (plots put kinds with different units on different axes)
KIND_UNITS = {"mismatch": "fraction", "partial_change": "fraction", "wrong_class": "fraction",
              "misregistration": "pixels"}
_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1))
_DONOR_TRIES = 32


class NoisyPairs(PairBuilder):
    """Wrap ``source`` (any :class:`PairBuilder`) and corrupt its pairs in a controlled way.

    Args:
        source: the wrapped builder (named ``source`` so provenance and dataset cards are still
            found by :func:`densessl.workflows.pretraining.collect_provenance`).
        kind: one of :data:`NOISE_KINDS`.
        amount: the kind's strength (see the module docstring); a fraction in [0, 1] except for
            ``misregistration`` (pixels).
        rate: probability that a pair is corrupted at all.
        seed: base seed of the per-index generators.
        patch: side of the replaced squares for ``partial_change``.
        rotation_degrees: extra rotation of source B for ``misregistration`` (random sign).
    """

    def __init__(self, source: PairBuilder, kind: str, amount: float, rate: float = 1.0,
                 seed: int = 0, patch: int = 8, rotation_degrees: float = 0.0) -> None:
        if kind not in NOISE_KINDS:
            raise PairContractError(f"noise.kind: unknown kind {kind!r}; expected one of "
                                    f"{', '.join(NOISE_KINDS)}")
        if not 0.0 <= rate <= 1.0:
            raise PairContractError(f"noise.rate must be in [0, 1], got {rate}")
        if amount < 0 or (KIND_UNITS[kind] == "fraction" and amount > 1):
            unit = "a fraction in [0, 1]" if KIND_UNITS[kind] == "fraction" else ">= 0 pixels"
            raise PairContractError(f"noise.amount for {kind} must be {unit}, got {amount}")
        if patch < 1:
            raise PairContractError(f"noise.patch must be >= 1, got {patch}")
        if len(source) < 2 and kind in ("mismatch", "partial_change", "wrong_class"):
            raise PairContractError(f"noise kind {kind} needs at least two pairs to draw other "
                                    f"content from; the builder offers {len(source)}")
        self.source, self.kind, self.amount, self.rate = source, kind, float(amount), float(rate)
        self.seed, self.patch, self.rotation_degrees = int(seed), int(patch), rotation_degrees
        if kind == "wrong_class":
            self._check_instances()

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str):
        # Attributes of the wrapped builder (dataset, dataset_cards, skipped_samples, ...) stay
        # reachable. Guarded so unpickling in DataLoader workers cannot recurse.
        if name.startswith("__") or name == "source" or "source" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["source"], name)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index), 0x6E6F6973])

    def _other_index(self, rng: np.random.Generator, index: int) -> int:
        other = int(rng.integers(len(self.source) - 1))
        return other + (other >= index)  # uniform over every index but ``index``

    def build(self, index: int) -> PairSample:
        # a deferred cut-paste pair has no pixels to corrupt yet: composite it here
        sample = composite_sample(self.source[index])
        rng = self._rng(index)
        touched = bool(rng.random() < self.rate)
        info = {"kind": self.kind, "amount": self.amount, "applied": False}
        if touched:
            info.update(getattr(self, f"_{self.kind}")(sample, index, rng))
        if self.kind == "partial_change" and sample.noise_mask_a is None:
            # every pair of a partial_change run carries a mask, so batches always have one
            _, ha, wa = sample.source_a.shape
            sample.noise_mask_a = torch.zeros(ha, wa, dtype=torch.bool)
        sample.noisy = bool(sample.noisy or info["applied"])
        sample.meta = dict(sample.meta, noise=info)
        return sample

    # -- the four kinds; each edits ``sample`` in place and returns what it did ------------

    def _mismatch(self, sample: PairSample, index: int, rng: np.random.Generator) -> dict:
        if rng.random() >= self.amount:
            return {"applied": False}
        other_index = self._other_index(rng, index)
        other = self.source[other_index]
        _, h, w = sample.source_b.shape
        sample.source_b = resize_image(other.source_b, (h, w))
        # valid_b describes the pixels of source B, so it follows the donor: a donor without
        # a nodata mask is all valid (None), whatever the replaced B had.
        sample.valid_b = (None if other.valid_b is None
                          else resize_labels(other.valid_b.bool(), (h, w)))
        _every_cell_wrong(sample)
        return {"applied": True, "other_index": other_index}

    def _partial_change(self, sample: PairSample, index: int, rng: np.random.Generator) -> dict:
        if self.amount <= 0:
            return {"applied": False, "changed_fraction": 0.0}
        other_index = self._other_index(rng, index)
        other = self.source[other_index]
        _, h, w = sample.source_b.shape
        donor = resize_image(other.source_b, (h, w))
        mask = self._patch_mask(rng, h, w)
        source_b = sample.source_b.clone()
        source_b[:, mask] = donor[:, mask]
        sample.source_b = source_b
        replaced = _mask_in_a(mask, sample.base_grid, sample.base_valid)
        # cells the source itself marked as changed (noisy-seg's natural change) stay wrong
        sample.noise_mask_a = (replaced if sample.noise_mask_a is None
                               else replaced | sample.noise_mask_a)
        return {"applied": True, "other_index": other_index,
                "changed_fraction": float(mask.float().mean())}

    def _patch_mask(self, rng: np.random.Generator, h: int, w: int) -> Tensor:
        """Random ``patch``-sized squares covering as close to ``amount`` of H×W as the patch
        grid allows (edge patches are smaller, so the area is counted patch by patch)."""
        p = self.patch
        rows, cols = math.ceil(h / p), math.ceil(w / p)
        target = self.amount * h * w
        mask = torch.zeros(h, w, dtype=torch.bool)
        area = 0
        for cell in rng.permutation(rows * cols):
            r, c = divmod(int(cell), cols)
            size = (min(h, (r + 1) * p) - r * p) * (min(w, (c + 1) * p) - c * p)
            if abs(area + size - target) > abs(area - target):
                continue  # this patch would overshoot; a smaller edge patch may still fit
            mask[r * p:(r + 1) * p, c * p:(c + 1) * p] = True
            area += size
        return mask

    def _misregistration(self, sample: PairSample, index: int,
                         rng: np.random.Generator) -> dict:
        dx, dy = _DIRECTIONS[int(rng.integers(4))]
        dx, dy = dx * self.amount, dy * self.amount
        angle = float(self.rotation_degrees * rng.choice([-1.0, 1.0]))
        if dx == 0 and dy == 0 and angle == 0:
            return {"applied": False, "shift": [0.0, 0.0], "rotation": 0.0}
        _, h, w = sample.source_b.shape
        valid = (sample.valid_b if sample.valid_b is not None
                 else torch.ones(h, w, dtype=torch.bool))
        moved, moved_valid = _warp(sample.source_b, valid, dx, dy, angle)
        sample.source_b, sample.valid_b = moved, moved_valid
        _every_cell_wrong(sample)  # every correspondence is now off by the shift
        return {"applied": True, "shift": [float(dx), float(dy)], "rotation": angle}

    def _wrong_class(self, sample: PairSample, index: int, rng: np.random.Generator) -> dict:
        labels = sample.labels.tolist()
        chosen = [i for i in range(len(labels)) if labels[i] >= 0 and rng.random() < self.amount]
        swaps = []
        source_b = sample.source_b.clone()
        _, h, w = source_b.shape
        for i in chosen:
            donor = self._donor(rng, index, labels[i])
            if donor is None:
                continue
            patch, donor_label, donor_index = donor
            x1, y1, x2, y2 = _box_pixels(sample.boxes_b[i], h, w)
            if x2 <= x1 or y2 <= y1:
                continue
            source_b[:, y1:y2, x1:x2] = resize_image(patch, (y2 - y1, x2 - x1))
            swaps.append({"instance": int(sample.instance_ids[i]), "label": labels[i],
                          "new_label": donor_label, "from_index": donor_index})
        sample.source_b = source_b
        return {"applied": bool(swaps), "swaps": swaps}

    def _donor(self, rng: np.random.Generator, index: int, label: int):
        """Box content of an instance of another class from another sample, or ``None``."""
        for _ in range(_DONOR_TRIES):
            other_index = self._other_index(rng, index)
            other = self.source[other_index]
            candidates = [j for j, lab in enumerate(other.labels.tolist())
                          if lab >= 0 and lab != label]
            if not candidates:
                continue
            j = candidates[int(rng.integers(len(candidates)))]
            _, h, w = other.source_b.shape
            x1, y1, x2, y2 = _box_pixels(other.boxes_b[j], h, w)
            if x2 > x1 and y2 > y1:
                return other.source_b[:, y1:y2, x1:x2], int(other.labels[j]), other_index
        return None

    def _check_instances(self) -> None:
        probe = [self.source[i] for i in range(min(4, len(self.source)))]
        if not any(int((s.labels >= 0).sum()) for s in probe):
            raise PairContractError(
                f"noise kind wrong_class needs a pair builder with labeled instances "
                f"(boxes_a/boxes_b + labels), e.g. cut_paste; {type(self.source).__name__} "
                "gives none")


def _mask_in_a(mask_b: Tensor, base_grid: Tensor | None, base_valid: Tensor | None) -> Tensor:
    """Source-B pixel mask → source-A pixels whose point (``base_grid``, nearest B pixel)
    lies in it; identity when ``base_grid`` is None. A pixel without a point in B is False."""
    if base_grid is None:
        return mask_b.clone()
    hb, wb = mask_b.shape
    x = base_grid[..., 0].round().long()
    y = base_grid[..., 1].round().long()
    inside = (x >= 0) & (x < wb) & (y >= 0) & (y < hb)
    hit = mask_b[y.clamp(0, hb - 1), x.clamp(0, wb - 1)] & inside
    return hit if base_valid is None else hit & base_valid.bool()


def _every_cell_wrong(sample: PairSample) -> None:
    """A corruption of the whole pair: a change mask the source already gave (noisy-seg's
    natural change) now marks every cell; without one, the noisy flag alone says so."""
    if sample.noise_mask_a is not None:
        sample.noise_mask_a = torch.ones_like(sample.noise_mask_a)


def _box_pixels(box: Tensor, h: int, w: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box.tolist()
    return (max(0, int(math.floor(x1))), max(0, int(math.floor(y1))),
            min(w, int(math.ceil(x2))), min(h, int(math.ceil(y2))))


def _warp(image: Tensor, valid: Tensor, dx: float, dy: float, angle: float
          ) -> tuple[Tensor, Tensor]:
    """Move ``image`` content by (dx, dy) pixels and rotate it by ``angle`` degrees about the
    centre: output pixel p shows input pixel R⁻¹(p − c − d) + c. Integer shifts without rotation
    copy pixels exactly; pixels with no source become invalid."""
    _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    cx, cy = (w - 1) / 2, (h - 1) / 2
    theta = math.radians(angle)
    c, s = math.cos(theta), math.sin(theta)
    u, v = xs - cx - dx, ys - cy - dy
    src_x, src_y = c * u + s * v + cx, -s * u + c * v + cy
    if angle == 0:  # exact integer positions stay exact (no trig round-off)
        src_x, src_y = xs - dx, ys - dy
    grid = torch.stack([(2 * src_x + 1) / w - 1, (2 * src_y + 1) / h - 1], dim=-1)[None]
    moved = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)[0]
    inside = (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
    kept = F.grid_sample(valid[None, None].float(), grid, mode="nearest",
                         padding_mode="zeros", align_corners=False)[0, 0] > 0.5
    return moved.to(image.dtype), inside & kept
