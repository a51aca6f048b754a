"""GeoTIFF windows scale: files and warped views open once per process, windowed reads only,
and the values equal a fresh per-read WarpedVRT (the reader before issue #15)."""

import pickle

import numpy as np
from rasterio.vrt import WarpedVRT
from rasterio.warp import Resampling
from rasterio.windows import Window

import densessl.data.geotiff as geotiff_module
from densessl.bench_data import write_geotiff_series
from densessl.data.geotiff import WARP_TOLERANCE, GeoTiffPairs

PATTERN = r"(?P<place>tile)_(?P<date>\d{8})\.tif$"


def test_handles_open_once_and_reads_match_a_fresh_warp(tmp_path, monkeypatch):
    paths = write_geotiff_series(tmp_path / "s", size=160, bands=3, dates=2)
    opened = []
    real_open = geotiff_module.rasterio.open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    data = GeoTiffPairs(str(tmp_path / "s"), image_size=32, channels=3, pattern=PATTERN,
                        cache_dir=str(tmp_path / "c"), tiles_per_pair=12)
    assert data.pairs[0].aligned is False  # the later date is warped
    monkeypatch.setattr(geotiff_module.rasterio, "open", counting_open)
    items = [data[i] for i in range(len(data))]
    assert sorted(opened) == sorted(str(p) for p in paths)  # once per file, 12 items
    with real_open(paths[0]) as early:
        crs, transform = early.crs, early.transform
    for item in items[:4]:
        col, row, w, h = item["meta"]["window"]
        with real_open(paths[1]) as src, WarpedVRT(
                src, crs=crs, transform=transform, width=160, height=160,
                resampling=Resampling.bilinear, tolerance=WARP_TOLERANCE) as vrt:
            raw = vrt.read(window=Window(col, row, w, h), out_dtype="float64")
        valid = (raw != 0).all(0)
        expected = 0.5 + 0.25 * (raw - data.mean) / data.std
        assert np.array_equal(item["valid_t1"].numpy(), valid)
        np.testing.assert_allclose(item["image_t1"].numpy()[:, valid], expected[:, valid],
                                   rtol=1e-5, atol=1e-5)
    # a spawned worker gets no handles; it opens its own
    clone = pickle.loads(pickle.dumps(data))
    assert len(clone.handles._open) == 0
    opened.clear()
    clone[0]
    assert len(opened) == 2
    data.handles.close()
