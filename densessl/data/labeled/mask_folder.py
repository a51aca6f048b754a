"""A folder of images and class-id masks as a labeled dataset (``finetune.dataset: mask_folder``).

The simplest layout a user's own segmentation labels come in::

    ROOT/images/<stem>.png|jpg|jpeg|tif|tiff
    ROOT/masks/<stem>.png|tif|tiff         one band, pixel = class id, 255 = ignore
    ROOT/classes.txt                       optional: line i names class i
    ROOT/splits/train.txt, val.txt, test.txt   optional: stems, one per line

* Classes: from ``classes.txt``, else ``class_0..class_M`` for the largest id M in the masks.
  Id 0 is background: detection instances (connected components of each class,
  :func:`densessl.data.labeled.instances_from_mask`) are made of ids 1..K-1 only.
* ``class_values``: the raw mask values of classes 0..K-1 in order, for masks whose ids are
  not 0..K-1 (ESA WorldCover: 10, 20, ..., 100); they are remapped to 0..K-1.
* Splits: the split files when ``splits/train.txt`` exists, else a split seeded by the recipe
  seed (``val_fraction``, ``test_fraction``) recorded in ``split_record`` so it can be
  repeated. Nothing is ever written into ROOT. The test split is evaluated when it has
  images, else val.

Every problem — an image without a mask or a mask without an image, a split file naming a
missing stem, an id outside the classes, a mask whose size differs from its image — is a
:class:`DataError` naming the file, raised when the dataset is built (every mask is read once
then), before anything trains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from densessl.data.bit_depth import BitDepth, resolve_bit_depth
from densessl.data.decode import decode_image, warn_if_tiny
from densessl.data.labeled.base import LabeledData, instances_from_mask, register_eval_dataset
from densessl.data.registry import register_checker, register_inspector
from densessl.data.resize import resize_image, resize_labels
from densessl.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASK_EXTENSIONS = (".png", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
IGNORE = 255


def _by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """stem → file for the files directly in ``folder``; two files of one stem are an error."""
    if not folder.is_dir():
        raise DataError(f"mask_folder: no folder {str(folder)!r} (expected ROOT/images and "
                        "ROOT/masks)")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in extensions:
            if path.stem in found:
                raise DataError(f"mask_folder: {found[path.stem]} and {path} share the stem "
                                f"{path.stem!r}; keep one file per stem")
            found[path.stem] = path
    return found


def list_files(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(images, masks), each stem → file."""
    return (_by_stem(root / "images", IMAGE_EXTENSIONS),
            _by_stem(root / "masks", MASK_EXTENSIONS))


