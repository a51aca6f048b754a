"""Synthetic multi-date GeoTIFF series (``densessl data synth geotiff``).

Per place, ``<out>/<place>_<YYYYMMDD>.tif`` for three dates: 4-band (blue, green, red, NIR)
uint16 reflectance ×10000 in UTM 33N with ``nodata = 0`` along a slanted swath edge, except the
middle date, which is float32 in Web Mercator (EPSG:3857) with NaN as nodata — reprojected from
the same ground scene, so aligning it back onto the first date's grid must restore the scene.
Between dates the season changes the spectra and a few new buildings appear.

``densessl data synth geotiff-series`` writes longer series (:data:`SERIES_DATES`, eight
dates a season apart over two years, same rasters otherwise) with both kinds of change a
temporal objective must tell apart:

* gradual / seasonal — the fields' spectra follow a yearly cycle (NIR peaks in summer, visible
  bands dip), and the terrain brightens slowly (+4 % a year);
* abrupt — between :data:`SERIES_CHANGE_AFTER` and the next date three buildings are built
  and one field is cleared to bare soil, and stay so.

So near-in-time dates differ by a season at most, and dates a year or more apart straddle the
abrupt change or not (``pairs.options.dates: near_far`` of the ``temporal`` builder).

``densessl data synth geotiff-series-masks`` writes that series under ``<out>/series/`` (what
pretraining reads: ``data.options.synthetic_series``) and its land-cover labels under
``<out>/labeled/`` in the layout of the ``geotiff_masks`` dataset: every date on the place's own
grid (all but the Web-Mercator one) as ``scenes/<place>_<date>.tif`` (the very file of the
series) with ``masks/<place>_<date>.tif``, uint8 class ids of :data:`LAND_COVER` drawn by the
renderer itself (255 outside the swath), same CRS and transform; ``classes.txt``; and
``splits/{train,test}.txt`` by place, so no place has scenes in both (finetune.dataset
``geotiff_series_masks`` reads it).
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
from collections.abc import Callable
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
#: dates of the long series: a season apart over two years
SERIES_DATES = ("20190301", "20190601", "20190901", "20191201",
                "20200301", "20200601", "20200901", "20201201")
#: index of the last date before the abrupt change (new buildings, a cleared field)
SERIES_CHANGE_AFTER = 3
#: reflectance of the cleared field (bare soil), per band
_BARE_SOIL = np.array([0.18, 0.22, 0.27, 0.30])
#: class ids of the land-cover masks: what :func:`render` draws at a pixel (terrain, one of
#: the four crop fields, the cleared field, a roof)
LAND_COVER = ("background", "field", "bare_soil", "building")
#: ``geotiff-series-masks``: the series (pretraining) and its labeled layout (geotiff_masks)
SERIES_FOLDER, LABELED_FOLDER = "series", "labeled"
#: class id of the mask outside the swath (the scene's nodata): ignored by geotiff_masks
MASK_NODATA = 255


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
    return render(rng, size, bands, _SEASON[date_index % 3, :bands], built=date_index >= 2)[0]


def seasonal_factor(date: dt.date, bands: int) -> np.ndarray:
    """Per-band multiplier of the fields' reflectance on ``date``: a yearly cycle, NIR up
    and the visible bands down in summer (day 172), amplitude 0.3 for NIR, 0.1 for the rest."""
    phase = math.cos(2 * math.pi * (date.timetuple().tm_yday - 172) / 365.25)
    amplitude = np.array([-0.1, 0.05, -0.1, 0.3])[:bands]
    if bands > 4:
        amplitude = np.concatenate([amplitude, np.full(bands - 4, 0.1)])
    return 1.0 + amplitude * phase


def series_scene(rng: np.random.Generator, size: int, bands: int, date_index: int,
                 dates: tuple[str, ...] = SERIES_DATES,
                 change_after: int = SERIES_CHANGE_AFTER) -> np.ndarray:
    """One date of a long series (module docstring): seasonal and slow terrain change on
    every date, the abrupt change from ``change_after + 1`` on."""
    return series_render(rng, size, bands, date_index, dates, change_after)[0]


def series_render(rng: np.random.Generator, size: int, bands: int, date_index: int,
                  dates: tuple[str, ...] = SERIES_DATES,
                  change_after: int = SERIES_CHANGE_AFTER) -> tuple[np.ndarray, np.ndarray]:
    """:func:`series_scene` and its H×W uint8 land-cover ids (:data:`LAND_COVER`)."""
    date = dt.datetime.strptime(dates[date_index], "%Y%m%d").date()
    years = (date - dt.datetime.strptime(dates[0], "%Y%m%d").date()).days / 365.25
    changed = date_index > change_after
    return render(rng, size, bands, seasonal_factor(date, bands), built=changed,
                  drift=1.0 + 0.04 * years, cleared=changed)


def render(rng: np.random.Generator, size: int, bands: int, season: np.ndarray, built: bool,
           drift: float = 1.0, cleared: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Terrain (times ``drift``), four fields (crop spectra times ``season``; the first bare
    soil when ``cleared``), seven buildings and three more when ``built``. The random draws do
    not depend on the date, so every date of a place shows the same ground.

    Returns the C×H×W reflectance in [0, 1] and the H×W uint8 class id of every pixel
    (:data:`LAND_COVER`), set where and as the reflectance is drawn."""
    terrain = drift * (0.08 + 0.25 * smooth_noise(rng, size, bands, cells=5))
    fields = rasterize_shapes(
        [(box(*sorted(rng.uniform(0, size, 2)), *sorted(rng.uniform(0, size, 2))), k + 1)
         for k in range(4)], size, size)
    buildings = []
    for k in range(10):
        x, y = rng.uniform(0.1, 0.85, 2) * size
        w = rng.uniform(4, 10)
        poly = rotate(box(x, y, x + w, y + 0.7 * w), float(rng.uniform(0, 90)))
        if k < 7 or built:  # three buildings are built between the dates
            buildings.append((poly, 1))
    roofs = rasterize_shapes(buildings, size, size) > 0
    crop = rng.uniform(0.05, 0.45, (4, bands))
    scene = terrain.copy()
    classes = np.zeros((size, size), np.uint8)
    for k in range(4):
        scene[:, fields == k + 1] = crop[k][:, None] * season[:, None]
        classes[fields == k + 1] = LAND_COVER.index("field")
    if cleared:
        soil = np.resize(_BARE_SOIL, bands)
        scene[:, fields == 1] = soil[:, None]
        classes[fields == 1] = LAND_COVER.index("bare_soil")
    scene[:, roofs] = np.linspace(0.35, 0.55, bands)[:, None]
    classes[roofs] = LAND_COVER.index("building")
    return np.clip(scene, 0.0, 1.0), classes


