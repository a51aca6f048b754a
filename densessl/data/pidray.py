"""PIDray (COCO-style X-ray segmentation / detection set) loader and inspector.

PIDray: Wang et al. 2021, "Towards Real-world Prohibited Item Detection: A Large-scale X-ray
Benchmark" (ICCV). Layout (see datasets/pidray/README.md)::

    <root>/annotations/xray_train.json        <root>/train/*.png
    <root>/annotations/xray_test_easy.json    <root>/easy/
    <root>/annotations/xray_test_hard.json    <root>/hard/
    <root>/annotations/xray_test_hidden.json  <root>/hidden/
    (extended release: annotations/train.json + train/, annotations/test.json + test/)

Masks are polygons, compressed RLE or uncompressed RLE (decoded with pycocotools). Every problem
in the annotations is a :class:`DataError` naming the file and the entry, or with
``skip_bad=True`` a warning plus an entry in ``skipped_samples``.
"""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from densessl.boxes import mask_edge_boxes
from densessl.data.bad_samples import ReadSkips, report_bad
from densessl.data.decode import decode_image, warn_if_tiny
from densessl.data.registry import register_inspector, register_source
from densessl.data.resize import resize_image, resize_labels
from densessl.errors import DataError

#: PIDray class names in category-id order 1..12 (Wang et al. 2021, "Towards Real-world
#: Prohibited Item Detection: A Large-scale X-ray Benchmark").
PIDRAY_CLASSES = ("Baton", "Pliers", "Hammer", "Powerbank", "Scissors", "Wrench", "Gun",
                  "Bullet", "Sprayer", "HandCuffs", "Knife", "Lighter")

#: split name → candidate (annotation file, image folder) pairs, first existing wins
SPLITS = {
    "train": (("xray_train.json", "train"), ("train.json", "train")),
    "easy": (("xray_test_easy.json", "easy"),),
    "hard": (("xray_test_hard.json", "hard"),),
    "hidden": (("xray_test_hidden.json", "hidden"),),
    "test": (("test.json", "test"),),
}

PIDRAY_CARD = {
    "name": "PIDray",
    "licence": "see the LICENSE of the source repository (not verified by densessl; check "
               "before redistributing weights)",
    "source": "https://github.com/bywang2018/security-dataset",
    "attribution": "Wang et al. 2021, Towards Real-world Prohibited Item Detection: A "
                   "Large-scale X-ray Benchmark, ICCV",
}


def find_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of ``split`` under ``root``, or a DataError."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"PIDray: unknown split {split!r}; valid: {', '.join(SPLITS)}")
    for json_name, folder in SPLITS[split]:
        if (root / "annotations" / json_name).is_file():
            return root / "annotations" / json_name, root / folder
    tried = ", ".join(f"annotations/{j}" for j, _ in SPLITS[split])
    raise DataError(f"PIDray: no annotation file for split {split!r} under {str(root)!r} "
                    f"(looked for {tried})")