def match_pairs(root: Path) -> dict[str, tuple[Path, Path]]:
    """stem → (image, mask); an image without a mask, or a mask without an image, is an error
    naming the first file and how many there are."""
    images, masks = list_files(root)
    for have, other, kind in ((images, masks, "mask"), (masks, images, "image")):
        alone = sorted(set(have) - set(other))
        if alone:
            raise DataError(f"mask_folder: {have[alone[0]]} has no {kind} (looked for "
                            f"{root / ('masks' if kind == 'mask' else 'images') / alone[0]}.*; "
                            f"{len(alone)} file(s) without a {kind}: {alone[:5]})")
    if not images:
        raise DataError(f"mask_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                        f"{str(root / 'images')!r}")
    return {stem: (images[stem], masks[stem]) for stem in sorted(images)}


def read_mask(path: Path) -> np.ndarray:
    """H×W int64 class ids of a one-band mask (palette PNGs give their palette indices)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read mask ({exc})") from None
    if array.ndim != 2:
        raise DataError(f"{path}: mask has mode {mode} with {array.shape[-1]} bands; expected "
                        "one band of class ids (a colour-coded mask must be converted to ids)")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise DataError(f"{path}: floating-point mask with non-integer values; expected "
                            "class ids")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise DataError(f"{path}: negative mask value {array.min()}; expected class ids >= 0")
    return array


def read_classes(root: Path) -> list[str] | None:
    """Names from ``classes.txt`` (line i = class i; trailing blank lines ignored)."""
    path = root / "classes.txt"
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for k, line in enumerate(lines):
        if not line:
            raise DataError(f"{path}: line {k + 1} is blank; every class 0..{len(lines) - 1} "
                            "needs a name")
    if not lines:
        raise DataError(f"{path}: no class names")
    return lines


def value_lut(class_values: list[int] | None) -> np.ndarray | None:
    """raw value → class id (-1: not a class), 255 → 255; None when ids are used as they are."""
    if class_values is None:
        return None
    if not class_values:
        raise DataError("finetune.options.class_values: empty; list the raw value of each "
                        "class 0..K-1, or leave it out")
    if len(set(class_values)) != len(class_values):
        raise DataError(f"finetune.options.class_values: repeated values in {class_values}")
    if any(v < 0 or v > 65535 or v == IGNORE for v in class_values):
        raise DataError(f"finetune.options.class_values: values must be 0..65535 and not "
                        f"{IGNORE} (the ignore value), got {class_values}")
    lut = np.full(max(*class_values, IGNORE) + 1, -1, dtype=np.int64)
    lut[class_values] = np.arange(len(class_values))
    lut[IGNORE] = IGNORE
    return lut


def check_mask_values(path: Path, values: np.ndarray, num_classes: int | None,
                      class_values: list[int] | None) -> None:
    """A DataError naming ``path`` for a value that is no class (255 is always allowed)."""
    values = values[values != IGNORE]
    if class_values is not None:
        bad = values[~np.isin(values, class_values)]
        if bad.size:
            raise DataError(f"{path}: mask value {int(bad[0])} is not one of class_values "
                            f"{class_values} (or {IGNORE} = ignore)")
    elif num_classes is not None:
        bad = values[values >= num_classes]
        if bad.size:
            raise DataError(f"{path}: mask value {int(bad[0])} is not a class id; classes.txt "
                            f"names {num_classes} classes, so ids are 0..{num_classes - 1} "
                            f"(or {IGNORE} = ignore)")


def scan_masks(pairs: dict[str, tuple[Path, Path]]) -> dict[str, dict[int, int]]:
    """stem → {raw value: pixel count}; a mask whose size differs from its image's is an error
    naming both files (the image's size read from its header)."""
    counts = {}
    for stem, (image_path, mask_path) in pairs.items():
        mask = read_mask(mask_path)
        try:
            with Image.open(image_path) as img:
                width, height = img.size
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{image_path}: cannot read image ({exc})") from None
        if mask.shape != (height, width):
            raise DataError(f"mask_folder: {mask_path} is {mask.shape[1]}×{mask.shape[0]} px but "
                            f"its image {image_path} is {width}×{height}")
        values, n = np.unique(mask, return_counts=True)
        counts[stem] = dict(zip(values.tolist(), n.tolist()))
    return counts


def read_split_files(root: Path, stems: list[str]) -> dict[str, list[str]] | None:
    """The stems of ``ROOT/splits/{train,val,test}.txt`` when train.txt exists, else None."""
    folder = root / "splits"
    if not (folder / "train.txt").is_file():
        if any((folder / f"{s}.txt").is_file() for s in SPLITS):
            raise DataError(f"mask_folder: {folder} has split files but no train.txt")
        return None
    known, splits, owner = set(stems), {}, {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        names = ([line.strip() for line in path.read_text().splitlines()]
                 if path.is_file() else [])
        names = list(dict.fromkeys(n for n in names if n))
        for name in names:
            if name not in known:
                raise DataError(f"{path}: stem {name!r} has no image and mask pair under "
                                f"{str(root)!r} (list stems without extension)")
            if name in owner:
                raise DataError(f"{path}: stem {name!r} is also in {owner[name]}.txt; a stem "
                                "in two splits leaks labels into evaluation")
            owner[name] = split
        splits[split] = names
    return splits


def seeded_split(stems: list[str], seed: int, val_fraction: float,
                 test_fraction: float) -> dict[str, list[str]]:
    """train / val / test stems, a permutation of the sorted stems by ``seed``; a non-zero
    fraction gets at least one image while train keeps one."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"finetune.options.{name}: expected 0 <= value < 1, got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"finetune.options: val_fraction + test_fraction is "
                        f"{val_fraction + test_fraction}, leaving no training images")
    n = len(stems)
    n_test = max(int(test_fraction > 0), round(n * test_fraction))
    n_val = max(int(val_fraction > 0), round(n * val_fraction))
    if n_test + n_val == 0 or n - n_test - n_val < 1:
        raise DataError(f"mask_folder: {n} image(s) are too few to split into train and "
                        f"held-out images (val_fraction {val_fraction}, test_fraction "
                        f"{test_fraction}); add images or write ROOT/splits/*.txt")
    order = [stems[i] for i in np.random.default_rng(seed).permutation(n)]
    return {"train": sorted(order[n_test + n_val:]), "val": sorted(order[n_test:n_test + n_val]),
            "test": sorted(order[:n_test])}


class MaskFolderSplit(Dataset):
    """Image / mask pairs of one split. Sample dict: ``image`` C×S×S float [0, 1], ``mask``
    S×S long (class ids, 255 ignore), ``boxes``, ``labels``, ``instance_masks`` (connected
    components), ``meta``."""

    def __init__(self, pairs: list[tuple[Path, Path]], *, image_size: int | None,
                 channels: int, bit_depth: int | None, lut: np.ndarray | None) -> None:
        self.pairs, self.image_size, self.channels = pairs, image_size, channels
        self.bit_depth, self.lut = bit_depth, lut

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.pairs[index]
        image = torch.from_numpy(decode_image(image_path, self.channels,
                                              bit_depth=self.bit_depth))
        mask = read_mask(mask_path)
        if mask.shape != tuple(image.shape[1:]):
            raise DataError(f"mask_folder: {mask_path} is {mask.shape[1]}×{mask.shape[0]} px but "
                            f"its image {image_path} is {image.shape[2]}×{image.shape[1]}")
        if self.lut is not None:
            if mask.max() >= len(self.lut) or (self.lut[mask] < 0).any():
                raise DataError(f"{mask_path}: mask values changed since the dataset was "
                                "built; a value is not in class_values")
            mask = self.lut[mask]
        labels = torch.from_numpy(mask)
        if self.image_size is not None:
            h, w = labels.shape
            warn_if_tiny(image_path, h, w, self.image_size)
            size = (self.image_size, self.image_size)
            image = resize_image(image, size)  # labels on the same grid (densessl.data.resize)
            labels = resize_labels(labels, size)
        return {"image": image, "mask": labels, **instances_from_mask(labels),
                "meta": {"source": "mask_folder", "file": str(image_path),
                         "mask_file": str(mask_path)}}


@register_eval_dataset("mask_folder", needs_path=True)
def mask_folder_labeled(path: str | None = None, image_size: int = 64, channels: int = 3,
                        seed: int = 0, class_values: list[int] | None = None,
                        val_fraction: float = 0.2, test_fraction: float = 0.2,
                        bit_depth: BitDepth | None = "auto") -> LabeledData:
    """Train / val / test splits of ``ROOT/images`` + ``ROOT/masks`` (module docstring)."""
    if path is None:
        raise DataError("mask_folder: finetune.path (the folder with images/ and masks/) is "
                        "required")
    if channels not in (1, 3):
        raise DataError(f"mask_folder: channels must be 1 or 3, got {channels}")
    root = Path(path)
    pairs = match_pairs(root)
    names = read_classes(root)
    lut = value_lut(class_values)
    if names is not None and class_values is not None and len(names) != len(class_values):
        raise DataError(f"{root / 'classes.txt'}: names {len(names)} classes but "
                        f"class_values lists {len(class_values)}")
    counts = scan_masks(pairs)
    for stem, values in counts.items():
        check_mask_values(pairs[stem][1], np.array(sorted(values)),
                          len(names) if names is not None else None, class_values)
    if names is None:
        if class_values is not None:
            names = [f"class_{v}" for v in class_values]
        else:
            top = max((v for c in counts.values() for v in c if v != IGNORE), default=0)
            names = [f"class_{k}" for k in range(top + 1)]
    stems = list(pairs)
    splits = read_split_files(root, stems)
    if splits is not None:
        record = {"method": "files", **splits}
    else:
        splits = seeded_split(stems, seed, val_fraction, test_fraction)
        record = {"method": "seeded", "seed": seed, **splits}
    if not splits["train"]:
        raise DataError(f"mask_folder: the train split of {str(root)!r} is empty")
    if not splits["val"] and not splits["test"]:
        raise DataError(f"mask_folder: {str(root / 'splits')!r} lists no val or test stems; "
                        "results need held-out images")
    depth = resolve_bit_depth(bit_depth, [image for image, _ in pairs.values()],
                              where="finetune.options.bit_depth")
    made = {split: MaskFolderSplit([pairs[s] for s in chosen], image_size=image_size,
                                   channels=channels, bit_depth=depth, lut=lut)
            for split, chosen in splits.items()}
    test = {"test": made["test"]} if splits["test"] else {}
    return LabeledData(train=made["train"], val=made["val"] if splits["val"] else made["test"],
                       test=test, class_names=names,
                       keys={"image", "mask", "boxes", "labels", "instance_masks"},
                       split_record=record, bit_depth=depth)


@register_inspector("mask_folder")
def inspect_mask_folder(root: str | Path) -> dict:
    """Images, masks, stems without a partner, classes, pixels per raw mask value, splits."""
    root = Path(root)
    images, masks = list_files(root)
    names = read_classes(root)
    matched = sorted(set(images) & set(masks))
    pixels: dict[int, int] = {}
    for stem in sorted(masks):
        values, n = np.unique(read_mask(masks[stem]), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            pixels[v] = pixels.get(v, 0) + c
    splits = read_split_files(root, matched)
    return {"format": "mask_folder", "root": str(root), "images": len(images),
            "masks": len(masks),
            "unmatched": {"images_without_mask": sorted(set(images) - set(masks)),
                          "masks_without_image": sorted(set(masks) - set(images))},
            "classes": names, "classes_source": "classes.txt" if names else "mask ids",
            "pixels": {str(v): pixels[v] for v in sorted(pixels)},
            "splits": ({"source": "files", **{s: len(v) for s, v in splits.items()}}
                       if splits is not None else
                       {"source": "seeded at fine-tuning (no splits/train.txt)"})}


@register_checker("mask_folder")
def check_mask_folder(root: Path, options: dict) -> list[str]:
    """What ``finetune.dataset: mask_folder`` refuses in ``root`` (``data inspect --check``),
    found by :func:`mask_folder_labeled` itself: an image without a mask or the reverse, a mask
    whose size differs from its image, an id outside the classes, a split file naming a missing
    stem (the first problem: the loader stops there). ``options``: those of
    :func:`mask_folder_labeled` (``class_values``, ``val_fraction``...)."""
    from densessl.data.bad_samples import loader_refusals

    return loader_refusals(mask_folder_labeled, root, options)[0]
