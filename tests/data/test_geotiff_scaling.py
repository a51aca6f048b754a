"""``data.options.scaling: bit_depth`` of the multi-date GeoTIFF source: each window is the
file's values divided by the full scale of the data's bit depth (hand-computed here), the
scaling the labeled geotiff_masks scenes get, instead of the series' z-scores."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from densessl.data.geotiff import GeoTiffPairs
from densessl.errors import DataError


def write_dates(root, size=48):
    rng = np.random.default_rng(0)
    arrays = {}
    for date in ("20210601", "20220601"):
        data = rng.integers(1, 4096, size=(2, size, size)).astype(np.uint16)
        data[:, :, :3] = 0  # nodata strip
        with rasterio.open(root / f"p_{date}.tif", "w", driver="GTiff", width=size,
                           height=size, count=2, dtype="uint16", crs="EPSG:32633", nodata=0,
                           transform=from_origin(500000, 5000000, 10, 10)) as dst:
            dst.write(data)
        arrays[date] = data
    return arrays


def test_bit_depth_scaling_divides_by_4095(tmp_path):
    arrays = write_dates(tmp_path)
    source = GeoTiffPairs(str(tmp_path), image_size=32, channels=2, scaling="bit_depth",
                          cache_dir=str(tmp_path / "cache"), tiles_per_pair=4)
    assert source.bit_depth == 12  # the largest value (< 4096) needs 12 bits
    for i in range(len(source)):
        item = source[i]
        col, row, s, _ = item["meta"]["window"]
        raw = arrays["20210601"][:, row:row + s, col:col + s].astype(np.float64)
        valid = (raw != 0).all(0)
        expected = np.where(valid, raw / 4095.0, 0.0)
        np.testing.assert_allclose(item["image_t0"].numpy(), expected, rtol=0, atol=1e-7)
        assert np.array_equal(item["valid_t0"].numpy(), valid)


def test_explicit_depth_too_small_names_the_values(tmp_path):
    write_dates(tmp_path)
    source = GeoTiffPairs(str(tmp_path), image_size=32, channels=2, scaling="bit_depth",
                          bit_depth=10, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="outside 0..1023"):
        source[0]
    with pytest.raises(DataError, match="scaling"):
        GeoTiffPairs(str(tmp_path), image_size=32, channels=2, scaling="minmax",
                     cache_dir=str(tmp_path / "cache"))