def available_splits(root: str | Path) -> list[str]:
    root = Path(root)
    return [s for s, cands in SPLITS.items()
            if any((root / "annotations" / j).is_file() for j, _ in cands)]


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """COCO segmentation (polygons, compressed or uncompressed RLE) → one compressed RLE.

    Raises ValueError for an empty or malformed segmentation (caller adds file + entry).
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list)]
        if not polygons or len(polygons) != len(segmentation):
            raise ValueError("empty segmentation (no polygon)")
        if any(len(p) < 6 or len(p) % 2 for p in polygons):
            raise ValueError("polygon with fewer than 3 points or an odd number of coordinates")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} differs from the image's "
                             f"{[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE covers {sum(counts)} pixels, image has "
                                 f"{height * width}")
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = counts.encode("ascii") if isinstance(counts, str) else counts
        return {"size": [height, width], "counts": counts}
    raise ValueError(f"segmentation must be a polygon list or an RLE dict, got "
                     f"{type(segmentation).__name__}")


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """H×W bool mask of a COCO segmentation (same as ``COCO.annToMask``)."""
    return mask_utils.decode(segmentation_to_rle(segmentation, height, width)).astype(bool)


def read_image(path: Path, channels: int = 3, keep_uint8: bool = False) -> np.ndarray:
    """C×H×W float32 in [0, 1], scaled by bit depth (:func:`densessl.data.decode.decode_image`,
    the decoder every loader shares), or uint8 0..255 for 8-bit files with ``keep_uint8``; a
    truncated or unreadable file is a DataError naming it."""
    return decode_image(path, channels, keep_uint8)


def load_coco(json_path: Path, image_dir: Path, skip_bad: bool = False,
              verify_images: bool = False) -> tuple[list[dict], list[str]]:
    """Validated records ``{"file", "id", "height", "width", "anns": [...]}`` + skipped list.

    Each kept annotation has ``category_id`` in 1..12 (PIDray order, matched by category name),
    ``rle`` (compressed) and ``iscrowd``.
    """
    skipped: list[str] = []
    skip = partial(report_bad, skip_bad=skip_bad, skipped=skipped)
    try:
        coco = json.loads(Path(json_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{json_path}: not a readable COCO JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{json_path}: missing list {key!r}")
    name_to_ours = {n.lower(): i + 1 for i, n in enumerate(PIDRAY_CLASSES)}
    cat_map = {}
    for cat in coco["categories"]:
        ours = name_to_ours.get(str(cat.get("name", "")).lower())
        if ours is None:
            raise DataError(f"{json_path}: category {cat.get('id')} {cat.get('name')!r} is "
                            f"not a PIDray class ({', '.join(PIDRAY_CLASSES)})")
        cat_map[cat["id"]] = ours
    records, by_id = [], {}
    for img in coco["images"]:
        path = image_dir / img["file_name"]
        if not path.is_file():
            skip(f"{json_path}: image id {img['id']} points at missing file {path}")
            continue
        if verify_images:
            try:
                read_image(path, 1)
            except DataError as exc:
                skip(f"{json_path}: image id {img['id']}: {exc}")
                continue
        rec = {"file": path, "id": img["id"], "height": int(img["height"]),
               "width": int(img["width"]), "anns": []}
        records.append(rec)
        by_id[img["id"]] = rec
    bad_images = set()
    for ann in coco["annotations"]:
        where = f"{json_path}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        rec = by_id.get(ann.get("image_id"))
        if rec is None:
            if not any(ann.get("image_id") == i["id"] for i in coco["images"]):
                skip(f"{where}: no image with this id")
            continue  # its image was already reported as skipped
        if ann.get("category_id") not in cat_map:
            skip(f"{where}: unknown category id {ann.get('category_id')} "
                 f"(known: {sorted(cat_map)})")
            bad_images.add(rec["id"])
            continue
        try:
            rle = segmentation_to_rle(ann.get("segmentation"), rec["height"], rec["width"])
            if mask_utils.area(rle) == 0:
                raise ValueError("segmentation covers no pixel")
        except (ValueError, TypeError, KeyError) as exc:
            skip(f"{where}: invalid segmentation ({exc})")
            bad_images.add(rec["id"])
            continue
        rec["anns"].append({"id": ann.get("id"), "category_id": cat_map[ann["category_id"]],
                            "rle": rle, "iscrowd": int(ann.get("iscrowd", 0))})
    # an image with a dropped annotation would teach "background" where an item is: drop it
    records = [r for r in records if r["id"] not in bad_images]
    return records, skipped


@register_source("pidray")
class PIDray(Dataset):
    """Labeled PIDray samples for fine-tuning (and same-image pretraining).

    Args:
        path: dataset root.
        split: ``train``, ``easy``, ``hard``, ``hidden`` or ``test`` (extended release).
        image_size: resize image, masks and boxes to ``image_size × image_size``; None keeps
            the native size (then batch with a custom collate).
        channels: 3 (RGB pseudo-colour) or 1.
        skip_bad: warn and list bad entries in ``skipped_samples`` instead of failing.
        verify_images: decode every image once at construction, so truncated files are found
            (and skipped) up front rather than when a worker reads them.

    Sample dict: ``image`` C×H×W float [0, 1], ``mask`` H×W long (0 background, 1..12 class;
    crowd regions carry their class too), ``boxes`` N×4 xyxy float (COCO edges, image spans
    [0, W]), ``labels`` N long 1..12, ``instance_masks`` N×H×W bool (crowd annotations are not
    instances), ``meta``.
    """

    classes = PIDRAY_CLASSES
    num_classes = len(PIDRAY_CLASSES) + 1

    def __init__(self, path: str | Path, split: str = "train", image_size: int | None = None,
                 channels: int = 3, skip_bad: bool = False, verify_images: bool = False) -> None:
        if path is None:
            raise DataError("PIDray: data.path (the dataset root) is required")
        if channels not in (1, 3):
            raise DataError(f"PIDray: channels must be 1 or 3, got {channels}")
        self.root, self.split = Path(path), split
        self.json_path, self.image_dir = find_split(self.root, split)
        self.records, self.skipped_samples = load_coco(self.json_path, self.image_dir,
                                                       skip_bad, verify_images)
        self.image_size, self.channels = image_size, channels
        self.skip_bad = skip_bad
        self.read_skips = ReadSkips(len(self.records))  # truncated files found in workers
        self.dataset_cards = [PIDRAY_CARD]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        # a file that fails to decode (e.g. a truncated PNG): with skip_bad the next record
        return self.read_skips.first_readable(index, self._read, self.skip_bad,
                                              f"PIDray {self.json_path}")

    def _read(self, index: int) -> dict:
        rec = self.records[index]
        image = torch.from_numpy(read_image(rec["file"], self.channels))
        h, w = rec["height"], rec["width"]
        if tuple(image.shape[1:]) != (h, w):
            raise DataError(f"{self.json_path}: image id {rec['id']}: {rec['file']} is "
                            f"{tuple(image.shape[1:])} but the JSON says {(h, w)}")
        semantic = torch.zeros(h, w, dtype=torch.long)
        inst_masks, labels = [], []
        for ann in rec["anns"]:
            mask = torch.from_numpy(mask_utils.decode(ann["rle"]).astype(bool))
            semantic[mask] = ann["category_id"]
            if not ann["iscrowd"]:
                inst_masks.append(mask)
                labels.append(ann["category_id"])
        inst = torch.stack(inst_masks) if inst_masks else torch.zeros(0, h, w, dtype=torch.bool)
        if self.image_size is not None:
            warn_if_tiny(rec["file"], h, w, self.image_size)
            size = (self.image_size, self.image_size)
            # one sampling grid for image and labels (densessl.data.resize)
            image = resize_image(image, size)
            semantic = resize_labels(semantic, size)
            inst = resize_labels(inst, size)
        # an instance the resize shrank to no pixel would be a zero-area box: drop, count
        keep = inst.flatten(1).any(1)
        labels = torch.tensor(labels, dtype=torch.long)[keep]
        inst = inst[keep]
        return {"image": image, "mask": semantic, "boxes": mask_edge_boxes(inst),
                "labels": labels, "instance_masks": inst,
                "meta": {"source": "pidray", "split": self.split, "file": str(rec["file"]),
                         "image_id": rec["id"], "dropped_instances": int((~keep).sum())}}


@register_inspector("pidray")
def inspect_pidray(root: str | Path) -> dict:
    """Summary: images per split, instances and mask pixels per class, image size range."""
    root = Path(root)
    splits = available_splits(root)
    if not splits:
        raise DataError(f"PIDray: no annotations/*.json under {str(root)!r}")
    classes = {n: {"instances": 0, "pixels": 0} for n in PIDRAY_CLASSES}
    sizes, per_split, skipped = [], {}, 0
    for split in splits:
        json_path, image_dir = find_split(root, split)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported as a count instead
            records, bad = load_coco(json_path, image_dir, skip_bad=True)
        per_split[split] = len(records)
        skipped += len(bad)
        for rec in records:
            sizes.append((rec["height"], rec["width"]))
            for ann in rec["anns"]:
                entry = classes[PIDRAY_CLASSES[ann["category_id"] - 1]]
                entry["instances"] += 1
                entry["pixels"] += int(mask_utils.area(ann["rle"]))
    sizes_arr = np.array(sizes or [(0, 0)])
    return {"format": "pidray", "images": int(sum(per_split.values())), "splits": per_split,
            "classes": classes,
            "image_size": {"min": sizes_arr.min(0).tolist(), "max": sizes_arr.max(0).tolist()},
            "skipped": skipped}
