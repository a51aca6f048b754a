"""SIXray (security X-ray, image-level labels + some VOC boxes) loader and inspector.

SIXray: Miao et al. 2019, "SIXray: A Large-scale Security Inspection X-ray Benchmark for
Prohibited Item Discovery in Overlapping Images" (CVPR). Layout (see datasets/sixray/README.md)::

    <root>/JPEGImage/P00055.jpg, N131602.jpg, ...       (P = positive, N = negative)
    <root>/ImageSet/<subset>/{train,test}.csv          header name,Gun,Knife,Wrench,Pliers,Scissors
    <root>/positive-Annotation/Annotation/*.xml         optional Pascal-VOC boxes

For cut-paste pretraining the negatives are unlabeled bag backgrounds (SegLoc, Halat et al.
2023): they contain clutter but, by their labels, none of the five classes.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from densessl.data.bad_samples import ReadSkips, report_bad
from densessl.data.cache import cached_synthetic
from densessl.data.decode import warn_if_tiny
from densessl.data.pidray import PIDRAY_CLASSES, read_image
from densessl.data.registry import register_checker, register_inspector, register_source
from densessl.errors import DataError

#: SIXray label columns (Miao et al. 2019, "SIXray: A Large-scale Security Inspection X-ray
#: Benchmark for Prohibited Item Discovery in Overlapping Images").
SIXRAY_CLASSES = ("Gun", "Knife", "Wrench", "Pliers", "Scissors")

HEADER = ["name", *SIXRAY_CLASSES]

SIXRAY_CARD = {
    "name": "SIXray",
    "licence": "see the terms at the source (not verified by densessl; commonly described as "
               "for academic research)",
    "source": "https://github.com/MeioJane/SIXray",
    "attribution": "Miao et al. 2019, SIXray: A Large-scale Security Inspection X-ray Benchmark "
                   "for Prohibited Item Discovery in Overlapping Images, CVPR",
}


def read_label_csv(path: Path) -> list[tuple[str, list[int]]]:
    """Rows ``(name, [±1 × 5])`` of a SIXray CSV; a wrong header or value is a DataError."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not rows or [c.strip() for c in rows[0]] != HEADER:
        found = ",".join(rows[0]) if rows else "<empty file>"
        raise DataError(f"{path}: header must be {','.join(HEADER)!r}, got {found!r}")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            values = [int(float(v)) for v in row[1:]]
        except ValueError:
            values = []
        if len(values) != len(SIXRAY_CLASSES) or any(v not in (-1, 0, 1) for v in values):
            raise DataError(f"{path}: line {line} ({row[0]!r}): expected 5 labels of +1/-1, "
                            f"got {row[1:]}")
        out.append((row[0].strip(), values))
    return out


