"""Multi-date GeoTIFF source: CRS alignment by ground coordinates, nodata, band statistics,
grouping, the synthesizer/inspector and bad input. Fixtures are written with rasterio here."""

import json

import numpy as np
import pytest
import rasterio
from geo_fixtures import ORIGIN, PATTERN, RES, UTM, ground_coordinate_raster, write_series
from rasterio.transform import from_origin

from densessl.cli import main
from densessl.data import geotiff as geotiff_module
from densessl.data.geotiff import GeoTiffPairs, inspect_geotiff
from densessl.data.geotiff_synth import write_raster
from densessl.errors import DataError


def denormalise(dataset, image):
    return (image.double().numpy() - 0.5) / 0.25 * dataset.std + dataset.mean


@pytest.fixture
def series(tmp_path):
    write_series(tmp_path / "data")
    return tmp_path / "data"


def test_later_date_in_another_crs_lands_on_the_same_pixels(series, tmp_path):
    dataset = GeoTiffPairs(str(series), image_size=48, channels=2, pattern=PATTERN,
                           tiles_per_pair=6, min_valid=0.3, cache_dir=str(tmp_path / "c"))
    assert len(dataset.pairs) == 1 and not dataset.pairs[0].aligned
    checked, errors = 0, []
    for i in range(len(dataset)):
        item = dataset[i]
        col, row, s, _ = item["meta"]["window"]
        expected = ground_coordinate_raster(UTM, from_origin(*ORIGIN, RES, RES), 96, 96)
        expected = expected[:, row:row + s, col:col + s]
        t0, t1 = denormalise(dataset, item["image_t0"]), denormalise(dataset, item["image_t1"])
        v0, v1 = item["valid_t0"].numpy(), item["valid_t1"].numpy()
        assert np.abs(t0 - expected)[:, v0].max() < 0.01
        # the warped later date shows, at each pixel, the ground point of that pixel; what is
        # left is GDAL's bilinear kernel (widened when downsampling), a misregistration by
        # half a 10 m pixel would be 5 m
        error = (t1 - expected)[:, v1]
        assert np.abs(error).max() < 2.5 and np.median(np.abs(error)) < 1.0
        errors.append(error)
        checked += int(v1.sum())
        # nodata: the early west stripe and the later northern NaN strip are invalid
        cols = np.arange(col, col + s)[None].repeat(s, 0)
        north = expected[1]
        assert not v0[cols < 10].any() and v0[cols >= 10].all()
        assert not v1[north > -20 * RES + RES].any()
        assert v1[(north < -22 * RES) & (north > -94 * RES)].all()
    assert checked > 3000
    assert np.abs(np.concatenate(errors, axis=1).mean(1)).max() < 0.2  # no systematic shift


def test_known_ground_point(series, tmp_path):
    """A ground point 37 px east / 52 px south of the origin is pixel (52, 37) in both dates."""
    dataset = GeoTiffPairs(str(series), image_size=96, channels=2, pattern=PATTERN,
                           tiles_per_pair=1, cache_dir=str(tmp_path / "c"))
    item = dataset[0]
    assert item["meta"]["window"] == (0, 0, 96, 96)
    t1 = denormalise(dataset, item["image_t1"])
    point = (37.5 * RES, -52.5 * RES)  # relative to ORIGIN
    distance = np.hypot(t1[0] - point[0], t1[1] - point[1])
    distance[~item["valid_t1"].numpy()] = np.inf
    assert np.unravel_index(np.argmin(distance), distance.shape) == (52, 37)
    assert distance.min() < 2.5