def _swath_edge(rng: np.random.Generator, size: int) -> np.ndarray:
    """H×W bool, True inside the sensor swath: one corner is cut off by a slanted edge."""
    yy, xx = np.mgrid[0:size, 0:size]
    cut = rng.uniform(0.1, 0.3) * size
    return (xx + yy * rng.uniform(0.3, 0.8)) > cut


def write_place(out: Path, place: str, origin: tuple[float, float], rng: np.random.Generator,
                size: int = 160, bands: int = 4, resolution: float = 10.0,
                other_crs_date: int | None = 1, dates: tuple[str, ...] = DATES,
                scene=_scene, labeled: Path | None = None,
                classes: Callable[..., np.ndarray] | None = None) -> list[Path]:
    """Write every date of one place; date ``other_crs_date`` goes to EPSG:3857.
    ``scene(rng, size, bands, date_index)`` renders one date (default: the three-date one).

    With ``labeled`` (a folder) and ``classes`` (same arguments: the class ids of what
    ``scene`` draws from the same generator), every date on the place's own grid is also
    copied to ``labeled/scenes/`` with its mask in ``labeled/masks/`` (uint8, same CRS and
    transform, :data:`MASK_NODATA` outside the swath)."""
    transform = from_origin(origin[0], origin[1], resolution, resolution)
    scene_seed = int(rng.integers(1 << 31))
    paths = []
    for t, date in enumerate(dates):
        # Same seed every date: the same terrain and buildings, only season/new builds change.
        scene_t = scene(np.random.default_rng(scene_seed), size, bands, t)
        swath = _swath_edge(rng, size)
        path = out / f"{place}_{date}.tif"
        if t == other_crs_date:
            data = np.where(swath, scene_t, np.nan).astype(np.float32) * 10000
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
            data = np.where(swath, np.round(scene_t * 9999) + 1, 0).astype(np.uint16)
            write_raster(path, data, UTM, transform, nodata=0)
            if labeled is not None and classes is not None:
                ids = classes(np.random.default_rng(scene_seed), size, bands, t)
                shutil.copyfile(path, labeled / "scenes" / path.name)
                mask = np.where(swath, ids, MASK_NODATA).astype(np.uint8)[None]
                write_raster(labeled / "masks" / path.name, mask, UTM, transform,
                             nodata=MASK_NODATA)
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
        write_place(out, place_name(k), origin, rng, size=size, bands=bands)
    return out


