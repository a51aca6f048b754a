"""GeoTIFF windows scale: files and warped views open once per process, windowed reads only,
and the values equal a fresh per-read WarpedVRT (the reader before issue #15)."""

import pickle

import numpy as np
from rasterio.vrt import WarpedVRT
from rasterio.warp import Resampling
from rasterio.windows import Window

import densessl.data.geotiff as geotiff_module
from densessl.bench.data_pipeline import write_geotiff_series
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


def test_statistics_of_a_large_raster_read_windows_only(tmp_path, monkeypatch):
    """A raster larger than the sample: spread windows (no whole-scene read), and the
    statistics are close to the full ones (the sample is 1/4 of this raster)."""
    import re

    from densessl.data.geotiff import band_statistics, read_info, stats_windows

    paths = write_geotiff_series(tmp_path / "s", size=512, bands=2, dates=1)
    windows = stats_windows(512, 512)
    assert len(windows) == 16 and all(w.width == 64 and w.height == 64 for w in windows)
    assert len({(w.col_off, w.row_off) for w in windows}) == 16
    assert stats_windows(200, 100) == [Window(0, 0, 200, 100)]
    seen = []
    real_read = geotiff_module.rasterio.io.DatasetReader.read

    def checked_read(self, *args, window=None, **kwargs):
        assert window is not None and window.width * window.height <= 64 * 64
        seen.append(window)
        return real_read(self, *args, window=window, **kwargs)

    monkeypatch.setattr(geotiff_module.rasterio.io.DatasetReader, "read", checked_read)
    info = read_info(paths[0], re.compile(PATTERN))
    stats = band_statistics([info], [1, 2])
    monkeypatch.undo()
    assert len(seen) == 16
    with geotiff_module.rasterio.open(paths[0]) as src:
        full = src.read().astype(np.float64).reshape(2, -1)
    np.testing.assert_allclose(stats["mean"], full.mean(1), rtol=0.1)
    np.testing.assert_allclose(stats["std"], full.std(1), rtol=0.3)
