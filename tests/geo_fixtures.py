"""GeoTIFF fixtures in the real on-disk format, written with rasterio, shared by the data,
pairs and workflow tests: a two-date series in two CRSs whose pixels carry their own ground
coordinates, and 12-bit multi-band scenes with mask rasters in another CRS."""

from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin, xy
from rasterio.warp import calculate_default_transform, transform

from densessl.data.geotiff_synth import write_raster

UTM, MERCATOR = CRS.from_epsg(32633), CRS.from_epsg(3857)
ORIGIN = (500000.0, 5000000.0)
RES = 10.0
PATTERN = r"(?P<place>[a-z]+)_(?P<date>\d{8})\.tif$"


def ground_coordinate_raster(crs, dst_transform, width, height):
    """2 bands: UTM easting / northing of each pixel centre (a 'colour' per ground point),
    relative to ORIGIN so that float32 rasters keep centimetre precision."""
    rows, cols = np.mgrid[0:height, 0:width]
    xs, ys = xy(dst_transform, rows.ravel(), cols.ravel())
    east, north = transform(crs, UTM, xs, ys)
    return np.stack([np.reshape(east, (height, width)) - ORIGIN[0],
                     np.reshape(north, (height, width)) - ORIGIN[1]]).astype(np.float64)


def write_series(root, size=96, place="farm", origin=ORIGIN):
    """Early date in UTM (uint... float64 coordinates, nodata stripe), later date in Web
    Mercator with a NaN region; returns the early transform."""
    root.mkdir(parents=True, exist_ok=True)
    early_transform = from_origin(*origin, RES, RES)
    early = ground_coordinate_raster(UTM, early_transform, size, size)
    early[:, :, :10] = -9999  # nodata stripe on the west edge
    write_raster(root / f"{place}_20200101.tif", early, UTM, early_transform, nodata=-9999)
    bounds = (origin[0], origin[1] - size * RES, origin[0] + size * RES, origin[1])
    late_transform, w, h = calculate_default_transform(UTM, MERCATOR, size, size, *bounds,
                                                       resolution=RES * 1.2)
    late = ground_coordinate_raster(MERCATOR, late_transform, w, h)
    late[:, late[1] > -20 * RES] = np.nan  # the northern strip has no data
    write_raster(root / f"{place}_20210101.tif", late.astype(np.float32), MERCATOR,
                 late_transform, nodata=float("nan"))
    return early_transform


def write_scenes(root: Path, seed: int = 0, n: int = 3, size: int = 160) -> None:
    """``scenes/s<i>.tif``: 4-band uint16 12-bit UTM scenes with a nodata (0) border, and
    ``masks/s<i>.tif``: class ids 0..2 in EPSG:4326 at another resolution and extent (a
    smaller box around the scene's middle), made from band 1 so the labels follow pixels."""
    from rasterio.warp import transform_bounds

    rng = np.random.default_rng(seed)
    (root / "scenes").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        tf = from_origin(500000 + 5000 * i, 5000000, 10, 10)
        field = rng.normal(size=(size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
        data = np.stack([2000 + 800 * field + rng.normal(0, 50, (size, size))
                         for _ in range(4)]).clip(1, 4095).astype(np.uint16)
        data[:, :6, :] = 0  # nodata border
        with rasterio.open(root / "scenes" / f"s{i}.tif", "w", driver="GTiff", width=size,
                           height=size, count=4, dtype="uint16", crs="EPSG:32633", transform=tf,
                           nodata=0, tiled=True, blockxsize=64, blockysize=64,
                           compress="deflate") as dst:
            dst.write(data)
        west, south, east, north = transform_bounds(
            "EPSG:32633", "EPSG:4326", *rasterio.transform.array_bounds(size, size, tf))
        mh = mw = size // 2
        mtf = from_origin(west, north, (east - west) / mw, (north - south) / mh)
        # class from the scene's own field, sampled at the mask cells' centres
        rows = np.clip(((np.arange(mh) + 0.5) * size / mh).astype(int), 0, size - 1)
        cols = np.clip(((np.arange(mw) + 0.5) * size / mw).astype(int), 0, size - 1)
        classes = np.digitize(field[np.ix_(rows, cols)], [-0.5, 0.5]).astype(np.uint8)
        with rasterio.open(root / "masks" / f"s{i}.tif", "w", driver="GTiff", width=mw,
                           height=mh, count=1, dtype="uint8", crs="EPSG:4326",
                           transform=mtf) as dst:
            dst.write(classes[None])
    (root / "classes.txt").write_text("low\nmid\nhigh\n")
