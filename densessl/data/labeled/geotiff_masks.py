"""Labeled GeoTIFF scenes: ``ROOT/scenes/<stem>.tif`` with class-id rasters
``ROOT/masks/<stem>.tif``.

A practitioner's own segmentation labels rarely share the scene's grid: a mask exported from a
GIS may be in another CRS, resolution or extent. Labels are therefore resampled onto the scene's
pixel grid with nearest neighbour, each scene pixel centre taking the class of the mask cell it
falls in. GDAL approximates a warp's coordinate transform to 1/8 pixel by default (which
``rasterio.warp.reproject`` always does), enough to move a pixel centre near a cell edge into
the neighbouring cell, so the labels are read through a ``WarpedVRT`` with a 1e-6 pixel
tolerance: exact per pixel, and readable by window. Scene pixels the mask does not cover, mask
nodata and the raw id 255 become 255 (ignore); so does scene nodata (nodata value, mask band,
NaN, on any selected band), where the image is 0.

Evaluation reads fixed, non-overlapping ``image_size`` windows on the scene grid (row-major
from the top-left corner; the remainder on the right and bottom is not used), kept when at most
``max_nodata`` of their pixels are ignored. Neighbouring windows are spatially autocorrelated,
so the splits never draw random windows: whole scenes (``ROOT/splits/{train,val,test}.txt`` or
a seeded shuffle), or seeded blocks of ``block_size``×``block_size`` windows with the train
windows next to a held-out block dropped (``buffer``). ``LabeledData.split_record`` lists them.

Worker safety: the labels of the kept windows are read once at build time and held in memory
(one byte per pixel, as small as the windows' images would be at uint8); scene pixels are read
per item through :class:`~densessl.data.geotiff.RasterHandles`, which forked or spawned
DataLoader workers re-open per process.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
import torch
from rasterio.vrt import WarpedVRT
from rasterio.warp import Resampling, transform_bounds
from rasterio.windows import Window
from torch.utils.data import Dataset

from densessl.data.bit_depth import BitDepth, full_scale, resolve_bit_depth, scale_to_unit
from densessl.data.cache import cached_synthetic
from densessl.data.geotiff import RasterHandles, RasterInfo, _read, _valid
from densessl.data.geotiff_synth import LABELED_FOLDER, place_splits
from densessl.data.labeled.base import LabeledData, instances_from_mask, register_eval_dataset
from densessl.data.labeled.mask_folder import read_classes
from densessl.data.registry import register_checker, register_inspector
from densessl.errors import DataError, RecipeError

IGNORE = 255
SUFFIXES = (".tif", ".tiff")
#: warp tolerance of the label view, in mask pixels: exact nearest-cell lookup (GDAL refuses 0)
LABEL_TOLERANCE = 1e-6
SPLITS = ("train", "val", "test")
KEYS = {"image", "mask", "boxes", "labels", "instance_masks"}


@dataclass
class Scene:
    """One scene and its mask, as read from the headers (no open handle: workers re-open)."""

    stem: str
    raster: RasterInfo  # the scene (RasterHandles reads it by path)
    mask_path: Path
    dtype: str
    bits: int | None = None  # integer scenes: the depth they are scaled by; float: None

    @property
    def path(self) -> Path:
        return self.raster.path


def _rasters(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES}


def pair_files(root: Path) -> list[tuple[str, Path, Path]]:
    """(stem, scene, mask) of every scene; a scene without a mask or a mask without a scene is
    an error naming the stems (a silently dropped file would change the splits)."""
    scenes, masks = _rasters(root / "scenes"), _rasters(root / "masks")
    if not scenes:
        raise DataError(f"{root / 'scenes'}: no .tif scenes (expected ROOT/scenes/<stem>.tif "
                        "and ROOT/masks/<stem>.tif)")
    lonely = sorted(set(scenes) - set(masks))
    if lonely:
        raise DataError(f"{root / 'masks'}: no mask for scene(s) {lonely[:5]} (e.g. "
                        f"{scenes[lonely[0]]}); expected {root / 'masks' / lonely[0]}.tif")
    orphans = sorted(set(masks) - set(scenes))
    if orphans:
        raise DataError(f"{root / 'scenes'}: no scene for mask(s) {orphans[:5]} (e.g. "
                        f"{masks[orphans[0]]})")
    return [(stem, scenes[stem], masks[stem]) for stem in sorted(scenes)]


def _georeferenced(src) -> bool:
    return src.crs is not None and not src.transform.is_identity


def _same_grid(scene, mask) -> bool:
    """The mask is pixel-aligned with the scene: same CRS, transform (to 1e-6 pixel over the
    raster) and size, or the mask is not georeferenced and has the scene's size (labels drawn
    on the image in a tool that drops CRSs)."""
    if (scene.width, scene.height) != (mask.width, mask.height):
        return False
    if not _georeferenced(mask):
        return True
    if not _georeferenced(scene) or scene.crs != mask.crs:
        return False
    a, b, c, d, e, f = tuple(~scene.transform @ mask.transform)[:6]  # mask px -> scene px
    side = max(scene.width, scene.height)
    return (max(abs(a - 1), abs(b), abs(d), abs(e - 1)) * side < 1e-6
            and max(abs(c), abs(f)) < 1e-6)


def read_scene(stem: str, scene_path: Path, mask_path: Path, bands: list[int] | None) -> Scene:
    """Header checks of one scene and its mask: bands in range, one mask band, overlap."""
    try:
        with rasterio.open(scene_path) as src:
            count, dtype = src.count, src.dtypes[0]
            raster = RasterInfo(scene_path, None, stem,
                                src.crs.to_wkt() if src.crs else "", tuple(src.transform)[:6],
                                src.width, src.height, count, tuple(src.bounds))
            bad = [b for b in bands or [] if not 1 <= b <= count]
            if bad:
                raise DataError(f"{scene_path}: finetune.options.bands {bands} has {bad} out of "
                                f"range; the scene has bands 1..{count}")
            if len(set(src.dtypes)) != 1:
                raise DataError(f"{scene_path}: bands of different types {src.dtypes}")
            with rasterio.open(mask_path) as mask:
                if mask.count != 1:
                    raise DataError(f"{mask_path}: a mask raster needs one band of class ids, "
                                    f"it has {mask.count}")
                if not _same_grid(src, mask):
                    _check_overlap(src, mask, scene_path, mask_path)
    except rasterio.errors.RasterioError as exc:
        raise DataError(f"{scene_path} / {mask_path}: cannot read GeoTIFF ({exc})") from None
    return Scene(stem, raster, mask_path, dtype)


def _check_overlap(src, mask, scene_path: Path, mask_path: Path) -> None:
    if not _georeferenced(mask) or not _georeferenced(src):
        which = mask_path if not _georeferenced(mask) else scene_path
        raise DataError(f"{which}: no CRS or geotransform, and the mask is not the scene's size "
                        f"({mask.width}x{mask.height} vs {src.width}x{src.height}); labels "
                        "cannot be placed on the scene")
    left, bottom, right, top = transform_bounds(mask.crs, src.crs, *mask.bounds)
    s = src.bounds
    if not (left < s.right and s.left < right and bottom < s.top and s.bottom < top):
        raise DataError(f"{mask_path}: the mask does not overlap its scene {scene_path} "
                        f"(mask bounds in the scene CRS {left:.6g}, {bottom:.6g}, {right:.6g}, "
                        f"{top:.6g}; scene {s.left:.6g}, {s.bottom:.6g}, {s.right:.6g}, "
                        f"{s.top:.6g})")


@contextlib.contextmanager
def label_view(scene, mask):
    """The mask on ``scene``'s pixel grid (an open dataset of one band, plus the alpha band
    that marks where the mask has data when it declares no nodata)."""
    if _same_grid(scene, mask):
        yield mask
        return
    with WarpedVRT(mask, crs=scene.crs, transform=scene.transform, width=scene.width,
                   height=scene.height, resampling=Resampling.nearest,
                   add_alpha=mask.nodata is None, tolerance=LABEL_TOLERANCE) as vrt:
        yield vrt


class LabelMap:
    """Raw mask values → class ids 0..K-1 (``class_values``: listed values in order; else the
    values themselves), 255 = ignore; a value with no class is an error naming the mask."""

    def __init__(self, class_values: list[int] | None, num_named: int | None,
                 classes_file: Path | None) -> None:
        self.values = None if class_values is None else np.asarray(class_values, np.int64)
        self.num_named, self.classes_file = num_named, classes_file
        self.max_id = -1

    def __call__(self, raw: np.ndarray, ignore: np.ndarray, where: Path) -> np.ndarray:
        if raw.dtype.kind == "f":
            ignore = ignore | ~np.isfinite(raw)
            raw = np.where(ignore, 0, raw)
            if (raw != np.round(raw)).any():
                raise DataError(f"{where}: mask values must be whole class ids, found "
                                f"{raw[raw != np.round(raw)][0]}")
        raw = raw.astype(np.int64)
        if self.values is None or IGNORE not in self.values:
            ignore = ignore | (raw == IGNORE)
        if self.values is not None:
            order = np.argsort(self.values)
            sorted_values = self.values[order]
            pos = np.clip(np.searchsorted(sorted_values, raw), 0, len(sorted_values) - 1)
            unknown = (sorted_values[pos] != raw) & ~ignore
            if unknown.any():
                raise DataError(f"{where}: mask values {np.unique(raw[unknown])[:10].tolist()} "
                                f"are not in finetune.options.class_values "
                                f"{self.values.tolist()}; add them or mark them nodata")
            ids = order[pos]
        else:
            ids = raw
            bad = ((ids < 0) | (ids >= IGNORE)) & ~ignore
            if bad.any():
                raise DataError(f"{where}: class ids {np.unique(ids[bad])[:10].tolist()} are "
                                "outside 0..254; list the raw values in "
                                "finetune.options.class_values to remap them")
            if self.num_named is not None:
                over = (ids >= self.num_named) & ~ignore
                if over.any():
                    raise DataError(f"{where}: class id {int(ids[over].max())} but "
                                    f"{self.classes_file} names {self.num_named} classes "
                                    f"(ids 0..{self.num_named - 1})")
        if (~ignore).any():
            self.max_id = max(self.max_id, int(ids[~ignore].max()))
        return np.where(ignore, IGNORE, ids).astype(np.uint8)


@dataclass
class SceneWindows:
    """What one pass over a scene found: kept windows (grid row, col) with their labels, and
    the value range of its valid pixels (for the bit depth / float checks)."""

    cells: list[tuple[int, int]]
    labels: list[np.ndarray]
    lo: float
    hi: float
    best_share: float  # the smallest ignored share of any window


def scan_scene(scene: Scene, bands: list[int], size: int, labels: LabelMap,
               max_nodata: float) -> SceneWindows:
    """Read the scene's window grid once, one row of windows at a time: scene validity,
    labels on the scene grid, the windows under ``max_nodata``."""
    info = scene.raster
    rows, cols = info.height // size, info.width // size
    if rows == 0 or cols == 0:
        raise DataError(f"{scene.path}: {info.width}x{info.height} scene is smaller than "
                        f"finetune.image_size ({size})")
    out = SceneWindows([], [], math.inf, -math.inf, 1.0)
    any_valid = False
    try:
        with rasterio.open(scene.path) as src, rasterio.open(scene.mask_path) as mask, \
                label_view(src, mask) as view:
            nodata = view.nodata
            for r in range(rows):
                window = Window(0, r * size, cols * size, size)
                data = src.read(bands, window=window, out_dtype="float64")
                valid = _valid(src, data, bands, window)
                raw = view.read(1, window=window)
                covered = view.read_masks(1, window=window) > 0
                if nodata is not None:
                    covered &= ~(np.isnan(raw) if np.isnan(nodata) else raw == nodata)
                ids = labels(raw, ~valid | ~covered, scene.mask_path)
                if valid.any():
                    any_valid = True
                    values = data[:, valid]
                    out.lo, out.hi = min(out.lo, values.min()), max(out.hi, values.max())
                for c in range(cols):
                    tile = ids[:, c * size:(c + 1) * size]
                    share = float((tile == IGNORE).mean())
                    out.best_share = min(out.best_share, share)
                    if share <= max_nodata and share < 1.0:
                        out.cells.append((r, c))
                        out.labels.append(tile.copy())
    except rasterio.errors.RasterioError as exc:
        raise DataError(f"{scene.path} / {scene.mask_path}: cannot read GeoTIFF pixels "
                        f"({exc})") from None
    if not any_valid:
        raise DataError(f"{scene.path}: every pixel of bands {bands} is nodata")
    if not out.cells:
        raise DataError(f"{scene.path}: no {size}x{size} window has at most "
                        f"finetune.options.max_nodata {max_nodata} of its pixels ignored "
                        f"(nodata or not covered by {scene.mask_path}); the best window has "
                        f"{out.best_share:.3f}: raise max_nodata to at least that, or check "
                        "the mask's extent")
    return out


def _read_max(found: dict[str, SceneWindows], dtypes: dict[str, str]):
    def read_max(path: Path) -> tuple[float, int]:
        storage = 8 if dtypes[str(path)] == "uint8" else 16
        return max(found[str(path)].hi, 0.0), storage
    return read_max


def resolve_depths(scenes: list[Scene], found: dict[str, SceneWindows], bit_depth,
                   scale: float | None) -> int | None:
    """Set each scene's ``bits`` and check its valid pixels fit in them; returns the depth
    the integer scenes are scaled by (None for float scenes or with ``scale``)."""
    if scale is not None:
        if not scale > 0:
            raise RecipeError(f"finetune.options.scale: expected > 0, got {scale}")
        if bit_depth != "auto":
            raise RecipeError("finetune.options: set scale or bit_depth, not both")
        return None
    for s in scenes:
        if np.dtype(s.dtype).kind == "f":
            f = found[str(s.path)]
            if f.lo < 0 or f.hi > 1:
                raise DataError(f"{s.path}: float pixel values {f.lo:g}..{f.hi:g} are outside "
                                "[0, 1]; set finetune.options.scale (e.g. 10000 for "
                                "reflectance x 10000) to divide them")
    ints = [s for s in scenes if np.dtype(s.dtype).kind in "ui"]
    if not ints:
        return None
    wide = [s for s in ints if s.dtype != "uint8"]
    bits = resolve_bit_depth(bit_depth, [s.path for s in wide] or [s.path for s in ints],
                             where="finetune.options.bit_depth",
                             read_max=_read_max(found, {str(s.path): s.dtype for s in ints}))
    for s in ints:
        s.bits = 8 if s.dtype == "uint8" else bits
        f = found[str(s.path)]
        if f.lo < 0 or f.hi > full_scale(s.bits):
            raise DataError(f"{s.path}: pixel values {f.lo:g}..{f.hi:g} are outside "
                            f"0..{int(full_scale(s.bits))} ({s.bits} bits); set "
                            "finetune.options.bit_depth, or scale")
    return bits if wide else 8


class GeoTiffMaskWindows(Dataset):
    """Fixed windows of labeled scenes: the image read per item, the labels from memory."""

    def __init__(self, scenes: list[Scene], items: list[tuple[int, int, int]],
                 labels: np.ndarray, size: int, bands: list[int], scale: float | None) -> None:
        self.scenes, self.items, self.labels = scenes, items, labels
        self.size, self.bands, self.scale = size, bands, scale
        self.handles = RasterHandles()

    def __len__(self) -> int:
        return len(self.items)

    def window(self, index: int) -> tuple[str, Window]:
        """The scene stem and pixel window of item ``index``."""
        scene, r, c = self.items[index]
        return self.scenes[scene].stem, Window(c * self.size, r * self.size, self.size,
                                               self.size)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        scene = self.scenes[self.items[index][0]]
        _, window = self.window(index)
        data, valid = _read(self.handles, scene.raster, scene.raster, window, self.bands, True)
        data = np.where(valid, data, 0.0)
        if self.scale is not None:
            image = np.clip(data / self.scale, 0.0, 1.0).astype(np.float32)
        elif scene.bits is None:  # float scene, checked to lie in [0, 1]
            image = data.astype(np.float32)
        else:
            image = scale_to_unit(data, scene.bits, scene.path)
        mask = torch.from_numpy(self.labels[index].astype(np.int64))
        mask[torch.from_numpy(~valid)] = IGNORE
        return {"image": torch.from_numpy(image), "mask": mask, **instances_from_mask(mask)}


def _counts(n: int, val_fraction: float, test_fraction: float, what: str) -> tuple[int, int]:
    """(val, test) item counts: the rounded fractions, at least one each when asked for, and
    at least one item left to train on."""
    val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - val - test < 1:
        raise DataError(f"{n} {what} are too few for val_fraction {val_fraction} and "
                        f"test_fraction {test_fraction} (each needs one, train one more)")
    return val, test


def _read_split_files(root: Path, stems: list[str]) -> dict[str, list[str]]:
    folder = root / "splits"
    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name in SPLITS:
        file = folder / f"{name}.txt"
        listed = [line.strip() for line in file.read_text().splitlines()
                  if line.strip()] if file.is_file() else []
        for stem in listed:
            if stem not in stems:
                raise DataError(f"{file}: scene {stem!r} is not in {root / 'scenes'}")
            if stem in owner:
                raise DataError(f"{file}: scene {stem!r} is also in {owner[stem]}.txt")
            owner[stem] = name
        out[name] = listed
    if not out["train"] or not (out["val"] or out["test"]):
        raise DataError(f"{folder}: needs train.txt and val.txt or test.txt, each listing "
                        "scene stems")
    return out


def block_split(cells: list[tuple[int, int, int]], stems: list[str], block_size: int,
                buffer: int, val_fraction: float, test_fraction: float, seed: int
                ) -> tuple[dict[str, list[int]], dict]:
    """Seeded blocks of ``block_size``² windows per split; train windows within ``buffer``
    windows of a held-out block are dropped (neighbouring windows share structure)."""
    def block_of(s, r, c):
        return f"{stems[s]}:{r // block_size}:{c // block_size}"

    blocks = sorted({block_of(*cell) for cell in cells})
    n_val, n_test = _counts(len(blocks), val_fraction, test_fraction,
                            f"blocks of {block_size}x{block_size} windows")
    order = np.random.default_rng(seed).permutation(len(blocks))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[blocks[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val \
            else "train"
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    dropped = 0
    for i, (s, r, c) in enumerate(cells):
        name = split_of[block_of(s, r, c)]
        if name == "train" and buffer > 0:
            near = {split_of.get(block_of(s, r + dr, c + dc))
                    for dr in range(-buffer, buffer + 1) for dc in range(-buffer, buffer + 1)
                    if r + dr >= 0 and c + dc >= 0}
            if near & {"val", "test"}:
                dropped += 1
                continue
        out[name].append(i)
    record = {name: sorted(b for b, n in split_of.items() if n == name) for name in SPLITS}
    return out, {**record, "block_size": block_size, "buffer": buffer,
                 "dropped_train_windows": dropped}


def _class_names(labels: LabelMap, class_values: list[int] | None,
                 named: list[str] | None) -> list[str]:
    if named is not None:
        return named
    if class_values is not None:
        return [f"class_{v}" for v in class_values]
    return ["background"] + [f"class_{i}" for i in range(1, max(labels.max_id, 0) + 1)]


def _read_classes(root: Path, class_values: list[int] | None) -> list[str] | None:
    """``classes.txt`` as mask_folder reads it, plus what a uint8 label raster allows."""
    names = read_classes(root)
    if names is None:
        return None
    file = root / "classes.txt"
    if class_values is not None and len(names) != len(class_values):
        raise DataError(f"{file}: {len(names)} names for {len(class_values)} "
                        "finetune.options.class_values")
    if len(names) > IGNORE:
        raise DataError(f"{file}: {len(names)} classes; at most {IGNORE} (255 = ignore)")
    return names


@register_eval_dataset("geotiff_masks", needs_path=True)
def geotiff_masks(path: str | None = None, image_size: int = 64, channels: int = 3,
                  seed: int = 0, bands: list[int] | None = None, bit_depth: BitDepth = "auto",
                  scale: float | None = None, max_nodata: float = 0.5,
                  split: Literal["auto", "files", "scenes", "blocks"] = "auto",
                  block_size: int = 4, buffer: int = 1, val_fraction: float = 0.2,
                  test_fraction: float = 0.2, class_values: list[int] | None = None,
                  licence: str = "unknown (set finetune.options.licence)",
                  attribution: str = "") -> LabeledData:
    """User GeoTIFF scenes with mask rasters as a labeled dataset (see the module doc).

    Args:
        path: ROOT with ``scenes/`` and ``masks/`` (same stems); optional ``classes.txt``
            (line i names class i) and ``splits/{train,val,test}.txt`` (scene stems).
        bands: 1-based scene bands (default all); their number must equal ``data.channels``.
        bit_depth: integer scenes are divided by ``2**bits - 1`` (``auto``: what the files
            declare, else the smallest depth holding their largest value); 8-bit storage by 255.
            Float scenes must already lie in [0, 1].
        scale: divide every scene by this instead (and clip to [0, 1]): e.g. 10000 for
            reflectance stored x 10000, where clouds exceed the nominal range.
        max_nodata: windows with a larger share of ignored pixels are not used.
        split: ``files`` (ROOT/splits), ``scenes`` (seeded), ``blocks`` (seeded blocks of
            windows); ``auto``: files when present, else scenes with 3 or more, else blocks.
        block_size, buffer: block side and the train gap around held-out blocks, in windows.
        class_values: raw mask values of classes 0..K-1 (e.g. WorldCover 10, 20, ...).
    """
    if path is None:
        raise RecipeError("finetune.path: geotiff_masks needs the folder holding scenes/ and "
                          "masks/")
    if not 0 <= max_nodata <= 1:
        raise RecipeError(f"finetune.options.max_nodata: expected a fraction in [0, 1], got "
                          f"{max_nodata}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise RecipeError(f"finetune.options.{name}: expected a fraction in [0, 1), got "
                              f"{value}")
    if block_size < 1 or buffer < 0:
        raise RecipeError("finetune.options: block_size must be >= 1 and buffer >= 0")
    if class_values is not None and (len(set(class_values)) != len(class_values)
                                     or not 0 < len(class_values) <= IGNORE):
        raise RecipeError(f"finetune.options.class_values: expected 1..{IGNORE} distinct "
                          f"values, got {class_values}")
    root = Path(path)
    scenes = [read_scene(stem, s, m, bands) for stem, s, m in pair_files(root)]
    counts = {s.raster.count for s in scenes}
    if bands is None and len(counts) != 1:
        odd = next(s for s in scenes if s.raster.count != scenes[0].raster.count)
        raise DataError(f"{odd.path}: {odd.raster.count} bands but {scenes[0].path} has "
                        f"{scenes[0].raster.count}; choose finetune.options.bands")
    used = list(bands) if bands else list(range(1, scenes[0].raster.count + 1))
    if len(used) != channels:
        raise DataError(f"data.channels is {channels} but {len(used)} bands "
                        f"{'(finetune.options.bands) ' if bands else ''}are read from "
                        f"{scenes[0].path}; set data.channels: {len(used)} or choose "
                        "finetune.options.bands")
    named = _read_classes(root, class_values)
    labels = LabelMap(class_values, None if named is None or class_values is not None
                      else len(named), root / "classes.txt")
    found = {str(s.path): scan_scene(s, used, image_size, labels, max_nodata) for s in scenes}
    depth = resolve_depths(scenes, found, bit_depth, scale)
    class_names = _class_names(labels, class_values, named)

    cells = [(i, r, c) for i, s in enumerate(scenes) for r, c in found[str(s.path)].cells]
    stems = [s.stem for s in scenes]
    has_files = (root / "splits" / "train.txt").is_file()
    method = split if split != "auto" else (
        "files" if has_files else "scenes" if len(scenes) >= 3 else "blocks")
    record: dict = {"method": method, "seed": seed}
    if method in ("files", "scenes"):
        if method == "files":
            if not has_files:
                raise DataError(f"{root / 'splits' / 'train.txt'}: finetune.options.split is "
                                "files but the file is missing")
            lists = _read_split_files(root, stems)
        else:
            n_val, n_test = _counts(len(stems), val_fraction, test_fraction, "scenes")
            order = [stems[i] for i in np.random.default_rng(seed).permutation(len(stems))]
            lists = {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
                     "train": sorted(order[n_test + n_val:])}
        where = {stem: name for name, listed in lists.items() for stem in listed}
        chosen = {name: [i for i, (s, _, _) in enumerate(cells) if where.get(stems[s]) == name]
                  for name in SPLITS}
        record.update(lists)
        unused = sorted(set(stems) - set(where))
        if unused:
            record["unused"] = unused
    else:
        chosen, extra = block_split(cells, stems, block_size, buffer, val_fraction,
                                    test_fraction, seed)
        record.update(extra)
    record["windows"] = {name: len(chosen[name]) for name in SPLITS}
    all_labels = [lab for s in scenes for lab in found[str(s.path)].labels]

    def subset(name: str) -> GeoTiffMaskWindows:
        idx = chosen[name]
        stack = (np.stack([all_labels[i] for i in idx]) if idx
                 else np.zeros((0, image_size, image_size), np.uint8))
        return GeoTiffMaskWindows(scenes, [cells[i] for i in idx], stack, image_size, used,
                                  scale)

    if not chosen["train"]:
        raise DataError(f"{root}: no train window left (split {method}); lower block_size or "
                        "buffer, or add scenes")
    test = subset("test")
    val = subset("val")
    if not len(test) and not len(val):
        raise DataError(f"{root}: no val or test window (split {method})")
    return LabeledData(
        train=subset("train"), val=val, test={"test": test} if len(test) else {},
        class_names=class_names, keys=set(KEYS),
        cards=[{"name": str(root), "kind": "user GeoTIFF scenes", "licence": licence,
                "source": str(root), "attribution": attribution}],
        split_record=record, bit_depth=depth)


SERIES_LABELS_CARD = {"name": "GeoTIFF-series synthetic land cover (densessl)",
                      "kind": "synthetic GeoTIFF scenes + land-cover masks",
                      "licence": "Apache-2.0 (generated by densessl, no third-party content)",
                      "source": "densessl.data.geotiff_synth (geotiff-series-masks)",
                      "attribution": "none required"}


@register_eval_dataset("geotiff_series_masks")
def geotiff_series_masks(path: str | None = None, image_size: int = 64, channels: int = 4,
                         seed: int = 0, bit_depth: BitDepth = "auto",
                         synthetic_places: int = 4, dataset_seed: int | None = None,
                         cache_dir: str | None = None, max_nodata: float = 0.5,
                         bands: list[int] | None = None,
                         split: Literal["auto", "files"] = "auto") -> LabeledData:
    """The land-cover labels of the synthetic series that ``data.source: geotiff`` pretrains on
    with ``data.options.synthetic_series`` (no ``data.path``): the same cached set, so give the
    same ``synthetic_places``, ``dataset_seed`` (default: ``seed``, as the source) and
    ``cache_dir`` as ``data.options``. Read as ``geotiff_masks`` reads its ROOT: every date on a
    place's own grid is a scene, classes background / field / bare_soil / building, split by
    place (train places and test places never share a scene,
    :func:`densessl.data.geotiff_synth.place_splits`; ``split``: ``auto`` or ``files`` alike,
    and ``bands`` as ``geotiff_masks``'s, so the recipe's geotiff_masks options carry over)."""
    if path is not None:
        raise RecipeError("finetune.path: geotiff_series_masks reads the synthetic series from "
                          "the cache; for your own scenes use finetune.dataset: geotiff_masks")
    try:
        place_splits(synthetic_places)
    except ValueError as exc:
        raise RecipeError(f"finetune.options.synthetic_places: {exc}") from None
    root = cached_synthetic("geotiff-series-masks", synthetic_places,
                            seed if dataset_seed is None else dataset_seed,
                            cache_dir) / LABELED_FOLDER
    data = geotiff_masks(str(root), image_size=image_size, channels=channels, seed=seed,
                         bit_depth=bit_depth, max_nodata=max_nodata, bands=bands,
                         split="files")
    data.cards = [dict(SERIES_LABELS_CARD)]
    data.split_record = {**(data.split_record or {}), "root": str(root)}
    return data


@register_inspector("geotiff_masks")
def inspect_geotiff_masks(root: Path) -> dict:
    """Scenes and masks of a geotiff_masks folder from their headers: pairing, CRSs, bands,
    sizes, classes, split files, and the problems ``finetune`` would stop at."""
    root = Path(root)
    scenes, masks = _rasters(root / "scenes"), _rasters(root / "masks")
    problems = []
    try:
        pairs = pair_files(root)
    except DataError as exc:
        problems.append(str(exc))
        pairs = [(s, scenes[s], masks[s]) for s in sorted(set(scenes) & set(masks))]
    crs, mask_crs, bands, sizes, dtypes = set(), set(), set(), set(), set()
    for stem, scene_path, mask_path in pairs:
        try:
            read_scene(stem, scene_path, mask_path, None)
            with rasterio.open(scene_path) as src, rasterio.open(mask_path) as mask:
                crs.add(src.crs.to_string() if src.crs else "none")
                mask_crs.add(mask.crs.to_string() if mask.crs else "none")
                bands.add(src.count)
                sizes.add(f"{src.width}x{src.height}")
                dtypes.add(src.dtypes[0])
        except DataError as exc:
            problems.append(str(exc))
    classes = root / "classes.txt"
    splits = {name: len([ln for ln in (root / "splits" / f"{name}.txt").read_text().splitlines()
                         if ln.strip()])
              for name in SPLITS if (root / "splits" / f"{name}.txt").is_file()}
    return {"format": "geotiff_masks", "root": str(root), "scenes": len(scenes),
            "masks": len(masks), "pairs": len(pairs), "crs": sorted(crs),
            "mask_crs": sorted(mask_crs), "band_count": sorted(bands), "sizes": sorted(sizes),
            "dtypes": sorted(dtypes),
            "classes": classes.read_text().splitlines() if classes.is_file() else None,
            "splits": splits or None, "problems": problems}


@register_checker("geotiff_masks")
def check_geotiff_masks(root: Path, options: dict) -> list[str]:
    """What ``finetune.dataset: geotiff_masks`` refuses in ``root`` (``data inspect --check``):
    the problems the inspector finds per scene (pairing, CRS, grids, bands), then
    :func:`geotiff_masks` itself (classes, nodata, splits; the first problem, where it
    stops). ``options``: those of :func:`geotiff_masks`; ``channels`` defaults to the first
    scene's band count (or the number of ``bands``)."""
    from densessl.data.bad_samples import loader_refusals

    problems = list(inspect_geotiff_masks(root)["problems"])
    defaults = {}
    if "channels" not in options:
        scenes = sorted(_rasters(Path(root) / "scenes").values())
        if options.get("bands"):
            defaults["channels"] = len(options["bands"])
        elif scenes:
            try:
                with rasterio.open(scenes[0]) as src:
                    defaults["channels"] = src.count
            except rasterio.errors.RasterioError:
                pass  # named by the loader
    problems += loader_refusals(geotiff_masks, root, options, defaults)[0]
    return list(dict.fromkeys(problems))
