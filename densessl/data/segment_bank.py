"""A bank of labeled foreground segments cut out of a PIDray-style set, cached once per dataset.

Cut-paste pretraining (InsLoc, Yang et al. 2021; SegLoc, Halat et al. 2023) pastes the same
labeled instance into two views. Decoding masks and reading images for every pair would dominate
the data pipeline, so every non-crowd instance is cut out once (tight box crop of the image plus
its mask) and stored in a ``.pt`` cache keyed on the annotation file (path, size, mtime).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from densessl.boxes import mask_edge_boxes
from densessl.data.cache import default_cache_dir
from densessl.data.pidray import PIDRAY_CARD, find_split, load_coco, read_image
from densessl.io import save_torch

_VERSION = 3  # bump when the cache content changes (3: segments name their file)


class SegmentBank:
    """Every labeled instance of one PIDray split as (image crop, mask, class).

    Args:
        pidray_root: dataset root (see :mod:`densessl.data.pidray`).
        split: which split's instances to cut (``train`` for pretraining).
        channels: 3 or 1.
        cache_dir: where the cache file goes (default
            :func:`~densessl.data.cache.default_cache_dir` /segment_bank).
        min_area: instances with fewer mask pixels are not kept (too small to paste).
        skip_bad, verify_images: as in :class:`~densessl.data.pidray.PIDray`.

    Attributes:
        segments: list of dicts ``image`` C×h×w uint8, ``mask`` h×w bool, ``label`` int (1..12),
            ``source_size`` longest side of its image (to paste at the native scale),
            ``source`` "file#annotation id", ``file`` its image relative to the root (what
            a ``data.manifest`` row names; :meth:`source_files`).
        skipped_samples, dataset_cards: provenance copied into metrics.json.
    """

    def __init__(self, pidray_root: str | Path, split: str = "train", channels: int = 3,
                 cache_dir: str | Path | None = None, min_area: int = 16,
                 skip_bad: bool = False, verify_images: bool = False) -> None:
        json_path, image_dir = find_split(pidray_root, split)
        self.root = Path(pidray_root)
        stat = json_path.stat()
        key = hashlib.sha1(f"{_VERSION}|{json_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
                           f"|{channels}|{min_area}".encode()).hexdigest()[:16]
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "segment_bank"
        self.cache_file = cache_dir / f"pidray_{split}_{key}.pt"
        self.dataset_cards = [PIDRAY_CARD]
        if self.cache_file.is_file():
            data = torch.load(self.cache_file, weights_only=False)
        else:
            data = self._cut(json_path, image_dir, channels, min_area, skip_bad, verify_images,
                             Path(pidray_root))
            save_torch(self.cache_file, data)
        self.segments: list[dict] = data["segments"]
        self.skipped_samples: list[str] = data["skipped"]
        labels = [s["label"] for s in self.segments]
        self.labels = np.array(labels, dtype=np.int64)
        if not self.segments:
            from densessl.errors import DataError

            raise DataError(f"segment bank: no instance with at least {min_area} pixels in "
                            f"{json_path}")

    @staticmethod
    def _cut(json_path, image_dir, channels, min_area, skip_bad, verify_images, root) -> dict:
        records, skipped = load_coco(json_path, image_dir, skip_bad, verify_images)
        segments = []
        for rec in records:
            anns = [a for a in rec["anns"] if not a["iscrowd"]]
            if not anns:
                continue
            image = (read_image(rec["file"], channels) * 255).round().astype(np.uint8)
            for ann in anns:
                mask = mask_utils.decode(ann["rle"]).astype(bool)
                if mask.sum() < min_area:
                    continue
                x0, y0, x1, y1 = mask_edge_boxes(torch.from_numpy(mask)[None])[0].int().tolist()
                segments.append({
                    "image": torch.from_numpy(np.ascontiguousarray(image[:, y0:y1, x0:x1])),
                    "mask": torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1])),
                    "label": int(ann["category_id"]),
                    "source_size": max(rec["height"], rec["width"]),
                    "source": f"{rec['file'].name}#{ann['id']}",
                    "file": rec["file"].relative_to(root).as_posix()})
        return {"segments": segments, "skipped": skipped}

    def __len__(self) -> int:
        return len(self.segments)

    def source_files(self) -> list[str]:
        """Each segment's source image, relative to the PIDray root (provenance filters)."""
        return [s["file"] for s in self.segments]

    def __getitem__(self, index: int) -> dict:
        return self.segments[index]
