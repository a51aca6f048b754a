"""Large single-date GeoTIFF scenes (any size, any band count) → random native-resolution
windows, for ``same_image`` pretraining on e.g. whole 10,980² 13-band Sentinel-2 scenes.

A scene is never read whole: each item is one windowed read (``src.read(bands, window=...)``)
through a file handle opened once per process (:class:`~densessl.data.geotiff.RasterHandles`;
forked DataLoader workers open their own). Memory per process is then the handles plus
GDAL's block cache, and GDAL's default cache is 5 % of the machine's RAM *per process* (6 GiB
per worker on a 128 GiB machine: decoded tiles of a large scene pile up to that). So the
source sets ``GDAL_CACHEMAX`` in each process that reads (``gdal_cache_mb``, default 256): a
fixed ceiling, whatever the scene size.

Windows are drawn per item from a generator seeded by ``(seed, index)`` (no global state), so a
resumed run, a DataLoader worker and a test see the same window for the same index: a scene
chosen with probability proportional to its valid area (its area times the valid share of a
sample read at build time, so a scene half nodata — a swath edge — is not sampled twice as
densely as a full one), then a position uniform over the scene. A window whose nodata share
(nodata value, internal mask, NaN on any selected band) exceeds ``max_nodata`` is redrawn in
the same scene. A scene smaller than ``image_size`` is padded with invalid pixels (``valid``
False, image 0; placed at a random offset inside the window) rather than upscaled: upscaling
would invent pixels at a resolution the other scenes do not have; the padding only costs
cells, which the pair's validity mask already excludes.

Why not torchgeo's ``RasterDataset`` + ``RandomGeoSampler`` (on PyPI, not a dependency): they
solve another problem — many files mosaicked by geographic query (a spatial index, a
``rasterio.merge`` of every file touching each query box, reprojection to one CRS and
resolution through ``WarpedVRT``). A single-date scene is read in its own pixel grid, where a
window is one read of one file, without merge or warp. The sampler draws boxes from a
generator stream at iteration time: a window depends on how many were drawn before it, not on
the item index, so the stream sampler's (seed, position) contract (resume, several workers)
does not carry over. Its sample has the image only (nodata comes back as a fill value, no
validity mask), while the dense objectives need ``valid`` to keep nodata cells out of the
positives. And it would bring a dependency tree (spatial index, fiona, pyproj, shapely,
pandas, kornia, lightning) for what is here a windowed read. Not measured (not installed into
the shared environment).

Reads are decode-bound: a random 256² window of a DEFLATE scene with 512² tiles decodes ~2.25
tiles × every band (``densessl bench --tiles-only``). With overviews, the build-time sample's
overview gives a validity map per scene, so redraws skip candidates that are sure to be over
``max_nodata`` without reading them (:func:`surely_too_empty`; the kept window is the same).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.enums import MaskFlags
from rasterio.env import set_gdal_config
from rasterio.windows import Window
from torch.utils.data import Dataset

from densessl.data.bad_samples import ReadSkips, report_bad
from densessl.data.bit_depth import (
    BitDepth,
    raster_declared_bits,
    resolve_bit_depth,
    scale_to_unit,
)
from densessl.data.geotiff import RasterHandles, list_files, series_root, stats_windows
from densessl.data.manifest import ProvenanceFilter
from densessl.data.registry import (
    register_inspector,
    register_provenance_lister,
    register_source,
)
from densessl.errors import DataError

#: windows per epoch at least, whatever the area: enough distinct windows for a batch and an
#: epoch of some length on a small set
MIN_ITEMS = 1024
#: side of the area the build-time sample's full-resolution window grid covers
SAMPLE_SIDE = 256
#: the largest overview (pixels) read at build time: its validity map (≤ 256 KiB a scene)
#: lets redraws skip windows that are sure to be mostly nodata
COARSE_CELLS = 512 * 512


@dataclass(frozen=True)
class Scene:
    """One raster's header (no handle: workers re-open). ``path`` is what
    :class:`RasterHandles` keys on."""

    path: Path
    width: int
    height: int
    count: int
    dtype: str  # of the selected bands (one numpy dtype)
    #: how a window's validity is found: "all" (no nodata, no mask), "nodata" (compare with
    #: ``nodata``), "masks" (internal mask / alpha band: GDAL's masks are read)
    rule: str = "all"
    nodata: float | None = None
    block: tuple[int, int] = (256, 256)  # internal tile (or strip) height, width


def scene_files(path: str | Path) -> list[Path]:
    """A single .tif/.tiff, or every one under a folder (recursively) or matching a glob."""
    p = Path(str(path))
    if p.is_file():
        return [p]
    return list_files(path)


def scenes_root(path: str | Path) -> Path:
    """What manifest rows and ``meta`` file names are relative to: the folder (for a glob, its
    part before the first wildcard), or a single file's folder."""
    p = Path(str(path))
    return p.parent if p.is_file() else series_root(path)


