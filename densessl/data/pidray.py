"""PIDray (COCO-style X-ray segmentation / detection set) loader and inspector.

PIDray: Wang et al. 2021, "Towards Real-world Prohibited Item Detection: A Large-scale X-ray
Benchmark" (ICCV). Layout (see datasets/pidray/README.md)::

    <root>/annotations/xray_train.json        <root>/train/*.png
    <root>/annotations/xray_test_easy.json    <root>/easy/
    <root>/annotations/xray_test_hard.json    <root>/hard/
    <root>/annotations/xray_test_hidden.json  <root>/hidden/
    (extended release: annotations/train.json + train/, annotations/test.json + test/)

Masks are polygons, compressed RLE or uncompressed RLE (decoded with pycocotools; the COCO
parsing is shared with the generic loader, :mod:`densessl.data.labeled.coco`). Every problem
in the annotations is a :class:`DataError` naming the file and the entry, or with
``skip_bad=True`` a warning plus an entry in ``skipped_samples``.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from densessl.data.bad_samples import ReadSkips
from densessl.data.decode import decode_image, warn_if_tiny
from densessl.data.labeled.coco import load_coco_records, read_coco_json, render_annotations
from densessl.data.registry import register_checker, register_inspector, register_source
from densessl.data.resize import resize_image
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


def read_image(path: Path, channels: int = 3, keep_uint8: bool = False) -> np.ndarray:
    """C×H×W float32 in [0, 1], scaled by bit depth (:func:`densessl.data.decode.decode_image`,
    the decoder every loader shares), or uint8 0..255 for 8-bit files with ``keep_uint8``; a
    truncated or unreadable file is a DataError naming it."""
    return decode_image(path, channels, keep_uint8)


def load_coco(json_path: Path, image_dir: Path, skip_bad: bool = False,
              verify_images: bool = False) -> tuple[list[dict], list[str]]:
    """Validated records ``{"file", "id", "height", "width", "anns": [...]}`` + skipped list
    (:func:`densessl.data.labeled.coco.load_coco_records`).

    Each kept annotation has ``category_id`` in 1..12 (PIDray order, matched by category name),
    ``rle`` (compressed) and ``iscrowd``.
    """
    coco = read_coco_json(json_path)
    name_to_ours = {n.lower(): i + 1 for i, n in enumerate(PIDRAY_CLASSES)}
    cat_map = {}
    for cat in coco["categories"]:
        ours = name_to_ours.get(str(cat.get("name", "")).lower())
        if ours is None:
            raise DataError(f"{json_path}: category {cat.get('id')} {cat.get('name')!r} is "
                            f"not a PIDray class ({', '.join(PIDRAY_CLASSES)})")
        cat_map[cat["id"]] = ours
    verify = partial(read_image, channels=1) if verify_images else None
    return load_coco_records(coco, Path(json_path), Path(image_dir), cat_map,
                             skip_bad=skip_bad, verify=verify)


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
        if self.image_size is not None:
            warn_if_tiny(rec["file"], h, w, self.image_size)
            image = resize_image(image, (self.image_size, self.image_size))
        # crowd regions carry their class; instances the resize shrank away are counted
        targets = render_annotations(rec["anns"], h, w, self.image_size, crowd_label=None)
        dropped = targets.pop("dropped")
        return {"image": image, **targets,
                "meta": {"source": "pidray", "split": self.split, "file": str(rec["file"]),
                         "image_id": rec["id"], "dropped_instances": dropped}}


@register_inspector("pidray")
def inspect_pidray(root: str | Path) -> dict:
    """Summary: images per split, instances and mask pixels per class, image size range."""
    root = Path(root)
    splits = available_splits(root)
    if not splits:
        raise DataError(f"PIDray: no annotations/*.json under {str(root)!r}")
    classes = {n: {"instances": 0, "pixels": 0} for n in PIDRAY_CLASSES}
    sizes, per_split, skipped = [], {}, []
    for split in splits:
        json_path, image_dir = find_split(root, split)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # listed in the report instead
            records, bad = load_coco(json_path, image_dir, skip_bad=True)
        per_split[split] = len(records)
        skipped += bad
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
            # entries the loader drops with data.skip_bad and refuses without it, each naming
            # the file and why (the first few; --check lists them all)
            "skipped": len(skipped), "skipped_first": skipped[:SKIPPED_SHOWN]}


#: how many skipped entries an inspector report names (``--check`` lists every one)
SKIPPED_SHOWN = 5


@register_checker("pidray")
def check_pidray(root: Path, options: dict) -> list[str]:
    """What the PIDray loader refuses (``data inspect --check``): for every split, the entries
    :func:`load_coco` drops with ``skip_bad`` (annotations pointing at a missing image, unknown
    categories, invalid segmentations) and its errors (a damaged JSON, a category that is not a
    PIDray class), each naming the file. ``options``: those of :class:`PIDray` except ``split``
    (every split is checked)."""
    from densessl.data.bad_samples import loader_refusals

    if "split" in options:
        raise DataError("data inspect --option split: --check checks every split")
    splits = available_splits(root)
    if not splits:
        return [f"PIDray: no annotations/*.json under {str(root)!r}"]
    problems = []
    for split in splits:
        problems += loader_refusals(PIDray, root, {**options, "split": split})[0]
    return problems
