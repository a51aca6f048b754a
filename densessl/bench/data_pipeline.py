"""Data-pipeline throughput at real image sizes (``densessl bench``, issue #15).

At the recipes' toy sizes every builder looks fast; at real sizes the host work per pair decides
how many DataLoader workers a GPU needs. Fixtures are written into a temporary folder in the
real on-disk formats (PIDray / SIXray from :mod:`densessl.data.xray_synth`, xBD from
:mod:`densessl.data.xbd_synth`, a tiled multi-date 13-band GeoTIFF), then for each:

* ``decode_ms_per_pair``: decoding the pair's two sources alone (two X-ray JPEGs, two xBD PNGs,
  two GeoTIFF windows through already-open files), the floor any builder pays;
* ``builder_ms_per_pair`` / ``pairs_per_s_per_worker``: the recipe's builder in this process with
  one thread (= one DataLoader worker), and its ratio to the decoding;
* for X-ray also the host-compositing reference builder (``device_composite: false``) and the
  deferred builder, each with its share of collation, and the device stage
  (:func:`~densessl.pairs.device_paste.composite_pastes`) on the trainer's device.

All figures of one call come from one run on one machine; the 1-minute load average is
recorded next to them (shared machines drift).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from densessl.bench.queues import synchronize
from densessl.recipe import packaged_recipe

# the recipes as shipped in the package (a wheel install has no repository recipes/ folder)
X_RAY = packaged_recipe("xray_segloc")
XBD = packaged_recipe("xbd_temporal")
GEOTIFF = packaged_recipe("geotiff_temporal")


def _per_call_ms(fn: Callable[[int], object], count: int, repeats: int = 3) -> float:
    """Median over ``repeats`` of the mean time of ``fn(i)`` for ``count`` indices (ms)."""
    fn(0)  # first call may open files or build caches
    rounds = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(r * count + i + 1)
        rounds.append((time.perf_counter() - start) / count)
    return 1000 * sorted(rounds)[len(rounds) // 2]


class _OneThread:
    """What a DataLoader worker gets: one intra-op thread."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _figures(decode_ms: float, builder_ms: float) -> dict:
    return {"decode_ms_per_pair": round(decode_ms, 2),
            "builder_ms_per_pair": round(builder_ms, 2),
            "pairs_per_s_per_worker": round(1000 / builder_ms, 1),
            "builder_over_decode": round(builder_ms / decode_ms, 2)}