@register_provenance_lister("geotiff_tiles")
def geotiff_tiles_provenance_files(root: Path) -> tuple[list[str], None]:
    """``data inspect --format geotiff_tiles --manifest``: every scene (headers not read)."""
    base = scenes_root(root)
    return [f.relative_to(base).as_posix() for f in scene_files(root)], None


def read_scene(path: Path, bands: list[int] | None) -> Scene:
    """The header of ``path``; unreadable, or without the selected bands, is a DataError."""
    try:
        with rasterio.open(path) as src:
            width, height, count, dtypes = src.width, src.height, src.count, src.dtypes
            chosen = bands or list(range(1, count + 1))
            if max(chosen) > count or min(chosen) < 1:
                raise DataError(f"{path}: has {count} bands; data.options.bands {chosen} asks "
                                f"for bands outside 1..{count}")
            flags = [src.mask_flag_enums[b - 1] for b in chosen]
            nodata, block = src.nodata, tuple(src.block_shapes[0])
    except rasterio.errors.RasterioError as exc:
        raise DataError(f"{path}: cannot read GeoTIFF ({exc})") from None
    kinds = {dtypes[b - 1] for b in chosen}
    if len(kinds) != 1:
        raise DataError(f"{path}: the selected bands have different types {sorted(kinds)}; "
                        "choose bands of one type with data.options.bands")
    # GDAL's mask flags, read once: a mask that only says "value == nodata" is computed from
    # the values already read (read_masks would decode the window a second time)
    if all(f == [MaskFlags.all_valid] for f in flags):
        rule = "all"
    elif all(MaskFlags.nodata in f for f in flags) and nodata is not None:
        rule = "nodata"
    else:
        rule = "masks"
    return Scene(path, width, height, count, kinds.pop(), rule, nodata, block)


def window_block_bytes(scene: Scene, size: int) -> int:
    """Decoded bytes of the internal blocks one ``size``² window can touch, every band (a
    pixel-interleaved tile holds them all): what GDAL's cache must hold for one read not to
    decode a tile twice."""
    bh, bw = scene.block
    tiles = (math.ceil((size - 1) / bh) + 1) * (math.ceil((size - 1) / bw) + 1)
    return tiles * bh * bw * scene.count * np.dtype(scene.dtype).itemsize


def window_validity(scene: Scene, src, data: np.ndarray, bands: list[int],
                    window: Window) -> np.ndarray:
    """H×W bool of ``data`` (the selected bands over ``window``): every band has data — not
    the nodata value, not masked, not NaN."""
    if scene.rule == "nodata":
        nodata = scene.nodata
        valid = (~np.isnan(data) if np.isnan(nodata) else data != nodata).all(0)
    elif scene.rule == "masks":
        valid = (src.read_masks(bands, window=window) > 0).all(0)
    else:
        valid = np.ones(data.shape[1:], bool)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(0)
    return valid


