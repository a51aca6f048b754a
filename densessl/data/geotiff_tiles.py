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

Block-local window groups (``windows_per_block`` k > 1) decode each internal tile once for k
windows: items come in groups of k consecutive indices, group g = index // k. The group draws
(from ``(seed, g)`` only, so every member agrees) a scene as above, then a region — the
internal block (tile) under a uniform anchor pixel, when blocks are at least ``image_size``
(an edge block narrower than the window is widened into its neighbour), else
⌈1.5·``image_size``⌉ around the anchor (per axis: a striped file's region spans the strip's
whole width) — and one probe window in it. A region whose probe is over ``max_nodata`` is
redrawn (up to ``tries`` regions, in the same scene); the probe of the kept region proves it
holds an acceptable window. Each member then draws its window uniformly inside the region
from ``(seed, index)``, redrawing inside the region up to ``tries`` times and else taking the
probe, so ``max_nodata`` holds per window and item i is still a function of ``(seed, i)``.
The region choice is remembered for the last few groups in each process (a cache of a pure
function: what a window is never depends on what was read before). The sampler keeps a group's
indices at consecutive positions (``sample_group``, :class:`~densessl.seeding.StreamSampler`),
so one worker reads them right after each other and GDAL's block cache serves all but the
first from the decoded tile.
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
    register_checker,
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
#: a window group's region side, in windows, where the internal blocks are smaller than one
GROUP_REGION = 1.5
#: default ``windows_per_block``. ``densessl bench --tiles-only`` (256² windows of a 10,980²
#: 13-band DEFLATE scene, 512² tiles, one worker, two runs): k = 1 21-22 pairs/s, 4 144-168,
#: 8 199-288, 16 230-366.
#: 4 is the smallest k past the 100 pairs/s a worker needs, with margin, and keeps 4 regions
#: in a batch of 16 (8 would leave 2; 16 one tile a batch)
WINDOWS_PER_BLOCK = 4
#: stream tag of the per-group draws: (seed, group) never repeats a per-item (seed, index)
GROUP_STREAM = 0x67727570
#: window groups whose region is remembered per process
GROUP_MEMORY = 64


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
            (Σ width·height / S²), at least :data:`MIN_ITEMS`, rounded up to a multiple of
            ``windows_per_block``. Item ``index`` is always the same window, so a larger value
            means more distinct windows over a run.
        max_nodata: a window whose nodata share (of its pixels inside the scene) is above this
            is redrawn, up to ``tries`` times, then a DataError (or skipped with ``skip_bad``).
        bit_depth: integer bands are divided by ``2**bit_depth - 1`` (8-bit by 255); ``auto``
            = the files' NBITS, else the depth of the largest value in a windowed sample of
            the scenes (resolved once, :attr:`bit_depth`). Float bands must lie in [0, 1].
        gdal_cache_mb: GDAL's block cache ceiling in each reading process, raised to twice
            the decoded tiles one window (with ``windows_per_block`` > 1: one group's
            region) touches when that is more (None: GDAL's default, 5 % of RAM per process).
        windows_per_block: k; items come in groups of k consecutive indices whose windows
            lie in one internal block of one scene (module doc), read one after another (the
            sampler keeps a group together), so a tile is decoded once for k windows instead
            of ~2.25 tiles per window. 1: every window independent; default
            :data:`WINDOWS_PER_BLOCK` (4: 144-168 pairs/s per worker where 1 gives 21-22,
            on the bench's 10,980² scene). Larger k is faster but
            less diverse: a batch of B holds only B / k regions, and windows of one 512²
            tile overlap heavily (two random 256² windows in it share ~44 % of their pixels
            on average), so in-batch negatives (``loss.dense.batch_negatives``) and the keys
            enqueued together come from the same ground; a batch of 16 with k = 16 is one
            tile. Keep ``train.batch_size`` and ``items_per_epoch`` multiples of k so groups
            are never split between batches (a split group decodes its tile twice). Pixels
            near tile edges are in fewer windows than tile centres, and objects across a
            tile edge are never whole in a window (where blocks are at least the window).
        licence, attribution: carried into ``dataset_cards`` (metrics.json, checkpoints).
        provenance: ``data.manifest`` / ``data.provenance`` (set from the recipe): rows name
            scenes relative to the folder (a single file: its folder; a glob: its part
            before the first wildcard); a scene is used only if it passes.
    """

    def __init__(self, path: str, image_size: int = 256, channels: int = 3,
                 bands: list[int] | None = None, items_per_epoch: int | None = None,
                 max_nodata: float = 0.5, tries: int = 50, bit_depth: BitDepth = "auto",
                 gdal_cache_mb: int | None = 256, windows_per_block: int = WINDOWS_PER_BLOCK,
                 seed: int = 0, skip_bad: bool = False,
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
        if isinstance(windows_per_block, bool) or not isinstance(windows_per_block, int) or \
                windows_per_block < 1:
            raise DataError(f"data.options.windows_per_block: expected an integer >= 1, got "
                            f"{windows_per_block!r}")
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
        #: consecutive indices sharing a region; the sampler keeps them together
        self.windows_per_block = self.sample_group = windows_per_block
        self._groups: dict[int, tuple] = {}  # group → its region choice (_group_region)
        # the ceiling, raised to twice what one window's (one group's region's) tiles decode
        # to (a smaller cache decodes a pixel-interleaved tile again for each band: ~1.5x
        # slower reads; and would evict a group's tile before its last window)
        need = 2 * max(window_block_bytes(s, self._read_side(s)) for s in self.scenes)
        self.gdal_cache_bytes = None if gdal_cache_mb is None else \
            max(int(gdal_cache_mb) * 2**20, need)
        area = sum(s.width * s.height for s in self.scenes)
        k = windows_per_block  # the default length: whole groups
        self.items_per_epoch = items_per_epoch or \
            k * math.ceil(max(MIN_ITEMS, math.ceil(area / image_size**2)) / k)
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

    def _pick_scene(self, rng: np.random.Generator) -> Scene:
        """A scene with probability proportional to its valid area (one draw of ``rng``)."""
        k = int(np.searchsorted(self._cum, rng.random() * self._cum[-1], side="right"))
        return self.scenes[min(k, len(self.scenes) - 1)]

    def draw(self, index: int) -> tuple[Scene, Iterator[tuple[int, int]]]:
        """Item ``index``'s scene and its candidate window origins (col, row), in the order
        they are tried (drawn lazily): a pure function of ``(seed, index)`` — with
        ``windows_per_block`` 1, ``tries`` origins over the scene; else ``tries`` origins
        inside the group's region, then the group's probe (:meth:`group_region`: may read
        probe windows to choose the region)."""
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        if self.windows_per_block == 1:
            scene = self._pick_scene(rng)

            def offset(extent: int) -> int:  # a scene smaller than s: it sits in the window
                return int(rng.integers(min(0, extent - s), max(0, extent - s) + 1))

            return scene, ((offset(scene.width), offset(scene.height))
                           for _ in range(self.tries))
        group = index // self.windows_per_block
        scene, region, probe, best = self.group_region(group)
        if region is None:
            found = (f"the best probe window of {self.tries} regions is {best:.3f} nodata"
                     if best is not None else
                     f"all {self.tries} regions are mostly nodata by the scene's overview")
            raise DataError(f"{scene.path}: item {index}: window group {group} (data.options."
                            f"windows_per_block {self.windows_per_block}): {found}, above "
                            f"data.options.max_nodata {self.max_nodata}; raise max_nodata or "
                            "check the scene's nodata value and coverage")
        (c0, c1), (r0, r1) = region

        def origins() -> Iterator[tuple[int, int]]:
            for _ in range(self.tries):
                yield int(rng.integers(c0, c1 + 1)), int(rng.integers(r0, r1 + 1))
            if probe is not None:  # proven acceptable: every member has a window
                yield probe

        return scene, origins()

    def _read_side(self, scene: Scene) -> int:
        """The side of the area whose tiles one read unit touches: a window, or (window
        groups with blocks smaller than a window) a group's region."""
        if self.windows_per_block > 1 and min(scene.block) < self.image_size:
            return math.ceil(GROUP_REGION * self.image_size)
        return self.image_size

    def _axis_region(self, anchor: int, extent: int, block: int) -> tuple[int, int]:
        """The range (first, last) of window origins along one axis for a group whose anchor
        pixel is ``anchor``: inside the anchor's internal block when a block is at least a
        window (an edge block narrower than one is widened into its neighbour), else inside
        ⌈1.5·window⌉ around the anchor; a scene not wider than a window sits inside it."""
        s = self.image_size
        if extent <= s:
            return extent - s, 0
        if block >= s:
            start = anchor // block * block
            end = min(start + block, extent)
            return min(start, end - s), end - s
        side = min(extent, math.ceil(GROUP_REGION * s))
        start = min(max(anchor - side // 2, 0), extent - side)
        return start, start + side - s

    def region_candidates(self, group: int
                          ) -> tuple[Scene, Iterator[tuple[tuple, tuple[int, int]]]]:
        """Window group ``group``'s scene and its ``tries`` candidate regions, each with its
        probe window origin: ``(((col first, col last), (row first, row last)), (col, row))``
        (ranges of window origins), drawn lazily from ``(seed, group)`` only."""
        rng = np.random.default_rng([self.seed, GROUP_STREAM, group])
        scene = self._pick_scene(rng)
        bh, bw = scene.block

        def candidates():
            for _ in range(self.tries):
                col, row = int(rng.integers(0, scene.width)), int(rng.integers(0, scene.height))
                (c0, c1), (r0, r1) = region = (self._axis_region(col, scene.width, bw),
                                               self._axis_region(row, scene.height, bh))
                yield region, (int(rng.integers(c0, c1 + 1)), int(rng.integers(r0, r1 + 1)))

        return scene, candidates()

    def group_region(self, group: int) -> tuple[Scene, tuple | None, tuple[int, int] | None,
                                                float | None]:
        """(scene, region, probe origin, best probe nodata share) of window group ``group``:
        the first candidate region (:meth:`region_candidates`) whose probe window is at most
        ``max_nodata`` nodata (probes the overview shows to be over it are not read; every
        window qualifies — integer bands without nodata or mask, or ``max_nodata`` 1 — the
        first region, probe None); region None if no probe qualifies. A function of
        ``(seed, group)`` and the scene's pixels, remembered for the last
        :data:`GROUP_MEMORY` groups of this process."""
        hit = self._groups.get(group)
        if hit is not None:
            return hit
        scene, candidates = self.region_candidates(group)
        coarse = self._coarse.get(scene.path)
        every = self.max_nodata >= 1 or (scene.rule == "all" and
                                         np.issubdtype(np.dtype(scene.dtype), np.integer))
        hit, best = None, None
        for region, probe in candidates:
            if every:
                hit = (scene, region, None, 0.0)
                break
            inside = self._inside(scene, *probe)
            if coarse is not None and surely_too_empty(coarse, scene, inside, self.max_nodata):
                continue
            _, valid = self._read(scene, inside)
            share = 1.0 - float(valid.mean()) if valid.size else 1.0
            best = share if best is None else min(best, share)
            if share <= self.max_nodata:
                hit = (scene, region, probe, share)
                break
        hit = hit or (scene, None, None, best)
        if len(self._groups) >= GROUP_MEMORY:
            self._groups.pop(next(iter(self._groups)))
        self._groups[group] = hit
        return hit

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


@register_checker("geotiff_tiles")
def check_geotiff_tiles(root: Path, options: dict) -> list[str]:
    """What ``data.source: geotiff_tiles`` refuses in ``root`` (``data inspect --check``),
    found by :class:`GeoTiffTiles` itself with ``skip_bad``: unreadable scenes, band counts and
    types, scenes with no valid pixel in its sample, values outside the bit depth. ``options``:
    those of :class:`GeoTiffTiles`; ``channels`` defaults to the first scene's band count (or
    the number of ``bands``)."""
    from densessl.data.bad_samples import loader_refusals

    defaults = {}
    if "channels" not in options:
        if options.get("bands"):
            defaults["channels"] = len(options["bands"])
        else:
            for path in scene_files(root):
                try:
                    with rasterio.open(path) as src:
                        defaults["channels"] = src.count
                    break
                except rasterio.errors.RasterioError:
                    continue  # named by the loader
    return loader_refusals(GeoTiffTiles, root, options, defaults)[0]
