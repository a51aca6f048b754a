"""Cut-paste positive pairs: labeled segments pasted onto unlabeled backgrounds in two views.

* ``insloc`` (InsLoc, Yang et al. 2021, "Instance Localization for Self-supervised Detection
  Pretraining"): one foreground pasted onto two *different* backgrounds at different positions
  and scales; the positive is the instance, the backgrounds share nothing.
* ``segloc`` (SegLoc, Halat et al. 2023, arXiv 2310.08421): ``k`` segments from the bank pasted
  onto unlabeled bags (SIXray negatives), the same instances in both views under different
  transforms; optionally the same bag in both views.

Blending: ``alpha`` (the segment replaces the background) or ``transmission`` (X-ray physics:
transmissions multiply, ``out = bg · (1 − a + a · segment)``, Beer–Lambert).

The base correspondence is exact: a pixel of instance j in source A maps through
``M_b,j ∘ M_a,j⁻¹`` (its paste transforms) into source B. It is valid only where the pixel shows
instance j alone and fully (no later paste on top, opaque alpha) in *both* sources, one pixel
away from any boundary (bilinear resampling later mixes neighbours). Background pixels
correspond (identity) only when both views use the same bag and neither view pasted over them.
The rule is :func:`~densessl.pairs.correspondence.instance_correspondence`, the public helper,
called with the paste alphas: one implementation for this builder and custom ones.

``class_map_a`` holds the PIDray class id (1..12) of the top instance at each pixel and −1 on
background: the bag clutter is *unknown*, not a class, so a background query keeps negatives
of every class and never masks another background cell as "same class".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from densessl.boxes import mask_edge_boxes
from densessl.contract import PairSample, PastePlan
from densessl.data.cache import cached_synthetic
from densessl.data.manifest import ProvenanceFilter
from densessl.data.segment_bank import SegmentBank
from densessl.data.sixray import SIXray
from densessl.data.xray_synth import synthesize_xray  # noqa: F401  (registers "xray" for the cache)
from densessl.errors import RecipeError
from densessl.pairs.base import PairBuilder
from densessl.pairs.correspondence import instance_correspondence
from densessl.pairs.paste_provenance import filter_paste_sources
from densessl.pairs.registry import register_pair_builder


def paste_matrix(seg_h: int, seg_w: int, scale: float, angle: float, cx: float, cy: float
                 ) -> np.ndarray:
    """3×3 affine: segment pixel → source pixel (rotate + scale about the segment centre, then
    move the centre to ``(cx, cy)``). Pixel centres at integers, like the rest of densessl."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    ox, oy = (seg_w - 1) / 2, (seg_h - 1) / 2
    return np.array([[c, -s, cx - c * ox + s * oy], [s, c, cy - s * ox - c * oy], [0, 0, 1]])


