"""``geotiff_tiles`` on a whole Sentinel-2-sized scene: pairs/s per worker and memory.

A 10,980² 13-band uint16 scene is synthesized once into the cache (``bench/`` under
:func:`~densessl.data.cache.default_cache_dir`), laid out as Sentinel-2 L2A cloud-optimised
GeoTIFFs are: internal 512² tiles, DEFLATE with horizontal predictor, internal overviews
(the IFD order is GTiff's, not a strict COG's: no matter for local windowed reads). It is
written tile by tile, so writing never holds the 3 GB array, from a block-evaluable field —
parcels with per-class spectra, a large-scale gradient, bright clouds up to 14 bits, sensor
noise, a nodata swath edge — so DEFLATE sees data about as compressible as real imagery.

Each size and each ``windows_per_block`` k (1, 4, 8, 16) is measured in a fresh process
(``spawn``): the ``same_image`` builder over the source, one thread (one DataLoader worker),
items in the order the training sampler gives them (:class:`~densessl.seeding.StreamSampler`
with the source's ``sample_group``: a group's k windows one after another, groups in seeded
random order), ``pairs_per_s_per_worker`` (median of 3 rounds), against the floor of reading
the same kind of windows (each item's first candidate, in the same order) alone through an
open file (``decode_ms_per_pair``, in the same rounds), and the peak RSS growth over the
process's size after setup (the kernel's peak count, ``VmHWM``, restarted after setup). A
small scene (2,745², a sixteenth of the pixels) run the same way shows whether memory follows
the scene size; one run on the large scene with GDAL's default block cache (5 % of RAM) shows
the growth the source's ``gdal_cache_mb`` ceiling prevents. Each scene's top-level figures
are those at the source's default ``windows_per_block``; ``by_windows_per_block`` holds every
k.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from densessl.data.cache import default_cache_dir

#: the target a DataLoader worker should reach at 256-px windows (issue brief)
TARGET_PAIRS_PER_S = 100
#: per-class reflectance-like DN (12-14 bits) of 13 Sentinel-2 bands, B1..B12 incl. B8A:
#: water, bare soil, crop, forest, urban
SPECTRA = np.array([
    [1300, 1150, 1000, 800, 700, 650, 600, 550, 500, 300, 250, 200, 150],
    [1400, 1500, 1800, 2300, 2600, 2800, 3000, 3100, 3200, 900, 400, 3900, 3500],
    [1250, 1100, 1300, 1000, 1700, 3500, 4200, 4500, 4700, 1300, 300, 2500, 1500],
    [1200, 1000, 1100, 850, 1300, 2600, 3200, 3400, 3500, 1100, 250, 1800, 1000],
    [1800, 2000, 2300, 2500, 2700, 2900, 3000, 3100, 3100, 1200, 500, 3300, 3000],
], dtype=np.float32)


def _hash(i: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """A per-cell pseudo-random integer in [0, 2**16): block-evaluable, no state."""
    h = (i * 73856093) ^ (j * 19349663) ^ (salt * 83492791)
    return (h ^ (h >> 13)) & 0xFFFF


def scene_block(row: int, col: int, height: int, width: int, size: int, bands: int,
                seed: int) -> np.ndarray:
    """bands×height×width uint16 of the synthetic scene at (row, col): the same pixels
    whichever block order writes them (only the noise depends on the block)."""
    yy, xx = np.mgrid[row:row + height, col:col + width].astype(np.float32)
    # parcels: a domain-warped grid of ~1.2 km fields, each one land-cover class
    wx = xx + 30 * np.sin(yy / 170.0 + seed)
    wy = yy + 30 * np.sin(xx / 230.0 + 2 * seed)
    ci, cj = np.floor(wx / 121).astype(np.int64), np.floor(wy / 97).astype(np.int64)
    cell = _hash(ci, cj, seed)
    cls = cell % len(SPECTRA)
    gain = 0.85 + 0.3 * ((cell >> 4) % 64) / 63.0  # per-field brightness
    # large-scale gradient (haze, terrain) and smooth within-field texture
    light = 1 + 0.12 * np.sin(xx / 1900.0 + seed) * np.cos(yy / 2600.0)
    texture = 1 + 0.04 * np.sin(xx / 7.0 + cell) * np.sin(yy / 5.0 - cell)
    # clouds: bright smooth blobs, up to ~12,000 DN (14 bits)
    blob = np.sin(xx / 700.0 + 1.3 * seed) * np.sin(yy / 900.0) + \
        0.5 * np.sin(xx / 230.0) * np.cos(yy / 310.0 + seed)
    cloud = np.clip((blob - 0.9) * 4, 0, 1)
    rng = np.random.default_rng([seed, row, col])
    spectra = SPECTRA[:, np.arange(bands) % SPECTRA.shape[1]]
    out = np.empty((bands, height, width), np.uint16)
    for b in range(bands):
        value = spectra[cls, b] * gain * light * texture
        value = value * (1 - cloud) + 11000 * cloud
        value += rng.normal(0, 12, (height, width)).astype(np.float32)
        out[b] = np.clip(value, 1, 16383)
    # a swath edge: the scene's south-west corner is nodata (0), as on orbit edges
    out[:, (xx + 1.2 * (size - yy)) < 0.6 * size] = 0  # 15 % of the scene
    return out


def synthesize_scene(path: Path, size: int, bands: int = 13, tile: int = 512,
                     seed: int = 0) -> Path:
    """Write the synthetic ``size``² scene to ``path`` tile by tile (see the module doc)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {"driver": "GTiff", "width": size, "height": size, "count": bands,
               "dtype": "uint16", "crs": "EPSG:32633", "nodata": 0,
               "transform": from_origin(300000.0, 5000040.0, 10.0, 10.0),
               "tiled": True, "blockxsize": tile, "blockysize": tile, "compress": "deflate",
               "predictor": 2, "interleave": "pixel", "bigtiff": "if_safer",
               "num_threads": "all_cpus"}
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, tile):
            for col in range(0, size, tile):
                h, w = min(tile, size - row), min(tile, size - col)
                dst.write(scene_block(row, col, h, w, size, bands, seed),
                          window=Window(col, row, w, h))
    factors = [2 ** k for k in range(1, 8) if size // 2 ** k >= 256]
    if factors:
        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS", COMPRESS_OVERVIEW="DEFLATE",
                          PREDICTOR_OVERVIEW="2"), rasterio.open(path, "r+") as dst:
            dst.build_overviews(factors, Resampling.average)
    return path