def test_band_statistics_are_computed_once_and_stored(series, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    dataset = GeoTiffPairs(str(series), image_size=48, channels=2, pattern=PATTERN,
                           cache_dir=str(cache))
    stored = json.loads(dataset.stats_path.read_text())
    values = []
    for name in ("farm_20200101.tif", "farm_20210101.tif"):
        with rasterio.open(series / name) as src:
            data = src.read(masked=True).astype(np.float64)
            values.append(np.ma.masked_invalid(data).reshape(2, -1))
    all_values = np.ma.concatenate(values, axis=1)
    assert stored["mean"] == pytest.approx(all_values.mean(1).tolist(), rel=1e-9)
    assert stored["std"] == pytest.approx(all_values.std(1).tolist(), rel=1e-6)

    def fail(*args, **kwargs):
        raise AssertionError("statistics recomputed")

    monkeypatch.setattr(geotiff_module, "band_statistics", fail)
    again = GeoTiffPairs(str(series), image_size=48, channels=2, pattern=PATTERN,
                         cache_dir=str(cache))
    assert again.mean.ravel().tolist() == dataset.mean.ravel().tolist()


def test_many_bands_grouping_by_footprint_and_batches_across_files(tmp_path):
    rng = np.random.default_rng(0)
    for k, origin in enumerate([ORIGIN, (ORIGIN[0] + 50000, ORIGIN[1])]):
        for date in ("20200101", "20200601", "20201201"):
            data = rng.integers(1, 3000, (13, 64, 64)).astype(np.uint16)
            write_raster(tmp_path / f"s2_{k}_{date}.tif", data, UTM,
                         from_origin(*origin, RES, RES), nodata=0)
    dataset = GeoTiffPairs(str(tmp_path / "*.tif"), image_size=32, channels=13,
                           pairing="consecutive", tiles_per_pair=2,
                           cache_dir=str(tmp_path / "c"))
    # no place group: two footprints, each with 2 consecutive pairs
    assert len(dataset.pairs) == 4
    assert all(p.early.path.name[:4] == p.late.path.name[:4] for p in dataset.pairs)
    assert all(p.aligned for p in dataset.pairs)
    item = dataset[0]
    assert item["image_t0"].shape == (13, 32, 32)
    assert abs(float(item["image_t0"].mean()) - 0.5) < 0.05
    assert len({(dataset[i]["meta"]["t0"], dataset[i]["meta"]["t1"]) for i in range(4)}) == 4
    with pytest.raises(DataError, match="data.channels is 3 but 13 bands"):
        GeoTiffPairs(str(tmp_path / "*.tif"), channels=3, image_size=32)
    assert GeoTiffPairs(str(tmp_path / "*.tif"), channels=3, bands=[4, 3, 2], image_size=32,
                        cache_dir=str(tmp_path / "c"))[0]["image_t1"].shape[0] == 3


def test_bad_rasters_name_the_file(tmp_path):
    write_series(tmp_path / "d")
    corrupt = tmp_path / "d" / "farm_20220101.tif"
    corrupt.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match="farm_20220101.tif: cannot read GeoTIFF"):
        GeoTiffPairs(str(tmp_path / "d"), channels=2, image_size=32, pattern=PATTERN)
    corrupt.unlink()
    no_crs = tmp_path / "d" / "farm_20220601.tif"
    write_raster(no_crs, np.ones((2, 64, 64), np.float32), None, from_origin(*ORIGIN, RES, RES),
                 nodata=None)
    with pytest.raises(DataError, match="farm_20220601.tif: raster has no CRS"):
        GeoTiffPairs(str(tmp_path / "d"), channels=2, image_size=32, pattern=PATTERN)
    with pytest.warns(UserWarning, match="no CRS"):
        dataset = GeoTiffPairs(str(tmp_path / "d"), channels=2, image_size=32, pattern=PATTERN,
                               skip_bad=True, cache_dir=str(tmp_path / "c"))
    assert len(dataset.pairs) == 1 and "farm_20220601.tif" in dataset.skipped_samples[0]


def test_dates_that_do_not_overlap(tmp_path):
    write_series(tmp_path / "d", size=64)
    far = from_origin(ORIGIN[0] + 10000, ORIGIN[1], RES, RES)
    write_raster(tmp_path / "d" / "farm_20230101.tif", np.ones((2, 64, 64)), UTM, far, None)
    with pytest.raises(DataError, match="farm_20230101.tif: the two dates do not overlap"):
        GeoTiffPairs(str(tmp_path / "d"), channels=2, image_size=32, pattern=PATTERN)


def test_synthesizer_and_inspector(tmp_path, capsys):
    assert main(["data", "synth", "geotiff", "--out", str(tmp_path / "g"), "--n", "2"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "g"), "--format", "geotiff"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 6 and len(summary["dates"]) == 3
    assert summary["crs"] == ["EPSG:32633", "EPSG:3857"] and summary["band_count"] == [4]
    assert inspect_geotiff(tmp_path / "g")["problems"] == []
    with rasterio.open(tmp_path / "g" / "site-a_20210601.tif") as src:
        assert src.nodata == 0 and (src.read_masks(1) == 0).any()  # nodata swath edge
