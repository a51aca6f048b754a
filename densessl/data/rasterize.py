"""Polygons in pixel coordinates → label rasters (shapely geometry + rasterio's burner).

Convention: pixel ``(col, row)`` covers the square ``[col, col + 1] × [row, row + 1]`` of the
polygon coordinate space (xBD ``xy`` coordinates, rasterio's identity transform) and is burned
when its centre ``(col + 0.5, row + 0.5)`` lies inside the polygon.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import shapely
from affine import Affine
from rasterio import features
from shapely.geometry.base import BaseGeometry


def parse_wkt(text: str) -> BaseGeometry:
    """A shapely geometry from WKT; raises ``ValueError`` with the reason when it is invalid.

    Self-intersecting rings are repaired with ``make_valid`` (they occur in real labels); text
    that is not WKT at all, or an empty geometry, is an error.
    """
    try:
        geom = shapely.from_wkt(text)
    except Exception as exc:  # shapely raises GEOSException subclasses
        raise ValueError(f"invalid WKT {text[:60]!r}: {exc}") from None
    if geom is None or geom.is_empty:
        raise ValueError(f"empty geometry in WKT {text[:60]!r}")
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    return geom


def rasterize_shapes(shapes: Iterable[tuple[BaseGeometry, int]], height: int, width: int,
                     fill: int = 0, dtype=np.uint8) -> np.ndarray:
    """Burn ``(geometry, value)`` pairs into an ``height×width`` array; later shapes win where
    they overlap (order them by priority)."""
    shapes = [(g, int(v)) for g, v in shapes if g is not None and not g.is_empty]
    if not shapes:
        return np.full((height, width), fill, dtype=dtype)
    return features.rasterize(shapes, out_shape=(height, width), fill=fill,
                              transform=Affine.identity(), all_touched=False, dtype=dtype)


def shape_pixels(geom: BaseGeometry, height: int, width: int) -> int:
    """Pixels ``geom`` burns into a ``height×width`` raster (same convention as
    :func:`rasterize_shapes`), rasterizing only its bounding box: cheap for every polygon."""
    if geom is None or geom.is_empty or geom.area == 0:  # lines, points: no interior
        return 0
    x0, y0, x1, y1 = geom.bounds
    c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    c1, r1 = min(width, int(np.ceil(x1))), min(height, int(np.ceil(y1)))
    if c1 <= c0 or r1 <= r0:
        return 0  # outside the image
    window = features.rasterize([(geom, 1)], out_shape=(r1 - r0, c1 - c0), fill=0,
                                transform=Affine.translation(c0, r0), all_touched=False,
                                dtype=np.uint8)
    return int(window.sum())
