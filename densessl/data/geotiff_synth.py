"""Synthetic multi-date GeoTIFF series (``densessl data synth geotiff``).

Per place, ``<out>/<place>_<YYYYMMDD>.tif`` for three dates: 4-band (blue, green, red, NIR)
uint16 reflectance ×10000 in UTM 33N with ``nodata = 0`` along a slanted swath edge, except the
middle date, which is float32 in Web Mercator (EPSG:3857) with NaN as nodata — reprojected from
the same ground scene, so aligning it back onto the first date's grid must restore the scene.
Between dates the season changes the spectra and a few new buildings appear.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject
from shapely.affinity import rotate
from shapely.geometry import box

from densessl.data.rasterize import rasterize_shapes
from densessl.data.registry import register_synthesizer
from densessl.data.synthetic import smooth_noise

UTM = CRS.from_epsg(32633)
MERCATOR = CRS.from_epsg(3857)
DATES = ("20210601", "20210901", "20220301")
_SEASON = np.array([[1.0, 1.0, 1.0, 1.0], [0.9, 1.05, 0.95, 1.25], [1.1, 0.95, 1.1, 0.7]])


def write_raster(path: Path, array: np.ndarray, crs: CRS | None, transform,
                 nodata: float | None) -> Path:
    """Write a C×H×W array as a plain (striped) GeoTIFF (what most providers ship)."""
    profile = {"driver": "GTiff", "count": array.shape[0], "height": array.shape[1],
               "width": array.shape[2], "dtype": array.dtype.name, "transform": transform,
               "nodata": nodata}
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
    return path


def _scene(rng: np.random.Generator, size: int, bands: int, date_index: int) -> np.ndarray:
    """C×H×W float reflectance in [0, 1] of one place at one date (terrain + buildings)."""
    terrain = 0.08 + 0.25 * smooth_noise(rng, size, bands, cells=5)
    fields = rasterize_shapes(
        [(box(*sorted(rng.uniform(0, size, 2)), *sorted(rng.uniform(0, size, 2))), k + 1)
         for k in range(4)], size, size)
    buildings = []
    for k in range(10):
        x, y = rng.uniform(0.1, 0.85, 2) * size
        w = rng.uniform(4, 10)
        poly = rotate(box(x, y, x + w, y + 0.7 * w), float(rng.uniform(0, 90)))
        if k < 7 or date_index >= 2:  # three buildings are built between the dates
            buildings.append((poly, 1))
    roofs = rasterize_shapes(buildings, size, size) > 0
    crop = rng.uniform(0.05, 0.45, (4, bands))
    scene = terrain.copy()
    for k in range(4):
        scene[:, fields == k + 1] = crop[k][:, None] * _SEASON[date_index % 3, :bands, None]
    scene[:, roofs] = np.linspace(0.35, 0.55, bands)[:, None]
    return np.clip(scene, 0.0, 1.0)


def _swath_edge(rng: np.random.Generator, size: int) -> np.ndarray:
    """H×W bool, True inside the sensor swath: one corner is cut off by a slanted edge."""
    yy, xx = np.mgrid[0:size, 0:size]
    cut = rng.uniform(0.1, 0.3) * size
    return (xx + yy * rng.uniform(0.3, 0.8)) > cut


def write_place(out: Path, place: str, origin: tuple[float, float], rng: np.random.Generator,
                size: int = 160, bands: int = 4, resolution: float = 10.0,
                other_crs_date: int = 1) -> list[Path]:
    """Write the three dates of one place; date ``other_crs_date`` goes to EPSG:3857."""
    transform = from_origin(origin[0], origin[1], resolution, resolution)
    scene_seed = int(rng.integers(1 << 31))
    paths = []
    for t, date in enumerate(DATES):
        # Same seed every date: the same terrain and buildings, only season/new builds change.
        scene = _scene(np.random.default_rng(scene_seed), size, bands, t)
        swath = _swath_edge(rng, size)
        path = out / f"{place}_{date}.tif"
        if t == other_crs_date:
            data = np.where(swath, scene, np.nan).astype(np.float32) * 10000
            # ~1.4 Mercator metres per ground metre at 45°N: similar ground sampling distance.
            dst_transform, w, h = calculate_default_transform(
                UTM, MERCATOR, size, size, *_bounds(transform, size),
                resolution=resolution * 1.3)
            warped = np.full((bands, h, w), np.nan, dtype=np.float32)
            reproject(data, warped, src_transform=transform, src_crs=UTM, src_nodata=np.nan,
                      dst_transform=dst_transform, dst_crs=MERCATOR, dst_nodata=np.nan,
                      resampling=Resampling.bilinear)
            write_raster(path, warped, MERCATOR, dst_transform, nodata=float("nan"))
        else:
            data = np.where(swath, np.round(scene * 9999) + 1, 0).astype(np.uint16)
            write_raster(path, data, UTM, transform, nodata=0)
        paths.append(path)
    return paths


def _bounds(transform, size: int) -> tuple[float, float, float, float]:
    left, top = transform.c, transform.f
    return left, top + transform.e * size, left + transform.a * size, top


@register_synthesizer("geotiff")
def synthesize_geotiff(out: Path, n: int | None = None, seed: int = 0, size: int = 160,
                       bands: int = 4) -> Path:
    """``n`` places (default 3) × 3 dates under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n or 3):
        origin = (500000.0 + 5000.0 * k, 5000000.0 - 3000.0 * k)
        write_place(out, f"site-{chr(ord('a') + k % 26)}{k // 26 or ''}", origin, rng,
                    size=size, bands=bands)
    return out
