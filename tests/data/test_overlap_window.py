"""overlap_window (rasterio's from_bounds + intersection) against a brute force over the earlier
raster's pixels: the window is the smallest one holding every pixel whose area the later
raster's footprint overlaps (touching an edge is no overlap)."""

import datetime as dt
from pathlib import Path

import pytest
from rasterio.crs import CRS

from densessl.data.geotiff import RasterInfo, overlap_window

CRS_WKT = CRS.from_epsg(32633).to_wkt()
X0, Y0, RES = 500000.0, 5000000.0, 10.0


def raster(transform, width, height):
    a, _, c, _, e, f = transform
    xs, ys = (c, c + a * width), (f, f + e * height)
    bounds = (min(xs), min(ys), max(xs), max(ys))
    return RasterInfo(Path("r.tif"), dt.date(2020, 1, 1), None, CRS_WKT, tuple(transform),
                      width, height, 1, bounds)


def brute_force(early, late):
    a, _, c, _, e, f = early.transform
    left, bottom, right, top = late.bounds
    cols, rows = [], []
    for row in range(early.height):
        y_lo, y_hi = sorted((f + e * row, f + e * (row + 1)))
        for col in range(early.width):
            x_lo, x_hi = c + a * col, c + a * (col + 1)
            if min(x_hi, right) > max(x_lo, left) and min(y_hi, top) > max(y_lo, bottom):
                cols.append(col)
                rows.append(row)
    if not cols:
        return None
    return min(cols), min(rows), max(cols) - min(cols) + 1, max(rows) - min(rows) + 1


NORTH_UP = (RES, 0.0, X0, 0.0, -RES, Y0)
SOUTH_UP = (RES, 0.0, X0, 0.0, RES, Y0 - 40 * RES)


@pytest.mark.parametrize("early_transform", [NORTH_UP, SOUTH_UP], ids=["north_up", "south_up"])
@pytest.mark.parametrize("shift", [(0, 0), (3, 5), (2.5, -1.25), (-7.3, 4.6), (-30, 0),
                                   (40, 0), (0, 40), (39.5, 39.5), (-12, -12)])
def test_overlap_window_matches_the_pixels_that_overlap(early_transform, shift):
    early = raster(early_transform, 40, 40)
    # a later raster with a finer grid, moved by ``shift`` pixels of the earlier one
    late = raster((RES / 2, 0.0, X0 + shift[0] * RES, 0.0, -RES / 2, Y0 - shift[1] * RES),
                  30, 24)
    assert overlap_window(early, late) == brute_force(early, late)