@register_pair_builder("cut_paste")
class CutPastePairs(PairBuilder):
    """Cut-paste pairs from a segment bank and a set of background images.

    Args:
        pidray_root: PIDray root for the segment bank; None (with ``segments`` None) uses the
            synthetic set generated once into ``cache_dir``.
        sixray_root: SIXray root for backgrounds (negatives of ``sixray_subset``'s train CSV);
            None uses the synthetic set's.
        mode: ``segloc`` (k segments, both views) or ``insloc`` (one segment, two backgrounds).
        k: segments per pair in ``segloc``, drawn without replacement: the same segment twice
            in one pair would be its own negative (a false negative by construction). A bank
            with fewer than ``k`` segments is a :class:`RecipeError` at construction, not a
            silent smaller ``k``.
        blend: ``transmission`` (multiply, X-ray) or ``alpha``.
        scale_range: random zoom of each paste relative to its native scale, where native
            means the segment's source image (``segment["source_size"]``, its longest side)
            resized to ``image_size`` like the backgrounds, so items keep their true
            relative sizes (a bullet stays smaller than a baton).
        rotate: paste at a random angle (X-ray items lie in any orientation).
        same_background: probability that both views use the same bag (default 0.5 in segloc,
            0 in insloc).
        min_visible: an instance gets a box pair only if at least this fraction of its pasted
            area stays on top in both views.
        num_pairs: dataset length (default: number of backgrounds).
        classes: paste only segments of these class ids (default: every class of the bank).
            Fewer classes make classes repeat within a batch, which is what per-class queues
            are for (a query's same-class negatives); the queue ablation uses it.
        image_size, channels, seed: from the recipe's data section.
        cache_dir: base folder of the segment-bank cache and of the synthetic set.
        synthetic_n: train images of the synthetic set (its test subsets get n // 8 each).
        dataset_seed: which draw of the synthetic set. Not ``seed``: a run's seed changes its
            placements, never its data, so runs over several seeds pretrain on one set (the one
            ``finetune.dataset: pidray`` scores on).
        skip_bad: as the data loaders (warn + ``skipped_samples`` instead of failing).
        device_composite: leave the compositing to the batch's device: ``build`` returns the
            two backgrounds and a :class:`~densessl.contract.PastePlan` (same draws as the host
            path), and :func:`~densessl.pairs.device_paste.composite_pastes` pastes, blends and
            derives correspondence, class map and boxes for the whole batch (the view
            augmentation calls it). False composites here, on the CPU (the reference path).
        segments, backgrounds: ready-made sequences instead of the roots (tests, custom data):
            ``segments[i]`` = ``{"image": C×h×w uint8 or float, "mask": h×w bool, "label": int}``,
            ``backgrounds[i]`` = ``{"image": C×S×S float in [0, 1] or uint8}``.
        provenance: ``data.manifest`` and ``data.provenance`` (set by the recipe, not in
            pairs.options): one manifest for both datasets, rows relative to ``data.path`` or,
            without it, the deepest folder holding both roots (``pidray/train/…``,
            ``sixray/JPEGImage/…``); backgrounds and segments whose (source) image fails the
            filters are dropped at construction (:mod:`densessl.pairs.paste_provenance`).

    Each ``build(i)`` draws fresh random placements from torch's RNG (seeded per worker by the
    DataLoader), so epochs differ but a seeded run is reproducible.
    """

    def __init__(self, pidray_root: str | None = None, sixray_root: str | None = None,
                 mode: Literal["segloc", "insloc"] = "segloc", k: int = 3,
                 blend: Literal["transmission", "alpha"] = "transmission",
                 scale_range: Sequence[float] = (0.8, 1.4), rotate: bool = True,
                 same_background: float | None = None, min_visible: float = 0.3,
                 num_pairs: int | None = None, image_size: int = 96, channels: int = 3,
                 seed: int = 0, cache_dir: str | None = None, skip_bad: bool = False,
                 sixray_subset: str | None = None, segments: Sequence[dict] | None = None,
                 backgrounds: Sequence[dict] | None = None, synthetic_n: int = 48,
                 device_composite: bool = False, classes: Sequence[int] | None = None,
                 provenance: ProvenanceFilter | None = None, dataset_seed: int = 0) -> None:
        if mode not in ("segloc", "insloc"):
            raise RecipeError(f"pairs.options.mode: expected segloc or insloc, got {mode!r}")
        if blend not in ("transmission", "alpha"):
            raise RecipeError(f"pairs.options.blend: expected transmission or alpha, got {blend!r}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise RecipeError(f"pairs.options.scale_range: expected 0 < min <= max, got "
                              f"{scale_range}")
        if k < 1:
            raise RecipeError(f"pairs.options.k: expected >= 1, got {k}")
        if not isinstance(device_composite, bool):
            raise RecipeError(f"pairs.options.device_composite: expected true or false, got "
                              f"{device_composite!r}")
        if (segments is None and pidray_root is None) or (backgrounds is None
                                                          and sixray_root is None):
            synth = cached_synthetic("xray", synthetic_n, dataset_seed, cache_dir)
            pidray_root = pidray_root or str(synth / "pidray")
            sixray_root = sixray_root or str(synth / "sixray")
        bank_dir = Path(cache_dir) / "segment_bank" if cache_dir else None
        self.segments = segments if segments is not None else SegmentBank(
            pidray_root, channels=channels, cache_dir=bank_dir, skip_bad=skip_bad)
        self.backgrounds = backgrounds if backgrounds is not None else SIXray(
            sixray_root, subset=sixray_subset, which="negative", image_size=image_size,
            channels=channels, skip_bad=skip_bad, keep_uint8=True)
        self.mode, self.blend, self.rotate = mode, blend, rotate
        self.device_composite = device_composite
        self.k = 1 if mode == "insloc" else k
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.same_background = (same_background if same_background is not None
                                else (0.0 if mode == "insloc" else 0.5))
        labels = [int(self.segments[i]["label"]) for i in range(len(self.segments))]
        wanted = None if classes is None else {int(c) for c in classes}
        if wanted is not None:
            if not wanted:
                raise RecipeError("pairs.options.classes: expected a non-empty list of class "
                                  "ids or null (every class)")
            missing = sorted(wanted - set(labels))
            if missing:
                raise RecipeError(f"pairs.options.classes: {list(classes)} has ids with no "
                                  f"segment in the bank ({missing}); the bank has classes "
                                  f"{sorted(set(labels))}")
        # bank indices the pairs draw from (all of them without a class filter), and the
        # class ids they can emit
        self.segment_ids = [i for i, c in enumerate(labels) if wanted is None or c in wanted]
        self._label_ids = {labels[i] for i in self.segment_ids}
        if len(self.segment_ids) < self.k:
            raise RecipeError(f"pairs.options.k: {self.k} distinct segments per pair, but the "
                              f"segment bank has only {len(self.segment_ids)}"
                              f"{' of classes ' + str(list(classes)) if classes else ''}; "
                              "lower k or add labeled segments")
        self.image_provenance = self.attribution = None
        if provenance is not None:
            # data.manifest: backgrounds and segments (by source image) that fail the filters
            # are dropped once, here; the pairs never draw them
            self.segment_ids, self.image_provenance, self.attribution = filter_paste_sources(
                provenance, self.segments, self.backgrounds, self.segment_ids, self.k)
            self._label_ids = {labels[i] for i in self.segment_ids}
        self.min_visible, self.image_size, self.seed = min_visible, image_size, seed
        self.num_pairs = num_pairs or len(self.backgrounds)

    def __len__(self) -> int:
        return self.num_pairs

    def label_ids(self) -> set[int]:
        """Every class id this builder can put in ``labels`` / ``class_map_a`` (checked
        against ``loss.num_classes`` before training)."""
        return set(self._label_ids)

    # -- sampling ---------------------------------------------------------------------------
    def _background(self, index: int, as_float: bool = True) -> torch.Tensor:
        """Background ``index`` at ``image_size``: float in [0, 1], or as stored (uint8 from
        SIXray's 8-bit JPEGs) with ``as_float`` False, for the device stage to scale."""
        image = self.backgrounds[index]["image"]
        size = (self.image_size, self.image_size)
        if image.dtype == torch.uint8 and not as_float and tuple(image.shape[1:]) == size:
            return image
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if tuple(image.shape[1:]) != size:
            image = F.interpolate(image[None], size=size,
                                  mode="bilinear", align_corners=False, antialias=True)[0]
        return image

    def _placement(self, rng: np.random.Generator, segment: dict) -> np.ndarray:
        size = self.image_size
        seg_h, seg_w = segment["mask"].shape
        native = size / float(segment.get("source_size", size))
        scale = rng.uniform(*self.scale_range) * native
        angle = rng.uniform(-np.pi, np.pi) if self.rotate else 0.0
        half = 0.5 * scale * np.hypot(seg_h, seg_w) * 0.6  # keep most of the item inside
        lo, hi = min(half, size / 2), max(size - half, size / 2)
        return paste_matrix(seg_h, seg_w, scale, angle, rng.uniform(lo, hi), rng.uniform(lo, hi))

    @staticmethod
    def _warp(segment: dict, matrix: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(C×S×S float image, S×S alpha) of one segment pasted with ``matrix``."""
        image = segment["image"]
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        warped = cv2.warpAffine(hwc, matrix[:2].astype(np.float64), (size, size),
                                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        alpha = cv2.warpAffine(segment["mask"].numpy().astype(np.float32),
                               matrix[:2].astype(np.float64), (size, size),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=0.0)
        if warped.ndim == 2:
            warped = warped[:, :, None]
        return warped.transpose(2, 0, 1), alpha

    def _compose(self, background: torch.Tensor, layers: list[tuple[np.ndarray, np.ndarray]]):
        """Paste layers in order. Returns (image, top S×S long: index+1 of the top instance
        with alpha > 0.5, else 0)."""
        image = background.numpy().astype(np.float32)
        top = np.zeros((self.image_size, self.image_size), np.int64)
        for j, (seg, alpha) in enumerate(layers):
            a = alpha[None]
            if self.blend == "alpha":
                image = (1 - a) * image + a * seg
            else:
                image = image * (1 - a + a * seg)
            top[alpha > 0.5] = j + 1
        return np.ascontiguousarray(image, dtype=np.float32), top

    # -- the pair ---------------------------------------------------------------------------
    def _draw(self, index: int) -> tuple:
        """Every random choice of pair ``index``: backgrounds, segments, paste transforms."""
        rng = np.random.default_rng([self.seed, index, int(torch.randint(2**31, ()).item())])
        n_bg = len(self.backgrounds)
        bg_a = index % n_bg
        same_bg = n_bg == 1 or rng.random() < self.same_background
        bg_b = bg_a if same_bg else int((bg_a + rng.integers(1, n_bg)) % n_bg)
        picks = [self.segment_ids[int(i)]
                 for i in rng.choice(len(self.segment_ids), size=self.k, replace=False)]
        segs = [self.segments[i] for i in picks]
        mats_a, mats_b = [], []
        for seg in segs:
            mats_a.append(self._placement(rng, seg))
            mats_b.append(self._placement(rng, seg))
        return bg_a, bg_b, bool(same_bg), picks, segs, mats_a, mats_b

    def _meta(self, bg_a: int, bg_b: int, picks, same_bg: bool) -> dict:
        return {"builder": "cut_paste", "mode": self.mode, "blend": self.blend,
                "backgrounds": [bg_a, bg_b], "segments": [int(i) for i in picks],
                "same_background": bool(same_bg)}

    def build(self, index: int) -> PairSample:
        bg_a, bg_b, same_bg, picks, segs, mats_a, mats_b = self._draw(index)
        labels = torch.tensor([int(s["label"]) for s in segs], dtype=torch.long)
        if self.device_composite:
            # the worker's whole job: decode the two backgrounds, hand over crops and matrices
            plan = PastePlan(
                crops=[s["image"] for s in segs], masks=[s["mask"] for s in segs],
                matrix_a=torch.from_numpy(np.stack(mats_a)),
                matrix_b=torch.from_numpy(np.stack(mats_b)), labels=labels,
                same_background=same_bg, blend=self.blend, min_visible=self.min_visible)
            return PairSample(source_a=self._background(bg_a, as_float=False),
                              source_b=self._background(bg_b, as_float=False), paste=plan,
                              meta=self._meta(bg_a, bg_b, picks, same_bg))
        size = self.image_size
        layers_a = [self._warp(seg, m, size) for seg, m in zip(segs, mats_a)]
        layers_b = [self._warp(seg, m, size) for seg, m in zip(segs, mats_b)]
        source_a, top_a = self._compose(self._background(bg_a), layers_a)
        source_b, top_b = self._compose(self._background(bg_b), layers_b)
        base_grid, base_valid = instance_correspondence(
            (size, size), (size, size), [torch.from_numpy(alpha) for _, alpha in layers_a],
            [mb @ np.linalg.inv(ma) for ma, mb in zip(mats_a, mats_b)],
            [torch.from_numpy(alpha) for _, alpha in layers_b],
            background=np.eye(3) if same_bg else None)

        class_map = np.full((size, size), -1, dtype=np.int64)
        class_map[top_a > 0] = labels.numpy()[top_a[top_a > 0] - 1]
        boxes_a, boxes_b, keep = [], [], []
        for j, seg in enumerate(segs):
            area = float(seg["mask"].sum())
            box_a, vis_a = _visible_box(top_a == j + 1, area * abs(np.linalg.det(mats_a[j])))
            box_b, vis_b = _visible_box(top_b == j + 1, area * abs(np.linalg.det(mats_b[j])))
            if min(vis_a, vis_b) >= self.min_visible:
                boxes_a.append(box_a)
                boxes_b.append(box_b)
                keep.append(j)
        keep_t = torch.tensor(keep, dtype=torch.long)
        return PairSample(
            source_a=torch.from_numpy(source_a), source_b=torch.from_numpy(source_b),
            base_grid=base_grid, base_valid=base_valid,
            boxes_a=torch.stack(boxes_a) if boxes_a else torch.zeros(0, 4),
            boxes_b=torch.stack(boxes_b) if boxes_b else torch.zeros(0, 4),
            instance_ids=keep_t + 1, labels=labels[keep_t],
            class_map_a=torch.from_numpy(class_map),
            meta=self._meta(bg_a, bg_b, picks, same_bg))


def _visible_box(visible: np.ndarray, pasted_area: float) -> tuple[torch.Tensor, float]:
    """xyxy box (COCO edges) of the visible pixels and the visible fraction of the paste."""
    mask = torch.from_numpy(np.ascontiguousarray(visible))[None]
    return mask_edge_boxes(mask)[0], float(visible.sum()) / max(pasted_area, 1.0)
