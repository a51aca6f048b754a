"""A user's own COCO instance annotations as a labeled dataset (``finetune.dataset: coco``).

Recipe::

    finetune:
      dataset: coco
      path: /data/my_set                  # images: <path>/<file_name of each JSON image>
      options:
        annotations: {train: annotations/train.json, val: annotations/val.json,
                      test: annotations/test.json, night: annotations/test_night.json}

``train`` is required; ``val`` is optional; every other key is a test subset, reported apart
(when there is none, ``val`` is evaluated). A relative annotation path is looked up under
``path`` first, then the working directory. Without ``annotations`` every
``<path>/annotations/*.json`` is used, named by its stem (``train.json`` → train).

What the annotations become, per image (resized to ``image_size`` × ``image_size``):

* categories, sorted by id (any ids: 3, 7, 12 or 0-based), are classes 1..K; class 0 is
  background. Every annotation file must list the same categories.
* ``mask``: the class map, each annotation painted in file order (a later one over an earlier
  one); pixels in no annotation are background 0.
* ``boxes`` / ``labels`` / ``instance_masks``: one instance per non-crowd annotation; its box
  is its mask's extent after the resize (as PIDray's, :mod:`densessl.data.pidray`).
* ``iscrowd: 1`` (a region of many objects): not an instance, and 255 (ignore) in the class map
  — neither a false negative for detection nor background for segmentation.
* an annotation with a ``bbox`` but no ``segmentation`` (``[]`` or absent; detection-only
  tools write these): an instance for detection with its box scaled to the resized image.
  Its pixels are unknown — the object covers some of the box, not all — so the box's pixels
  are 255 (ignore) in the class map rather than guessed as object or background, and the
  dataset offers no ``instance_masks`` (Mask R-CNN is refused with an error naming the key)
  when any annotation is box-only.

Integer images wider than 8 bits (a 12-bit X-ray in a 16-bit PNG) are scaled by
``2**bit_depth - 1``, ``bit_depth`` resolved once over all image files
(:mod:`densessl.data.bit_depth`). Every problem (a JSON that is not COCO, an unknown image or
category id, a missing image file) is a :class:`DataError` naming the file and the entry, found
when the dataset is built.

The COCO parsing and rendering here are shared with the PIDray loader.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from densessl.boxes import mask_edge_boxes
from densessl.data.bad_samples import ReadSkips, report_bad
from densessl.data.bit_depth import BitDepth, resolve_bit_depth
from densessl.data.decode import decode_image, warn_if_tiny
from densessl.data.labeled.base import LabeledData, register_eval_dataset
from densessl.data.registry import register_checker, register_inspector
from densessl.data.resize import resize_image, resize_labels
from densessl.errors import DataError

IGNORE = 255


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


def read_coco_json(json_path: str | Path) -> dict:
    """A COCO instance JSON, checked for the keys the loaders read; a DataError names the file
    and the first entry that lacks one."""
    try:
        coco = json.loads(Path(json_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{json_path}: not a readable COCO JSON ({exc})") from exc
    if not isinstance(coco, dict):
        raise DataError(f"{json_path}: not a COCO JSON (top level is a "
                        f"{type(coco).__name__}, expected an object with images, annotations "
                        "and categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{json_path}: missing list {key!r}")
    for key, required in (("images", ("id", "file_name", "height", "width")),
                          ("categories", ("id",))):
        for k, entry in enumerate(coco[key]):
            lacking = [r for r in required if not isinstance(entry, dict) or r not in entry]
            if lacking:
                raise DataError(f"{json_path}: {key}[{k}] lacks {lacking} (a COCO {key[:-1]} "
                                f"needs {list(required)})")
    for k, img in enumerate(coco["images"]):
        if not isinstance(img["file_name"], str) or not all(
                isinstance(img[d], int) and not isinstance(img[d], bool) and img[d] > 0
                for d in ("height", "width")):
            raise DataError(f"{json_path}: images[{k}] (id {img['id']}) needs a file_name "
                            f"string and positive integer height and width, got "
                            f"{img['file_name']!r}, {img['height']!r}, {img['width']!r}")
    return coco


def sorted_category_map(coco: dict) -> tuple[dict, list[str]]:
    """Category id → class 1..K in order of id, and the class names (index 0 background)."""
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    return ({c["id"]: k + 1 for k, c in enumerate(cats)},
            ["background", *(str(c.get("name", f"category_{c['id']}")) for c in cats)])


def _box_only_bbox(ann: dict, height: int, width: int) -> list[float]:
    """The ``bbox`` (x, y, w, h) of an annotation without a segmentation, clipped to the image;
    ValueError when it has none or it covers nothing."""
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise ValueError(f"no segmentation and no bbox [x, y, w, h] (bbox: {bbox!r})")
    x0, y0 = max(0.0, float(bbox[0])), max(0.0, float(bbox[1]))
    x1, y1 = min(float(width), bbox[0] + bbox[2]), min(float(height), bbox[1] + bbox[3])
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"bbox {bbox} covers no pixel of the {width}×{height} image")
    return [x0, y0, x1 - x0, y1 - y0]


def load_coco_records(coco: dict, json_path: Path, image_dir: Path, category_map: dict, *,
                      skip_bad: bool = False, verify: Callable[[Path], object] | None = None,
                      allow_box_only: bool = False) -> tuple[list[dict], list[str]]:
    """Validated records ``{"file", "id", "height", "width", "anns": [...]}`` + skipped list.

    Each kept annotation has ``category_id`` (``category_map`` applied), ``rle`` (compressed;
    None for a box-only annotation, kept only with ``allow_box_only``), ``bbox`` (x, y, w, h
    clipped, for box-only ones) and ``iscrowd``. Missing image files are all looked for before
    the first is reported (with how many there are); ``verify(path)`` decodes a file so
    unreadable ones are found now. An image with a dropped annotation is dropped too: it
    would teach "background" where an object is.
    """
    skipped: list[str] = []
    skip = partial(report_bad, skip_bad=skip_bad, skipped=skipped)
    missing = [img for img in coco["images"] if not (image_dir / img["file_name"]).is_file()]
    if missing and not skip_bad:
        first = missing[0]
        raise DataError(f"{json_path}: image id {first['id']} points at missing file "
                        f"{image_dir / first['file_name']} ({len(missing)} of "
                        f"{len(coco['images'])} image files missing)")
    missing_ids = {img["id"] for img in missing}
    records, by_id = [], {}
    for img in coco["images"]:
        path = image_dir / img["file_name"]
        if img["id"] in missing_ids:
            skip(f"{json_path}: image id {img['id']} points at missing file {path}")
            continue
        if verify is not None:
            try:
                verify(path)
            except DataError as exc:
                skip(f"{json_path}: image id {img['id']}: {exc}")
                continue
        rec = {"file": path, "id": img["id"], "height": int(img["height"]),
               "width": int(img["width"]), "anns": []}
        records.append(rec)
        by_id[img["id"]] = rec
    all_ids = {img["id"] for img in coco["images"]}
    bad_images = set()
    for k, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{json_path}: annotations[{k}] is not an object")
        where = f"{json_path}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        rec = by_id.get(ann.get("image_id"))
        if rec is None:
            if ann.get("image_id") not in all_ids:
                skip(f"{where}: no image with this id")
            continue  # its image was already reported as skipped
        if ann.get("category_id") not in category_map:
            skip(f"{where}: unknown category id {ann.get('category_id')} "
                 f"(known: {sorted(category_map)})")
            bad_images.add(rec["id"])
            continue
        seg, bbox = ann.get("segmentation"), None
        try:
            if allow_box_only and seg in (None, [], {}):
                rle, bbox = None, _box_only_bbox(ann, rec["height"], rec["width"])
            else:
                rle = segmentation_to_rle(seg, rec["height"], rec["width"])
                if mask_utils.area(rle) == 0:
                    raise ValueError("segmentation covers no pixel")
        except (ValueError, TypeError, KeyError) as exc:
            skip(f"{where}: invalid segmentation ({exc})")
            bad_images.add(rec["id"])
            continue
        rec["anns"].append({"id": ann.get("id"), "category_id": category_map[ann["category_id"]],
                            "rle": rle, "bbox": bbox, "iscrowd": int(ann.get("iscrowd", 0))})
    records = [r for r in records if r["id"] not in bad_images]
    return records, skipped


def _box_region(bbox: list[float], height: int, width: int) -> torch.Tensor:
    """H×W bool: every pixel the box (x, y, w, h) touches."""
    x, y, w, h = bbox
    region = torch.zeros(height, width, dtype=torch.bool)
    region[math.floor(y):math.ceil(y + h), math.floor(x):math.ceil(x + w)] = True
    return region


def render_annotations(anns: list[dict], height: int, width: int, image_size: int | None,
                       crowd_label: int | None = IGNORE) -> dict:
    """One image's annotations (records of :func:`load_coco_records`) as a sample's targets.

    Returns ``mask`` (class map: annotations painted in order; box-only ones 255; crowd ones
    ``crowd_label``, None = their class), ``boxes`` (mask extents with COCO edges; a box-only
    annotation's scaled bbox), ``labels``, ``instance_masks`` (non-crowd annotations; a
    box-only one is its box) and ``dropped``: instances the resize shrank to no pixel.
    """
    semantic = torch.zeros(height, width, dtype=torch.long)
    masks, labels, bboxes = [], [], []
    for ann in anns:
        if ann["rle"] is None:
            region, value = _box_region(ann["bbox"], height, width), IGNORE
        else:
            region = torch.from_numpy(mask_utils.decode(ann["rle"]).astype(bool))
            value = (crowd_label if ann["iscrowd"] and crowd_label is not None
                     else ann["category_id"])
        semantic[region] = value
        if not ann["iscrowd"]:
            masks.append(region)
            labels.append(ann["category_id"])
            bboxes.append(ann["bbox"] if ann["rle"] is None else None)
    inst = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)
    out_h, out_w = (height, width) if image_size is None else (image_size, image_size)
    # one sampling grid for image and labels (densessl.data.resize)
    semantic = resize_labels(semantic, (out_h, out_w))
    inst = resize_labels(inst, (out_h, out_w))
    boxes = mask_edge_boxes(inst)
    sx, sy = out_w / width, out_h / height
    for k, bbox in enumerate(bboxes):
        if bbox is not None:
            x, y, w, h = bbox
            boxes[k] = torch.tensor([x * sx, y * sy, min((x + w) * sx, out_w),
                                     min((y + h) * sy, out_h)])
    keep = inst.flatten(1).any(1)
    return {"mask": semantic, "boxes": boxes[keep],
            "labels": torch.tensor(labels, dtype=torch.long)[keep], "instance_masks": inst[keep],
            "dropped": int((~keep).sum())}


class CocoInstances(Dataset):
    """One split of a COCO instance dataset (records from :func:`load_coco_records`).

    Sample dict: ``image`` C×S×S float [0, 1], ``mask`` S×S long (0 background, 1..K, 255
    ignore: crowd and box-only regions), ``boxes`` N×4 xyxy float, ``labels`` N long 1..K,
    ``instance_masks`` N×S×S bool (left out with ``instance_masks=False``), ``meta``.
    """

    def __init__(self, records: list[dict], *, json_path: Path, split: str,
                 image_size: int | None, channels: int, bit_depth: int | None,
                 skip_bad: bool = False, instance_masks: bool = True,
                 skipped_samples: list[str] | None = None) -> None:
        self.records, self.json_path, self.split = records, Path(json_path), split
        self.skipped_samples = list(skipped_samples or [])  # entries dropped with skip_bad
        self.image_size, self.channels, self.bit_depth = image_size, channels, bit_depth
        self.skip_bad, self.instance_masks = skip_bad, instance_masks
        self.read_skips = ReadSkips(len(records))  # unreadable files found in workers

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.read_skips.first_readable(index, self._read, self.skip_bad,
                                              f"COCO {self.json_path}")

    def _read(self, index: int) -> dict:
        rec = self.records[index]
        image = torch.from_numpy(decode_image(rec["file"], self.channels,
                                              bit_depth=self.bit_depth))
        h, w = rec["height"], rec["width"]
        if tuple(image.shape[1:]) != (h, w):
            raise DataError(f"{self.json_path}: image id {rec['id']}: {rec['file']} is "
                            f"{tuple(image.shape[1:])} (H, W) but the JSON says {(h, w)}")
        if self.image_size is not None:
            warn_if_tiny(rec["file"], h, w, self.image_size)
            image = resize_image(image, (self.image_size, self.image_size))
        targets = render_annotations(rec["anns"], h, w, self.image_size, crowd_label=IGNORE)
        dropped = targets.pop("dropped")
        if not self.instance_masks:
            del targets["instance_masks"]
        return {"image": image, **targets,
                "meta": {"source": "coco", "split": self.split, "file": str(rec["file"]),
                         "image_id": rec["id"], "dropped_instances": dropped}}


def _annotation_file(root: Path | None, name: str, value: str) -> Path:
    path = Path(value)
    if not path.is_absolute() and root is not None and (root / path).is_file():
        return root / path
    if not path.is_file():
        where = f" (looked under {str(root)!r} and the working directory)" if root else ""
        raise DataError(f"finetune.options.annotations.{name}: no file {value!r}{where}")
    return path


def _default_annotations(root: Path) -> dict[str, str]:
    files = sorted((root / "annotations").glob("*.json"))
    if not files:
        raise DataError(f"COCO: finetune.options.annotations not set and no annotations/*.json "
                        f"under {str(root)!r}; set annotations: {{train: FILE, test: FILE}}")
    return {f.stem: str(f) for f in files}


@register_eval_dataset("coco", needs_path=True)
def coco_labeled(annotations: dict[str, str] | None = None, path: str | None = None,
                 image_size: int = 64, channels: int = 3, bit_depth: BitDepth | None = "auto",
                 skip_bad: bool = False) -> LabeledData:
    """Train / val / test subsets of COCO instance JSONs (see the module docstring)."""
    if path is None:
        raise DataError("COCO: finetune.path (the folder the images' file_name is relative "
                        "to) is required")
    if channels not in (1, 3):
        raise DataError(f"COCO: channels must be 1 or 3, got {channels}")
    root = Path(path)
    annotations = dict(annotations) if annotations is not None else _default_annotations(root)
    if "train" not in annotations:
        raise DataError(f"finetune.options.annotations: no 'train' file (got "
                        f"{sorted(annotations) or 'none'}); the train split is required")
    if len(annotations) == 1:
        raise DataError("finetune.options.annotations: only a train file; add a test (or val) "
                        "file to evaluate on")
    files = {name: _annotation_file(root, name, value) for name, value in annotations.items()}
    parsed = {name: read_coco_json(f) for name, f in files.items()}
    cat_map, class_names = sorted_category_map(parsed["train"])
    train_cats = sorted((c["id"], c.get("name")) for c in parsed["train"]["categories"])
    for name, coco in parsed.items():
        cats = sorted((c["id"], c.get("name")) for c in coco["categories"])
        if cats != train_cats:
            raise DataError(f"{files[name]}: categories {cats} differ from the train file "
                            f"{files['train']}'s {train_cats}; every split must list the same "
                            "categories (ids and names)")
    loaded, skipped = {}, {}
    for name, coco in parsed.items():
        loaded[name], skipped[name] = load_coco_records(coco, files[name], root, cat_map,
                                                        skip_bad=skip_bad, allow_box_only=True)
    train_files = {r["file"].resolve() for r in loaded["train"]}
    for name, recs in loaded.items():
        shared = [r["file"] for r in recs if name != "train" and r["file"].resolve() in train_files]
        if shared:
            warnings.warn(f"{files[name]}: {len(shared)} image(s) are also in the train file "
                          f"{files['train']} (first: {shared[0]}); their {name} scores are not "
                          "held out", stacklevel=2)
    depth = resolve_bit_depth(bit_depth, [r["file"] for recs in loaded.values() for r in recs],
                              where="finetune.options.bit_depth")
    box_only = any(a["rle"] is None for recs in loaded.values() for r in recs for a in r["anns"])
    splits = {name: CocoInstances(recs, json_path=files[name], split=name,
                                  image_size=image_size, channels=channels, bit_depth=depth,
                                  skip_bad=skip_bad, instance_masks=not box_only,
                                  skipped_samples=skipped[name])
              for name, recs in loaded.items()}
    tests = {name: ds for name, ds in splits.items() if name not in ("train", "val")}
    keys = {"image", "mask", "boxes", "labels"} | (set() if box_only else {"instance_masks"})
    val = splits["val"] if "val" in splits else next(iter(tests.values()))
    return LabeledData(train=splits["train"], val=val, test=tests, class_names=class_names,
                       keys=keys, bit_depth=depth,
                       split_record={"method": "files",
                                     **{name: str(f) for name, f in files.items()}})


@register_inspector("coco")
def inspect_coco(root: str | Path) -> dict:
    """Per ``ROOT/annotations/*.json``: images, annotations, crowd and box-only ones,
    categories, image files missing under ROOT."""
    root = Path(root)
    files = sorted((root / "annotations").glob("*.json"))
    if not files:
        raise DataError(f"COCO: no annotations/*.json under {str(root)!r}")
    summary = {}
    for f in files:
        coco = read_coco_json(f)
        missing = [img["file_name"] for img in coco["images"]
                   if not (root / img["file_name"]).is_file()]
        anns = [a for a in coco["annotations"] if isinstance(a, dict)]
        summary[f.name] = {
            "images": len(coco["images"]), "annotations": len(anns),
            "crowd": sum(int(a.get("iscrowd", 0)) == 1 for a in anns),
            "box_only": sum(a.get("segmentation") in (None, [], {}) for a in anns),
            "categories": {str(c["id"]): c.get("name") for c in coco["categories"]},
            "missing_images": len(missing), "first_missing": missing[:5]}
    cats = {json.dumps(s["categories"], sort_keys=True) for s in summary.values()}
    return {"format": "coco", "root": str(root), "files": summary,
            "categories_agree": len(cats) == 1}


@register_checker("coco")
def check_coco(root: Path, options: dict) -> list[str]:
    """What ``finetune.dataset: coco`` refuses in ``root`` (``data inspect --check``), found by
    :func:`coco_labeled` itself: annotation files it needs, categories that differ between
    files, and every entry it drops with ``skip_bad`` (an image file that is missing, an unknown
    category id, an invalid segmentation), each naming the JSON and the file. ``options``:
    those of :func:`coco_labeled` (e.g. ``annotations``)."""
    from densessl.data.bad_samples import loader_refusals

    return loader_refusals(coco_labeled, root, options)[0]