def cached_scene(size: int, bands: int = 13, tile: int = 512, cache_dir: str | Path | None = None
                 ) -> tuple[Path, float | None]:
    """The synthetic scene's path and the seconds it took to write (None: already cached).
    Written into a private temporary file renamed into place (parallel runs never see half a
    scene)."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = base / "bench" / f"s2like-{size}px-{bands}b-tile{tile}-v1.tif"
    if final.is_file():
        return final, None
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tif", dir=final.parent)
    os.close(fd)
    start = time.perf_counter()
    try:
        synthesize_scene(Path(tmp), size, bands, tile)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return final, time.perf_counter() - start


def _status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from /proc (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (``VmHWM``) at the current size; False where that
    is not possible. ``getrusage``'s ``ru_maxrss`` cannot be reset, and survives ``exec``: a
    spawned child starts with its parent's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb(reset: bool) -> float:
    if reset:
        return _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure(path: str, window: int, samples: int, gdal_cache_mb: int | None,
            rounds: int = 3, windows_per_block: int = 1) -> dict:
    """One process's figures for one scene and ``windows_per_block``: setup; then ``rounds``
    rounds, each timing the ``same_image`` builder (one thread) over its share of ``samples``
    items (whole window groups) at consecutive sampler positions, and the floor — the first
    candidate windows of as many other items, in sampler order, read alone through an open
    file — reporting the median round (shared machines drift); and the peak RSS above the
    size after setup. Run it in a fresh process: the peak is the process's own."""
    import rasterio
    import torch
    from rasterio.windows import Window

    from densessl.data.geotiff_tiles import GeoTiffTiles
    from densessl.pairs.same_image import SameImagePairs
    from densessl.seeding import StreamSampler

    torch.set_num_threads(1)
    with rasterio.open(path) as src:
        bands = src.count
    k = windows_per_block
    per_round = k * max(1, round(samples / rounds / k))  # whole groups
    n = k + 2 * rounds * per_round  # the warm-up group, then builder and floor items
    start = time.perf_counter()
    source = GeoTiffTiles(path, image_size=window, channels=bands, gdal_cache_mb=gdal_cache_mb,
                          items_per_epoch=n, windows_per_block=k)
    builder = SameImagePairs(source)
    sampler = StreamSampler(n, k, seed=0, group=source.sample_group)
    builder.build(sampler.index_at(0))  # opens the file
    setup_s = time.perf_counter() - start
    reset = _reset_peak_rss()
    rss_setup = _status_mb("VmRSS") if reset else _peak_mb(False)
    builder_ms, decode_ms = [], []
    with rasterio.open(path) as src:
        for r in range(rounds):
            first = k + r * per_round  # a group's first position
            items = [sampler.index_at(p) for p in range(first, first + per_round)]
            start = time.perf_counter()
            for i in items:
                builder.build(i)
            builder_ms.append(1000 * (time.perf_counter() - start) / per_round)
            first += rounds * per_round
            others = [sampler.index_at(p) for p in range(first, first + per_round)]
            origins = [next(source.draw(i)[1]) for i in others]  # may read probes: untimed
            start = time.perf_counter()
            for col, row in origins:
                src.read(window=Window(col, row, window, window))
            decode_ms.append(1000 * (time.perf_counter() - start) / per_round)
    rss_peak = _peak_mb(reset)
    builder_med, decode_med = sorted(builder_ms)[rounds // 2], sorted(decode_ms)[rounds // 2]
    return {"windows_per_block": k, "pairs_timed": rounds * per_round,
            "setup_s": round(setup_s, 2), "bit_depth": source.bit_depth,
            "decode_ms_per_pair": round(decode_med, 2),
            "builder_ms_per_pair": round(builder_med, 2),
            "builder_ms_rounds": [round(x, 1) for x in builder_ms],
            "pairs_per_s_per_worker": round(1000 / builder_med, 1),
            "builder_over_decode": round(builder_med / decode_med, 2),
            "rss_after_setup_mb": round(rss_setup, 1), "peak_rss_mb": round(rss_peak, 1),
            "rss_growth_mb": round(rss_peak - rss_setup, 1)}


def _measure_isolated(isolate: bool, *args) -> dict:
    if not isolate:
        return measure(*args)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def bench_geotiff_tiles(sizes: tuple[int, ...] = (10980, 2745), window: int = 256,
                        samples: int = 240, bands: int = 13, tile: int = 512,
                        gdal_cache_mb: int = 256, uncapped: bool = True,
                        windows_per_block: tuple[int, ...] = (1, 4, 8, 16),
                        cache_dir: str | Path | None = None, isolate: bool = True,
                        log: Callable[[str], None] = print) -> dict:
    """The figures of the module doc, for each of ``sizes`` (the first is "the large scene")
    and each ``windows_per_block`` (plus the source's default), each in a fresh process
    unless ``isolate`` is False (tests: RSS then includes what the calling process already
    holds). ``table`` sums them up: k → scene → pairs/s per worker and RSS growth (MiB)."""
    from densessl.data.geotiff_tiles import WINDOWS_PER_BLOCK

    ks = sorted({*windows_per_block, WINDOWS_PER_BLOCK})
    results: dict = {"window_px": window, "bands": bands, "tile_px": tile,
                     "compression": "deflate, predictor 2", "gdal_cache_mb": gdal_cache_mb,
                     "samples": samples, "threads": 1, "target_pairs_per_s": TARGET_PAIRS_PER_S,
                     "default_windows_per_block": WINDOWS_PER_BLOCK,
                     "load_1min_before": round(os.getloadavg()[0], 2), "scenes": {},
                     "table": {}}
    for size in sizes:
        path, synth_s = cached_scene(size, bands, tile, cache_dir)
        by_k = {}
        for k in ks:
            by_k[str(k)] = figures = _measure_isolated(isolate, str(path), window, samples,
                                                       gdal_cache_mb, 3, k)
            log(f"geotiff_tiles {size}², windows_per_block {k}: {figures}")
            results["table"].setdefault(f"k={k}", {})[f"{size}px"] = {
                "pairs_per_s": figures["pairs_per_s_per_worker"],
                "rss_growth_mb": figures["rss_growth_mb"]}
        entry = {"scene_px": size, "file_mb": round(path.stat().st_size / 2**20, 1),
                 "raw_mb": round(size * size * bands * 2 / 2**20, 1),
                 "synthesize_s": None if synth_s is None else round(synth_s, 2),
                 **by_k[str(WINDOWS_PER_BLOCK)], "by_windows_per_block": by_k}
        results["scenes"][f"{size}px"] = entry
    if uncapped and isolate:
        path, _ = cached_scene(sizes[0], bands, tile, cache_dir)
        entry = _measure_isolated(isolate, str(path), window, samples, None, 3,
                                  WINDOWS_PER_BLOCK)
        results["gdal_default_cache"] = {"scene_px": sizes[0], **entry}
        log(f"geotiff_tiles {sizes[0]}² with GDAL's default cache: {entry}")
    large = results["scenes"][f"{sizes[0]}px"]
    results["meets_target"] = large["pairs_per_s_per_worker"] >= TARGET_PAIRS_PER_S
    if len(sizes) > 1:
        small = results["scenes"][f"{sizes[-1]}px"]
        results["rss_growth_ratio_large_over_small"] = round(
            large["rss_growth_mb"] / max(small["rss_growth_mb"], 1.0), 2)
        results["rss_growth_ratio_by_windows_per_block"] = {
            k: round(large["by_windows_per_block"][k]["rss_growth_mb"]
                     / max(small["by_windows_per_block"][k]["rss_growth_mb"], 1.0), 2)
            for k in large["by_windows_per_block"]}
        results["pixels_ratio_large_over_small"] = round((sizes[0] / sizes[-1]) ** 2, 1)
    results["load_1min_after"] = round(os.getloadavg()[0], 2)
    return results