def bench_xray(root: Path, size: int, device: torch.device, batch_size: int, samples: int,
               images: int = 8) -> dict:
    """X-ray cut-paste at ``size``-px sources: host reference, deferred builder, device stage."""
    from densessl.build import build_pair_builder
    from densessl.data.pidray import read_image
    from densessl.data.xray_synth import synthesize_xray
    from densessl.pairs import collate_pairs
    from densessl.pairs.device_paste import composite_pastes
    from densessl.recipe import load_recipe

    synthesize_xray(root, images, seed=0, size=size)
    jpegs = sorted((root / "sixray" / "JPEGImage").glob("*.jpg"))

    def decoding(keep_uint8: bool) -> Callable[[int], None]:
        """Decoding pair ``i``'s two JPEGs: to 8-bit arrays (the floor), or scaled to float32
        as every loader decoded before ``keep_uint8``."""
        def decode(i):
            read_image(jpegs[i % len(jpegs)], keep_uint8=keep_uint8)
            read_image(jpegs[(i + 1) % len(jpegs)], keep_uint8=keep_uint8)
        return decode

    # the builder's cost depends on the sources, not the views: views only as large as the
    # recipe validates for small sources
    view = min(load_recipe(X_RAY).augment.view_size, size // 8 * 8)

    def builder(device_composite: bool):
        recipe = load_recipe(X_RAY, overrides=[
            f"data.image_size={size}", f"augment.view_size={view}",
            f"pairs.options.pidray_root={root / 'pidray'}",
            f"pairs.options.sixray_root={root / 'sixray'}",
            f"pairs.options.cache_dir={root / 'cache'}",
            f"pairs.options.device_composite={str(device_composite).lower()}"])
        return build_pair_builder(recipe)

    host, deferred = builder(False), builder(True)
    with _OneThread():
        decode_ms = _per_call_ms(decoding(keep_uint8=True), samples)
        decode_float_ms = _per_call_ms(decoding(keep_uint8=False), samples)
        host_ms = _per_call_ms(lambda i: host[i % len(host)], samples)
        deferred_ms = _per_call_ms(lambda i: deferred[i % len(deferred)], samples)
        plans = [deferred[i % len(deferred)] for i in range(batch_size)]
        collate_ms = _per_call_ms(lambda i: collate_pairs(plans), 2) / batch_size
        done = [host[i % len(host)] for i in range(batch_size)]
        host_collate_ms = _per_call_ms(lambda i: collate_pairs(done), 2) / batch_size
    batch = collate_pairs(plans).to(device)

    def stage(i):
        out = composite_pastes(batch)
        synchronize(device)
        return out

    stage_ms = _per_call_ms(stage, 2)
    worker_ms = deferred_ms + collate_ms
    return {"source_px": size, "k": deferred.k, "batch_size": batch_size,
            "decode_ms_per_pair": round(decode_ms, 2),
            "decode_to_float_ms_per_pair": round(decode_float_ms, 2),
            "host_composite": {**_figures(decode_ms, host_ms + host_collate_ms),
                               "collate_ms_per_pair": round(host_collate_ms, 3)},
            "device_composite": {**_figures(decode_ms, worker_ms),
                                 "collate_ms_per_pair": round(collate_ms, 3)},
            "device_stage": {"device": str(device), "ms_per_batch": round(stage_ms, 2),
                             "pairs_per_s": round(1000 * batch_size / stage_ms, 1)}}


def bench_xbd(root: Path, size: int, samples: int, pairs: int = 4) -> dict:
    """xBD pre/post tiles (the temporal recipe's builder) from ``size``-px PNGs."""
    from densessl.build import build_pair_builder
    from densessl.data.xbd import read_rgb
    from densessl.data.xbd_synth import synthesize_xbd
    from densessl.recipe import load_recipe

    synthesize_xbd(root, pairs, seed=0, size=size)
    pngs = sorted(root.rglob("*_pre_disaster.png"))

    def decode(i):
        pre = pngs[i % len(pngs)]
        read_rgb(pre)
        read_rgb(pre.with_name(pre.name.replace("_pre_", "_post_")))

    recipe = load_recipe(XBD, overrides=[f"data.path={root}"])
    builder = build_pair_builder(recipe)
    with _OneThread():
        decode_ms = _per_call_ms(decode, samples)
        builder_ms = _per_call_ms(lambda i: builder[i % len(builder)], samples)
    return {"source_px": size, "tile_px": recipe.data.image_size,
            **_figures(decode_ms, builder_ms)}


def write_geotiff_series(root: Path, size: int, bands: int = 13, dates: int = 2,
                         seed: int = 0) -> list[Path]:
    """``dates`` tiled uint16 GeoTIFFs of one place (Sentinel-2 L1C-like: 13 bands, 10 m, UTM);
    every later date sits on a grid shifted by a fraction of a pixel, so it is warped onto the
    first (``WarpedVRT``). Written band by band from a coarse field (cheap at 4096²)."""
    import cv2
    import rasterio
    from rasterio.transform import from_origin

    from densessl.data.geotiff_synth import UTM

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse = max(2, size // 64)
    paths = []
    for t in range(dates):
        shift = (13.5 * t, 7.25 * t)  # pixels: not aligned, so the reader must warp
        transform = from_origin(500000.0 + 10.0 * shift[0], 4600000.0 - 10.0 * shift[1], 10, 10)
        path = root / f"tile_2021{t + 1:02d}01.tif"
        profile = {"driver": "GTiff", "count": bands, "height": size, "width": size,
                   "dtype": "uint16", "crs": UTM, "transform": transform, "nodata": 0,
                   "tiled": True, "blockxsize": 256, "blockysize": 256}
        with rasterio.open(path, "w", **profile) as dst:
            for band in range(1, bands + 1):
                field = rng.uniform(500, 4000, (coarse, coarse)).astype(np.float32)
                values = cv2.resize(field, (size, size), interpolation=cv2.INTER_CUBIC)
                dst.write(np.clip(values, 1, 65535).astype(np.uint16), band)
        paths.append(path)
    return paths


def bench_geotiff(root: Path, size: int, window: int, samples: int, bands: int = 13) -> dict:
    """``window``-px tiles of a multi-date ``bands``-band GeoTIFF of ``size``² (the geotiff
    recipe's builder), against reading the two windows alone through open files."""
    import rasterio
    from rasterio.windows import Window

    from densessl.build import build_pair_builder
    from densessl.recipe import load_recipe

    paths = write_geotiff_series(root / "series", size, bands)
    pattern = r"(?P<place>tile)_(?P<date>\d{8})\.tif$"
    recipe = load_recipe(GEOTIFF, overrides=[
        f"data.path={root / 'series'}", f"data.channels={bands}", f"data.image_size={window}",
        f"data.options.pattern={pattern}", f"data.options.cache_dir={root / 'cache'}"])
    start = time.perf_counter()
    builder = build_pair_builder(recipe)  # indexes the files and computes band statistics
    setup_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    with rasterio.open(paths[0]) as a, rasterio.open(paths[1]) as b:
        def decode(i):
            col, row = (int(v) for v in rng.integers(0, size - window, 2))
            for src in (a, b):
                src.read(window=Window(col, row, window, window))

        with _OneThread():
            decode_ms = _per_call_ms(decode, samples)
    with _OneThread():
        builder_ms = _per_call_ms(lambda i: builder[i % len(builder)], samples)
    return {"raster_px": size, "bands": bands, "window_px": window, "dates": len(paths),
            "warped": True, "setup_s": round(setup_s, 2), **_figures(decode_ms, builder_ms)}


def bench_real_sizes(device: torch.device, batch_size: int = 32, xray_px: int = 512,
                     xbd_px: int = 1024, geotiff_px: int = 4096, window_px: int = 256,
                     samples: int = 16, log: Callable[[str], None] = print) -> dict:
    """Every figure above in one run; each part that fails is reported, not raised."""
    results: dict = {"load_1min_before": round(os.getloadavg()[0], 2)}
    parts = {
        "xray": lambda root: bench_xray(root, xray_px, device, batch_size, samples),
        "xbd": lambda root: bench_xbd(root, xbd_px, samples),
        "geotiff": lambda root: bench_geotiff(root, geotiff_px, window_px, samples),
    }
    for name, run in parts.items():
        with tempfile.TemporaryDirectory(prefix=f"densessl-bench-{name}-") as tmp:
            try:
                results[name] = run(Path(tmp))
            except Exception as exc:  # one broken part must not hide the other figures
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"real sizes, {name}: {results[name]}")
    results["load_1min_after"] = round(os.getloadavg()[0], 2)
    return results