@register_synthesizer("geotiff-series")
def synthesize_geotiff_series(out: Path, n: int | None = None, seed: int = 0, size: int = 160,
                              bands: int = 4, dates: tuple[str, ...] = SERIES_DATES,
                              change_after: int = SERIES_CHANGE_AFTER,
                              labeled: Path | None = None) -> Path:
    """``n`` places (default 3) × ``len(dates)`` dates (default :data:`SERIES_DATES`) under
    ``out``, with seasonal, gradual and abrupt change (module docstring); the second date is
    in EPSG:3857 as in the three-date set. With ``labeled``, also the scenes and land-cover
    masks of every other date under ``labeled/scenes`` and ``labeled/masks``."""
    if len(dates) < 3 or not 0 <= change_after < len(dates) - 1:
        raise ValueError(f"a series needs >= 3 dates and 0 <= change_after < {len(dates) - 1}; "
                         f"got {len(dates)} dates, change_after {change_after}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if labeled is not None:
        for sub in ("scenes", "masks"):
            (Path(labeled) / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def scene(scene_rng, size_, bands_, t):
        return series_scene(scene_rng, size_, bands_, t, tuple(dates), change_after)

    def classes(scene_rng, size_, bands_, t):
        return series_render(scene_rng, size_, bands_, t, tuple(dates), change_after)[1]

    for k in range(n or 3):
        write_place(out, place_name(k), (500000.0 + 5000.0 * k, 5000000.0 - 3000.0 * k), rng,
                    size=size, bands=bands, dates=tuple(dates), scene=scene,
                    labeled=None if labeled is None else Path(labeled), classes=classes)
    return out


def place_name(k: int) -> str:
    """Name of the ``k``-th synthetic place: site-a, ..., site-z, site-a1, ..."""
    return f"site-{chr(ord('a') + k % 26)}{k // 26 or ''}"


def place_splits(n: int) -> dict[str, list[int]]:
    """Places of the labeled layout per split: a quarter (at least one) test, the rest train;
    no val (the probe selects nothing). The places are drawn alike, so by index."""
    if n < 2:
        raise ValueError(f"a labeled series needs >= 2 places (train and test), got {n}")
    n_test = max(1, round(n / 4))
    return {"train": list(range(n - n_test)), "test": list(range(n - n_test, n))}


@register_synthesizer("geotiff-series-masks")
def synthesize_geotiff_series_masks(out: Path, n: int | None = None, seed: int = 0,
                                    size: int = 160, bands: int = 4) -> Path:
    """``n`` places (default 4) of the ``geotiff-series`` series under ``out/series`` and its
    labeled layout under ``out/labeled`` (module docstring): train and test places disjoint
    (:func:`place_splits`), every date of a place in its place's split; a single place (a
    series to pretrain on) gets no split files."""
    out = Path(out)
    n = n or 4
    labeled = out / LABELED_FOLDER
    synthesize_geotiff_series(out / SERIES_FOLDER, n, seed, size, bands, labeled=labeled)
    (labeled / "classes.txt").write_text("\n".join(LAND_COVER) + "\n")
    if n < 2:
        return out
    (labeled / "splits").mkdir()
    stems = sorted(p.stem for p in (labeled / "scenes").glob("*.tif"))
    for name, places in place_splits(n).items():
        names = {place_name(k) for k in places}
        listed = [s for s in stems if s.rsplit("_", 1)[0] in names]
        (labeled / "splits" / f"{name}.txt").write_text("\n".join(listed) + "\n")
    return out
