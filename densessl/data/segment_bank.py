"""A bank of labeled foreground segments cut out of a PIDray-style set, cached once per dataset.

Cut-paste pretraining (InsLoc, Yang et al. 2021; SegLoc, Halat et al. 2023) pastes the same
labeled instance into two views. Decoding masks and reading images for every pair would dominate
the data pipeline, so every non-crowd instance is cut out once (tight box crop of the image plus
its mask) and stored in a ``.pt`` cache.

The cache may sit in a shared folder, so it is never trusted as found: its name and its
content carry a key (format version, the annotation file's path, size and mtime, the image
folder, and every option that shapes the bank), it holds tensors and plain types only (read
with ``weights_only=True``, so a file carrying any other pickled object is refused, never
unpickled), and it lists the size and mtime of every image it was cut from. A cache that
cannot be read, is of another version or key, has an unexpected shape, or whose images have
changed is rebuilt, with a warning saying why.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from densessl.boxes import mask_edge_boxes
from densessl.data.cache import default_cache_dir, torch_load_problem
from densessl.data.pidray import PIDRAY_CARD, find_split, load_coco, read_image
from densessl.errors import DataError
from densessl.io import save_torch

# bump when the cache content changes (3: segments name their file; 4: keyed by every option
# that shapes the bank, validated on load, lists its images' sizes and mtimes)
_VERSION = 4


def _stat(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def cache_problem(data: object, key: str, channels: int, root: Path) -> str | None:
    """Why a loaded segment-bank cache cannot be used (``None``: it can): another version or
    key, an unexpected structure, or an image it was cut from that changed since."""
    if not isinstance(data, dict):
        return f"holds a {type(data).__name__}, not a segment bank"
    if data.get("version") != _VERSION:
        return f"format version {data.get('version')!r}, this densessl writes {_VERSION}"
    if data.get("key") != key:
        return "written for another annotation file or other options (key mismatch)"
    segments, skipped, images = data.get("segments"), data.get("skipped"), data.get("images")
    if not (isinstance(segments, list) and isinstance(skipped, list)
            and all(isinstance(x, str) for x in skipped) and isinstance(images, dict)):
        return "unexpected structure (segments, skipped, images)"
    for k, seg in enumerate(segments):
        ok = (isinstance(seg, dict) and isinstance(seg.get("image"), torch.Tensor)
              and isinstance(seg.get("mask"), torch.Tensor)
              and seg["image"].dtype == torch.uint8 and seg["image"].ndim == 3
              and seg["image"].shape[0] == channels and seg["mask"].dtype == torch.bool
              and tuple(seg["mask"].shape) == tuple(seg["image"].shape[1:])
              and isinstance(seg.get("label"), int) and isinstance(seg.get("source_size"), int)
              and isinstance(seg.get("source"), str) and isinstance(seg.get("file"), str))
        if not ok:
            return f"segment {k} has an unexpected structure"
    for name, recorded in images.items():
        if _stat(root / name) != recorded:
            return f"image {root / name} changed since the bank was cut"
    return None


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
        key = hashlib.sha256(json.dumps({
            "version": _VERSION, "annotations": str(json_path.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "images": str(image_dir.resolve()),
            "root": str(self.root.resolve()), "split": split, "channels": channels,
            "min_area": min_area, "skip_bad": skip_bad, "verify_images": verify_images},
            sort_keys=True).encode()).hexdigest()
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "segment_bank"
        self.cache_file = cache_dir / f"pidray_{split}_{key[:16]}.pt"
        self.dataset_cards = [PIDRAY_CARD]
        data = self._load_cache(key, channels)
        if data is None:
            data = self._cut(json_path, image_dir, channels, min_area, skip_bad, verify_images,
                             self.root)
            data = {"version": _VERSION, "key": key, **data}
            save_torch(self.cache_file, data)
        self.segments: list[dict] = data["segments"]
        self.skipped_samples: list[str] = data["skipped"]
        labels = [s["label"] for s in self.segments]
        self.labels = np.array(labels, dtype=np.int64)
        if not self.segments:
            raise DataError(f"segment bank: no instance with at least {min_area} pixels in "
                            f"{json_path}")

    def _load_cache(self, key: str, channels: int) -> dict | None:
        """The cache's content when it is there and valid for ``key``; otherwise ``None``
        (rebuilt by the caller), with a warning saying why when a file was there."""
        if not self.cache_file.is_file():
            return None
        try:
            data = torch.load(self.cache_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unusable cache is rebuilt
            problem = torch_load_problem(exc)
        else:
            problem = cache_problem(data, key, channels, self.root)
        if problem is None:
            return data
        warnings.warn(f"segment bank: cache {self.cache_file} is not used ({problem}); "
                      "rebuilding it", stacklevel=3)
        return None

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
        # the images cut from, with size and mtime: an edited image makes the cache stale
        images = {rec["file"].relative_to(root).as_posix(): _stat(rec["file"])
                  for rec in records}
        return {"segments": segments, "skipped": skipped, "images": images}

    def __len__(self) -> int:
        return len(self.segments)

    def source_files(self) -> list[str]:
        """Each segment's source image, relative to the PIDray root (provenance filters)."""
        return [s["file"] for s in self.segments]

    def __getitem__(self, index: int) -> dict:
        return self.segments[index]