def overview_factor(src, band: int) -> int | None:
    """The finest overview of at most :data:`COARSE_CELLS` pixels, or None."""
    fits = [f for f in src.overviews(band)
            if math.ceil(src.height / f) * math.ceil(src.width / f) <= COARSE_CELLS]
    return min(fits) if fits else None


def _sample(src, scene: Scene, bands: list[int], full_res: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(values C×N, valid N, coarse validity map or None) of a cheap sample: an overview
    (:func:`overview_factor`; one small read covering the whole scene, and its validity as a
    map) unless ``full_res`` is asked or there is none, else a grid of 64² windows at full
    resolution (:func:`~densessl.data.geotiff.stats_windows`). Never a decimated read without
    overviews: GDAL would decode every block for it."""
    factor = None if full_res else overview_factor(src, bands[0])
    if factor is not None:
        shape = (len(bands), math.ceil(src.height / factor), math.ceil(src.width / factor))
        data = src.read(bands, out_shape=shape)
        ok = (src.read_masks(bands, out_shape=shape) > 0).all(0)
        if np.issubdtype(data.dtype, np.floating):
            ok &= np.isfinite(data).all(0)
        return data.reshape(len(bands), -1), ok.reshape(-1), ok
    values, valid = [], []
    for window in stats_windows(src.width, src.height, SAMPLE_SIDE):
        data = src.read(bands, window=window)
        values.append(data.reshape(len(bands), -1))
        valid.append(window_validity(scene, src, data, bands, window).reshape(-1))
    return np.concatenate(values, 1), np.concatenate(valid), None


def window_max(scenes: list[Scene], bands: list[int]):
    """``read_max`` for :func:`resolve_bit_depth` over ``scenes``: the largest valid value of
    the selected bands in a full-resolution window grid and, when present, an overview
    (never the whole scene), and the storage bits (8 for 8-bit types, else 16)."""
    by_path = {Path(s.path): s for s in scenes}

    def read_max(path: Path) -> tuple[float, int]:
        scene = by_path[Path(path)]
        with rasterio.open(path) as src:
            top = 0.0
            for full_res in (True, False)[:1 + (overview_factor(src, bands[0]) is not None)]:
                values, valid, _ = _sample(src, scene, bands, full_res)
                if valid.any():
                    top = max(top, float(values[:, valid].max()))
        return top, 8 if np.dtype(scene.dtype).itemsize == 1 else 16

    return read_max


def surely_too_empty(coarse: np.ndarray, scene: Scene, window: tuple[int, int, int, int],
                     max_nodata: float) -> bool:
    """Whether ``window`` (col, row, width, height, inside the scene) is sure to be more
    than ``max_nodata`` nodata by the scene's overview validity map ``coarse``: only the
    overview cells wholly inside the window count, and an averaged overview marks a cell
    invalid only when every pixel under it is (GDAL averages valid pixels only). Lets
    the redraws skip reading windows of a swath edge."""
    col, row, w, h = window
    ch, cw = coarse.shape
    sy, sx = scene.height / ch, scene.width / cw
    i0, i1 = math.ceil(row / sy), math.floor((row + h) / sy)
    j0, j1 = math.ceil(col / sx), math.floor((col + w) / sx)
    if i1 <= i0 or j1 <= j0:
        return False
    empty = float((~coarse[i0:i1, j0:j1]).sum()) * sy * sx
    return empty > max_nodata * w * h


@register_source("geotiff_tiles")
class GeoTiffTiles(Dataset):
    """Random ``image_size`` windows of large single-date GeoTIFF scenes (module doc)::

        {"image": C×S×S float32 in [0, 1], "valid": S×S bool,
         "meta": {"source": "geotiff_tiles", "file": path, "window": [col, row, S, S]}}

    ``window`` is in the scene's pixels; for a scene smaller than S it reaches outside the
    scene (negative offsets), where ``valid`` is False.

    Args:
        path: a folder of .tif/.tiff (searched recursively), a glob, or one file.
        bands: 1-based bands to read (default all); their number must equal ``channels``.
        items_per_epoch: ``len()``; default (None) as many windows as tile every scene once
            (Σ width·height / S²), at least :data:`MIN_ITEMS`. Item ``index`` is always the same
            window, so a larger value means more distinct windows over a run.
        max_nodata: a window whose nodata share (of its pixels inside the scene) is above this
            is redrawn, up to ``tries`` times, then a DataError (or skipped with ``skip_bad``).
        bit_depth: integer bands are divided by ``2**bit_depth - 1`` (8-bit by 255); ``auto``
            = the files' NBITS, else the depth of the largest value in a windowed sample of
            the scenes (resolved once, :attr:`bit_depth`). Float bands must lie in [0, 1].
        gdal_cache_mb: GDAL's block cache ceiling in each reading process, raised to twice
            the decoded tiles one window touches when that is more (None: GDAL's default,
            5 % of RAM per process).
        licence, attribution: carried into ``dataset_cards`` (metrics.json, checkpoints).
        provenance: ``data.manifest`` / ``data.provenance`` (set from the recipe): rows name
            scenes relative to the folder (a single file: its folder; a glob: its part
            before the first wildcard); a scene is used only if it passes.
    """

    def __init__(self, path: str, image_size: int = 256, channels: int = 3,
                 bands: list[int] | None = None, items_per_epoch: int | None = None,
                 max_nodata: float = 0.5, tries: int = 50, bit_depth: BitDepth = "auto",
                 gdal_cache_mb: int | None = 256, seed: int = 0, skip_bad: bool = False,
                 licence: str = "unknown (set data.options.licence)", attribution: str = "",
                 provenance: ProvenanceFilter | None = None) -> None:
        if path is None:
            raise DataError("data.path: geotiff_tiles needs a folder or file of GeoTIFF scenes")
        if not 0 <= max_nodata <= 1:
            raise DataError(f"data.options.max_nodata: expected a fraction in [0, 1], got "
                            f"{max_nodata}")
        if tries < 1:
            raise DataError(f"data.options.tries: expected >= 1, got {tries}")
        if items_per_epoch is not None and items_per_epoch < 1:
            raise DataError(f"data.options.items_per_epoch: expected >= 1, got "
                            f"{items_per_epoch}")
        if gdal_cache_mb is not None and gdal_cache_mb < 1:
            raise DataError(f"data.options.gdal_cache_mb: expected >= 1 or null, got "
                            f"{gdal_cache_mb}")
        if bands is not None and len(bands) != channels:
            raise DataError(f"data.channels is {channels} but data.options.bands selects "
                            f"{len(bands)} bands {list(bands)}; they must agree")
        self.skipped_samples: list[str] = []
        self.root = scenes_root(path)
        files = scene_files(path)
        if not files:
            raise DataError(f"data.path {str(path)!r}: no GeoTIFF (.tif, .tiff) found")
        scenes = []
        for file in files:
            try:
                scenes.append(read_scene(file, bands))
            except DataError as exc:
                report_bad(str(exc), skip_bad, self.skipped_samples)
        if not scenes:
            raise DataError(f"data.path {str(path)!r}: no readable GeoTIFF scene")
        if bands is None:
            counts = sorted({s.count for s in scenes})
            if len(counts) > 1:
                raise DataError(f"data.path {str(path)!r}: scenes have different band counts "
                                f"{counts}; choose the bands to read with data.options.bands")
            if counts[0] != channels:
                raise DataError(f"data.channels is {channels} but the scenes have "
                                f"{counts[0]} bands ({scenes[0].path}); set data.channels: "
                                f"{counts[0]} or choose bands with data.options.bands")
        self.bands = list(bands) if bands else list(range(1, scenes[0].count + 1))
        self.dataset_cards = [{"name": f"GeoTIFF scenes {Path(str(path)).name}",
                               "licence": licence, "source": str(path),
                               "attribution": attribution}]
        self.image_provenance = self.attribution = None
        if provenance is not None:  # before any pixel of a dropped scene is read
            keep, self.image_provenance, self.attribution = provenance.select(
                [(self._relative(s),) for s in scenes], repr(str(path)),
                cards=self.dataset_cards, item_name="scenes")
            scenes = [scenes[i] for i in keep]
        self.scenes, weights = self._sampled(scenes, skip_bad)
        self.bit_depth = self._resolve_depth(bit_depth)
        self._auto_depth = bit_depth == "auto"
        self._cum = np.cumsum(weights)
        self.image_size, self.seed, self.skip_bad = image_size, seed, skip_bad
        self.max_nodata, self.tries = max_nodata, tries
        # the ceiling, raised to twice what one window's tiles decode to (a smaller cache
        # decodes a pixel-interleaved tile again for each band: ~1.5x slower reads)
        need = 2 * max(window_block_bytes(s, image_size) for s in self.scenes)
        self.gdal_cache_bytes = None if gdal_cache_mb is None else \
            max(int(gdal_cache_mb) * 2**20, need)
        area = sum(s.width * s.height for s in self.scenes)
        self.items_per_epoch = items_per_epoch or max(MIN_ITEMS, math.ceil(area / image_size**2))
        small = [s for s in self.scenes if min(s.width, s.height) < image_size]
        if small:
            warnings.warn(f"{len(small)} GeoTIFF scene(s) smaller than data.image_size "
                          f"{image_size} (e.g. {small[0].path}: {small[0].width}×"
                          f"{small[0].height}): their windows are padded with invalid pixels",
                          UserWarning, stacklevel=2)
        self.handles = RasterHandles()
        self._cache_pid = None  # the process whose GDAL cache ceiling is set
        self.read_skips = ReadSkips(len(self))  # windows skipped in workers (shared memory)

    def _relative(self, scene: Scene) -> str:
        return scene.path.relative_to(self.root).as_posix()

    def _sampled(self, scenes: list[Scene], skip_bad: bool
                 ) -> tuple[list[Scene], list[float]]:
        """Scenes with valid data, and their sampling weights (area × sampled valid share). A
        scene whose sample holds no valid pixel is all nodata: a DataError naming it (or with
        ``skip_bad`` dropped); float bands outside [0, 1] are found here too."""
        kept, weights = [], []
        self._coarse: dict[Path, np.ndarray] = {}  # overview validity maps
        for scene in scenes:
            try:
                with rasterio.open(scene.path) as src:
                    values, valid, coarse = _sample(src, scene, self.bands, full_res=False)
            except rasterio.errors.RasterioError as exc:
                report_bad(f"{scene.path}: cannot read GeoTIFF pixels ({exc})", skip_bad,
                           self.skipped_samples)
                continue
            if not valid.any():
                report_bad(f"{scene.path}: no valid pixel in a sample of the scene (every "
                           "sampled pixel is nodata, masked or NaN in some selected band); "
                           "remove the scene or check its nodata value", skip_bad,
                           self.skipped_samples)
                continue
            if np.issubdtype(np.dtype(scene.dtype), np.floating):
                lo, hi = float(values[:, valid].min()), float(values[:, valid].max())
                if lo < 0 or hi > 1:
                    report_bad(_float_range_message(scene.path, lo, hi), skip_bad,
                               self.skipped_samples)
                    continue
            kept.append(scene)
            weights.append(scene.width * scene.height * float(valid.mean()))
            if coarse is not None:
                self._coarse[scene.path] = coarse
        if not kept:
            raise DataError(f"no usable GeoTIFF scene ({len(scenes)} found, "
                            f"{len(self.skipped_samples)} skipped: "
                            f"{self.skipped_samples[-1] if self.skipped_samples else ''})")
        return kept, weights

    def _resolve_depth(self, bit_depth) -> int | None:
        integer = [s.path for s in self.scenes if np.issubdtype(np.dtype(s.dtype), np.integer)]
        if bit_depth == "auto" and not integer:
            return None  # float scenes only: nothing to scale
        return resolve_bit_depth(bit_depth, integer, where="data.bit_depth",
                                 read_max=window_max(self.scenes, self.bands))

    def __len__(self) -> int:
        return self.items_per_epoch

    def provenance_files(self) -> list[str]:
        """Each scene, relative to the root (what a ``data.manifest`` row names)."""
        return [self._relative(s) for s in self.scenes]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        # a window above max_nodata after every try (or an unreadable one) is never trained
        # on: an error, or with skip_bad the next item, counted in metrics.json
        return self.read_skips.first_readable(index, self._item, self.skip_bad,
                                              "geotiff_tiles")

    def _handle(self, scene: Scene):
        if self._cache_pid != os.getpid() and self.gdal_cache_bytes is not None:
            # process-wide and honoured after GDAL started: set in each process that reads.
            # In bytes: rasterio hands an integer to GDALSetCacheMax64 (256 would be 256 B)
            set_gdal_config("GDAL_CACHEMAX", self.gdal_cache_bytes)
            self._cache_pid = os.getpid()
        return self.handles.get(scene, scene, aligned=True)

    def draw(self, index: int) -> tuple[Scene, Iterator[tuple[int, int]]]:
        """Item ``index``'s scene and its ``tries`` candidate window origins (col, row), in
        the order they are tried (drawn lazily): a pure function of ``(seed, index)``."""
        rng = np.random.default_rng([self.seed, index])
        k = int(np.searchsorted(self._cum, rng.random() * self._cum[-1], side="right"))
        scene = self.scenes[min(k, len(self.scenes) - 1)]
        s = self.image_size

        def offset(extent: int) -> int:  # a scene smaller than s: it sits inside the window
            return int(rng.integers(min(0, extent - s), max(0, extent - s) + 1))

        return scene, ((offset(scene.width), offset(scene.height)) for _ in range(self.tries))

    def _item(self, index: int) -> dict:
        scene, origins = self.draw(index)
        coarse = self._coarse.get(scene.path)
        best = None
        for col, row in origins:
            inside = self._inside(scene, col, row)
            if coarse is not None and surely_too_empty(coarse, scene, inside, self.max_nodata):
                continue  # would be redrawn anyway: not worth a read
            data, valid = self._read(scene, inside)
            share = 1.0 - float(valid.mean()) if valid.size else 1.0
            if best is None or share < best[0]:
                best = (share, col, row, data, valid, inside)
            if share <= self.max_nodata:
                break
        if best is None or best[0] > self.max_nodata:
            found = (f"the best of {self.tries} windows is {best[0]:.3f} nodata" if best else
                     f"all {self.tries} windows are mostly nodata by the scene's overview")
            raise DataError(f"{scene.path}: item {index}: {found}, above data.options."
                            f"max_nodata {self.max_nodata}; raise max_nodata or check the "
                            "scene's nodata value and coverage")
        _, col, row, data, valid, inside = best
        return self._output(scene, col, row, data, valid, inside)

    def _inside(self, scene: Scene, col: int, row: int) -> tuple[int, int, int, int]:
        """The part of window (col, row, S, S) inside the scene: (col, row, width, height)."""
        s = self.image_size
        c0, r0 = max(col, 0), max(row, 0)
        return c0, r0, min(col + s, scene.width) - c0, min(row + s, scene.height) - r0

    def _read(self, scene: Scene, inside: tuple[int, int, int, int]
              ) -> tuple[np.ndarray, np.ndarray]:
        """The selected bands (native type) and validity of ``inside`` (a windowed read)."""
        c0, r0, w, h = inside
        window = Window(c0, r0, w, h)
        try:
            handle = self._handle(scene)
            data = handle.read(self.bands, window=window)
            valid = window_validity(scene, handle, data, self.bands, window)
        except rasterio.errors.RasterioError as exc:  # a truncated or corrupt file
            raise DataError(f"{scene.path}: cannot read GeoTIFF window {inside} ({exc})"
                            ) from None
        return data, valid

    def _output(self, scene: Scene, col: int, row: int, data: np.ndarray, valid: np.ndarray,
                inside: tuple[int, int, int, int]) -> dict:
        s = self.image_size
        window = [col, row, s, s]
        if not valid.all():
            data[:, ~valid] = 0  # nodata values must not reach the scaling or the image
        if np.issubdtype(data.dtype, np.floating):
            if data.size and (data.min() < 0 or data.max() > 1):
                raise DataError(_float_range_message(scene.path, float(data.min()),
                                                     float(data.max()), window))
            pixels = data.astype(np.float32)
        else:
            try:
                pixels = scale_to_unit(data, self.bit_depth, f"{scene.path} window {window}")
            except DataError as exc:
                if not self._auto_depth:
                    raise
                raise DataError(f"{exc} (data.bit_depth: auto resolved {self.bit_depth} from "
                                "a sample of the scenes; set data.bit_depth to the data's "
                                "depth)") from None
        c0, r0, w, h = inside
        if (w, h) == (s, s):
            image, mask = pixels, valid
        else:  # a scene smaller than the window: pad with invalid zeros
            image = np.zeros((len(self.bands), s, s), np.float32)
            mask = np.zeros((s, s), bool)
            image[:, r0 - row:r0 - row + h, c0 - col:c0 - col + w] = pixels
            mask[r0 - row:r0 - row + h, c0 - col:c0 - col + w] = valid
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "valid": torch.from_numpy(np.ascontiguousarray(mask)),
                "meta": {"source": "geotiff_tiles", "file": str(scene.path),
                         "window": window}}


def _float_range_message(path: Path, lo: float, hi: float, window=None) -> str:
    where = f" window {window}" if window is not None else ""
    return (f"{path}{where}: float band values {lo:g}..{hi:g} are outside [0, 1]; "
            "geotiff_tiles reads float bands as they are: rescale the scene to [0, 1] (e.g. "
            "reflectance) or store integers and set data.bit_depth")


@register_inspector("geotiff_tiles")
def inspect_geotiff_tiles(root: Path) -> dict:
    """``densessl data inspect ROOT --format geotiff_tiles``: per scene its size, bands, types,
    CRS, nodata, declared NBITS, internal tiling, compression and overviews (headers only)."""
    base = scenes_root(root)
    scenes, problems = [], []
    for path in scene_files(root):
        try:
            with rasterio.open(path) as src:
                scenes.append({
                    "file": path.relative_to(base).as_posix(), "width": src.width,
                    "height": src.height, "bands": src.count,
                    "dtypes": sorted(set(src.dtypes)),
                    "crs": src.crs.to_string() if src.crs else None, "nodata": src.nodata,
                    "block": list(src.block_shapes[0]) if src.block_shapes else None,
                    "compression": src.compression.value if src.compression else None,
                    "overviews": src.overviews(1)})
        except rasterio.errors.RasterioError as exc:
            problems.append(f"{path}: cannot read GeoTIFF ({exc})")
            continue
        scenes[-1]["nbits"] = raster_declared_bits(path)

    def values(key):  # distinct values (None and NaN included once), in a stable order
        distinct = {str(s[key]): s[key] for s in scenes}
        return [distinct[k] for k in sorted(distinct)]

    return {"format": "geotiff_tiles", "root": str(root), "scenes": len(scenes),
            "pixels": sum(s["width"] * s["height"] for s in scenes),
            "band_count": sorted({s["bands"] for s in scenes}),
            "dtypes": sorted({d for s in scenes for d in s["dtypes"]}), "crs": values("crs"),
            "nodata": values("nodata"), "nbits": values("nbits"), "files": scenes,
            "problems": problems}