def read_voc_boxes(path: Path) -> list[tuple[int, list[float]]]:
    """(PIDray class id, xyxy box with COCO edges) of each object in a VOC XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DataError(f"{path}: not a readable VOC XML ({exc})") from exc
    lookup = {n.lower(): i + 1 for i, n in enumerate(PIDRAY_CLASSES)}
    boxes = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip().lower()
        box = obj.find("bndbox")
        if name not in lookup or box is None:
            raise DataError(f"{path}: object {k} has unknown class {name!r} or no bndbox")
        try:
            x0, y0, x1, y1 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: object {k}: bad bndbox ({exc})") from exc
        # VOC boxes are 1-based inclusive pixel indices → COCO edges
        boxes.append((lookup[name], [x0 - 1, y0 - 1, x1, y1]))
    return boxes


def resize_crop(image: torch.Tensor, size: int) -> tuple[torch.Tensor, float, float, float]:
    """Resize the short side to ``size`` and centre-crop: (image, scale, left, top)."""
    _, h, w = image.shape
    if h == w == size:  # already the output size: nothing to resample
        return image, 1.0, 0, 0
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    # cv2 (area averaging when shrinking) rather than torch: fast and single-threaded,
    # which is what DataLoader workers want
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    hwc = cv2.resize(np.ascontiguousarray(image.permute(1, 2, 0).numpy()), (nw, nh),
                     interpolation=interp)
    image = torch.from_numpy(hwc.reshape(nh, nw, -1)).permute(2, 0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[:, top:top + size, left:left + size], scale, left, top


@register_source("sixray")
class SIXray(Dataset):
    """SIXray images as ``{"image": C×S×S float [0, 1] (or uint8, see keep_uint8),
    "image_labels": 5 float 0/1,
    "boxes": N×4, "labels": N (PIDray class ids), "meta"}``.

    Args:
        path: dataset root; None: the synthetic X-ray set's bags (below).
        subset: ``ImageSet/<subset>`` folder (e.g. ``10``, ``100``, ``1000``); None = the first
            one found; with no ``ImageSet`` every JPEG is used, labeled by its name prefix.
        split: ``train``, ``test`` or ``all``.
        which: ``negative`` (backgrounds for cut-paste), ``positive`` or ``all``.
        image_size: side of the square output (short side resized, centre crop).
        channels: 3 or 1.
        skip_bad: warn and list bad entries in ``skipped_samples`` instead of failing.
        verify_images: decode every image once at construction (finds truncated JPEGs).
        keep_uint8: 8-bit images stay uint8 0..255 (resized as uint8): cut-paste backgrounds
            travel to the device that way and are scaled there. 16-bit images stay float.
        synthetic_n, dataset_seed, cache_dir: with ``path`` None, the synthetic X-ray set's
            bags (chosen as in ``cut_paste``'s options).
    """

    classes = SIXRAY_CLASSES

    def __init__(self, path: str | Path, subset: str | None = None,
                 split: Literal["train", "test", "all"] = "train",
                 which: Literal["negative", "positive", "all"] = "negative",
                 image_size: int = 96, channels: int = 3, skip_bad: bool = False,
                 verify_images: bool = False, keep_uint8: bool = False,
                 synthetic_n: int = 48, dataset_seed: int = 0,
                 cache_dir: str | None = None) -> None:
        if path is None:
            # the bags of the synthetic X-ray set (the ones cut_paste pastes on without a
            # sixray_root): same-image pretraining on them reads no masks and no classes
            from densessl.data.registry import SYNTHESIZERS

            if "xray" not in SYNTHESIZERS:
                raise DataError("SIXray: no root given and the synthetic X-ray set is not "
                                "registered (import densessl.data)")
            path = cached_synthetic("xray", synthetic_n, dataset_seed, cache_dir) / "sixray"
        if which not in ("negative", "positive", "all"):
            raise DataError(f"SIXray: which must be negative, positive or all, got {which!r}")
        self.root = Path(path)
        self.image_dir = self.root / "JPEGImage"
        if not self.image_dir.is_dir():
            raise DataError(f"SIXray: {str(self.image_dir)!r} does not exist")
        self.image_size, self.channels, self.keep_uint8 = image_size, channels, keep_uint8
        self.skipped_samples: list[str] = []
        self.dataset_cards = [SIXRAY_CARD]
        rows = self._rows(subset, split)
        self.items = []
        for name, values in rows:
            positive = any(v == 1 for v in values)
            if (which == "negative" and positive) or (which == "positive" and not positive):
                continue
            file = self.image_dir / f"{name}.jpg"
            problem = None
            if not file.is_file():
                problem = f"{self.source_of_rows}: entry {name!r} points at missing file {file}"
            elif verify_images:
                try:
                    read_image(file, 1)
                except DataError as exc:
                    problem = f"{self.source_of_rows}: entry {name!r}: {exc}"
            if problem is not None:
                report_bad(problem, skip_bad, self.skipped_samples)
                continue
            self.items.append((file, [1.0 if v == 1 else 0.0 for v in values]))
        if not self.items:
            raise DataError(f"SIXray: no {which} images in {self.source_of_rows}")
        self.skip_bad = skip_bad
        self.read_skips = ReadSkips(len(self.items))  # truncated files found in workers

    def _rows(self, subset: str | None, split: str) -> list[tuple[str, list[int]]]:
        sets = self.root / "ImageSet"
        subsets = sorted(p.name for p in sets.iterdir() if p.is_dir()) if sets.is_dir() else []
        if subset is None and not subsets:
            self.source_of_rows = str(self.image_dir)
            names = sorted(p.stem for p in self.image_dir.glob("*.jpg"))
            return [(n, [1] * 5 if n.startswith("P") else [-1] * 5) for n in names]
        subset = subset if subset is not None else subsets[0]
        splits = ("train", "test") if split == "all" else (split,)
        rows = []
        for s in splits:
            csv_path = sets / subset / f"{s}.csv"
            if not csv_path.is_file():
                raise DataError(f"SIXray: {str(csv_path)!r} not found")
            rows += read_label_csv(csv_path)
        self.source_of_rows = str(sets / subset / f"{'+'.join(splits)}.csv")
        return rows

    def __len__(self) -> int:
        return len(self.items)

    def provenance_files(self) -> list[str]:
        """Each item's image, relative to the root (what a ``data.manifest`` row names)."""
        return [file.relative_to(self.root).as_posix() for file, _ in self.items]

    def restrict(self, indices: list[int]) -> None:
        """Keep only these items (provenance filters, densessl.data.manifest)."""
        self.items = [self.items[i] for i in indices]
        self.read_skips = ReadSkips(len(self.items))

    def __getitem__(self, index: int) -> dict:
        # a file that fails to decode (e.g. a truncated JPEG): with skip_bad the next image
        return self.read_skips.first_readable(index, self._read, self.skip_bad,
                                              f"SIXray {self.source_of_rows}")

    def _read(self, index: int) -> dict:
        file, image_labels = self.items[index]
        pixels = read_image(file, self.channels, self.keep_uint8)
        warn_if_tiny(file, *pixels.shape[1:], self.image_size)
        image, scale, left, top = resize_crop(torch.from_numpy(pixels), self.image_size)
        xml = self.root / "positive-Annotation" / "Annotation" / f"{file.stem}.xml"
        boxes, labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
        if xml.is_file():
            found = read_voc_boxes(xml)
            if found:
                labels = torch.tensor([c for c, _ in found], dtype=torch.long)
                boxes = torch.tensor([b for _, b in found]) * scale
                boxes -= torch.tensor([left, top, left, top], dtype=torch.float32)
                boxes = boxes.clamp(0, self.image_size)
        return {"image": image, "image_labels": torch.tensor(image_labels), "boxes": boxes,
                "labels": labels, "meta": {"source": "sixray", "file": str(file)}}


@register_inspector("sixray")
def inspect_sixray(root: str | Path) -> dict:
    """Summary: images, images per ``subset/split`` CSV, boxes and box pixels per class (SIXray
    has no masks, so ``pixels`` is box area) plus image-level positives, image size range."""
    root = Path(root)
    files = sorted((root / "JPEGImage").glob("*.jpg"))
    if not files:
        raise DataError(f"SIXray: no JPEGImage/*.jpg under {str(root)!r}")
    splits, missing = {}, []
    classes = {n: {"instances": 0, "pixels": 0, "positive_images": 0} for n in SIXRAY_CLASSES}
    for csv_path in sorted((root / "ImageSet").glob("*/*.csv")):
        rows = read_label_csv(csv_path)
        splits[f"{csv_path.parent.name}/{csv_path.stem}"] = len(rows)
        for name, values in rows:
            if not (root / "JPEGImage" / f"{name}.jpg").is_file():
                missing.append(f"{csv_path}: entry {name!r} points at missing file "
                               f"{root / 'JPEGImage' / f'{name}.jpg'}")
            for name, v in zip(SIXRAY_CLASSES, values):
                classes[name]["positive_images"] += int(v == 1)
    for xml in sorted((root / "positive-Annotation" / "Annotation").glob("*.xml")):
        for class_id, (x0, y0, x1, y1) in read_voc_boxes(xml):
            name = PIDRAY_CLASSES[class_id - 1]
            entry = classes.setdefault(name, {"instances": 0, "pixels": 0, "positive_images": 0})
            entry["instances"] += 1
            entry["pixels"] += int(round((x1 - x0) * (y1 - y0)))
    sizes = []
    for f in files:
        with Image.open(f) as img:  # reads the header only
            sizes.append((img.height, img.width))
    sizes_arr = np.array(sizes)
    return {"format": "sixray", "images": len(files), "splits": splits, "classes": classes,
            "image_size": {"min": sizes_arr.min(0).tolist(), "max": sizes_arr.max(0).tolist()},
            # CSV rows naming an image that is not there: the loader refuses them (--check)
            "missing_images": len(missing), "first_missing": missing[:5]}


@register_checker("sixray")
def check_sixray(root: Path, options: dict) -> list[str]:
    """What ``data.source: sixray`` refuses in ``root`` (``data inspect --check``), found by
    :class:`SIXray` itself with ``skip_bad``: label CSV rows naming a missing image, damaged
    CSV or annotation files. ``options``: those of :class:`SIXray` (``subset``, ``split``,
    ``which``; default ``which: all``, every image)."""
    from densessl.data.bad_samples import loader_refusals

    return loader_refusals(SIXray, root, {"which": "all", **options})[0]
