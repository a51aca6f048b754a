"""``geotiff_tiles``: random native-resolution windows of large single-date scenes.

Fixtures are small tiled GeoTIFFs written here with rasterio; every expectation is cut from
the full array with numpy slicing (or written out by hand), never taken from the source."""

import csv
import math

import numpy as np
import pytest
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.transform import from_origin

from densessl.data.geotiff_tiles import MIN_ITEMS, GeoTiffTiles, inspect_geotiff_tiles
from densessl.data.manifest import ProvenanceFilter
from densessl.errors import DataError


def write_scene(path, data, nodata=None, nbits=None, block=32, overviews=False,
                resampling=Resampling.nearest):
    """``data`` C×H×W written as a tiled, DEFLATE-compressed GeoTIFF (UTM, 10 m)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = data.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": data.dtype.name,
               "crs": "EPSG:32633", "transform": from_origin(500000, 5000000, 10, 10),
               "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate"}
    if nodata is not None:
        profile["nodata"] = nodata
    if nbits is not None:
        profile["nbits"] = nbits
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if overviews:
            dst.build_overviews([2, 4], resampling)
    return path


def scaled(raw, depth):
    """What scaling by ``depth`` bits means, written out: x / (2**depth - 1) in float32."""
    return raw.astype(np.float32) / np.float32(2**depth - 1)


def cut(array, window):
    col, row, w, h = window
    return array[..., row:row + h, col:col + w]


@pytest.fixture
def twelve_bit(tmp_path):
    """4 bands of 12-bit data in uint16, NBITS=12 declared; 4095 and 1000 at known places."""
    rng = np.random.default_rng(0)
    raw = rng.integers(1, 4096, (4, 150, 170)).astype(np.uint16)
    raw[:, 70:80, 80:90] = 4095
    raw[2, 75, 85] = 1000
    return write_scene(tmp_path / "scenes" / "a.tif", raw, nbits=12), raw


def test_windows_equal_numpy_slices_scaled_by_12_bits(twelve_bit):
    path, raw = twelve_bit
    data = GeoTiffTiles(str(path.parent), image_size=48, channels=4, items_per_epoch=40)
    assert data.bit_depth == 12  # declared NBITS
    inside = 0
    for i in range(40):
        item = data[i]
        window = item["meta"]["window"]
        assert window[2:] == [48, 48] and item["meta"]["file"] == str(path)
        assert item["image"].dtype == torch.float32 and item["image"].shape == (4, 48, 48)
        assert np.array_equal(item["image"].numpy(), scaled(cut(raw, window), 12))
        assert item["valid"].all()
        col, row = window[:2]
        if col <= 85 < col + 48 and row <= 75 < row + 48:  # hand-computed values
            inside += 1
            assert item["image"][0, 75 - row, 85 - col] == 1.0  # 4095 → 1.0
            assert item["image"][2, 75 - row, 85 - col] == pytest.approx(1000 / 4095, abs=1e-7)
    assert inside > 0


def test_auto_bit_depth_from_a_windowed_maximum(tmp_path):
    """No NBITS: the depth of the largest value in the sample (3000 → 12 bits), and a value
    above the resolved depth in a window is an error naming the file and data.bit_depth."""
    raw = np.full((2, 300, 300), 3000, np.uint16)
    # between the sample's 64² windows (a 4×4 grid at 0, 79, 157, 236): 13 bits, above 4095
    raw[:, 148:153, 148:153] = 5000
    path = write_scene(tmp_path / "s" / "b.tif", raw)
    data = GeoTiffTiles(str(path), image_size=32, channels=2, items_per_epoch=400)
    assert data.bit_depth == 12
    covers = [i for i in range(400)
              if all(o <= 150 < o + 32 for o in next(data.draw(i)[1]))]
    clear = next(i for i in range(400) if i not in covers)
    assert np.array_equal(data[clear]["image"].numpy(), np.full((2, 32, 32), scaled(
        np.array(3000), 12), np.float32))
    hit = covers[0]
    with pytest.raises(DataError, match=r"b\.tif.*data\.bit_depth"):
        data[hit]
    assert GeoTiffTiles(str(path), image_size=32, channels=2, bit_depth=14)[hit]["image"].max() \
        == pytest.approx(5000 / 16383)


def test_bands_pick_the_right_planes(twelve_bit):
    path, raw = twelve_bit
    data = GeoTiffTiles(str(path), image_size=32, channels=2, bands=[4, 2],
                        items_per_epoch=10)
    for i in range(10):
        item = data[i]
        expected = scaled(cut(raw, item["meta"]["window"])[[3, 1]], 12)
        assert np.array_equal(item["image"].numpy(), expected)


def test_channels_and_bands_must_agree(twelve_bit):
    path, _ = twelve_bit
    with pytest.raises(DataError, match=r"data.channels is 3 but the scenes have 4 bands"):
        GeoTiffTiles(str(path), image_size=32, channels=3)
    with pytest.raises(DataError, match=r"data.channels is 3 but data.options.bands selects 2"):
        GeoTiffTiles(str(path), image_size=32, channels=3, bands=[1, 2])
    with pytest.raises(DataError, match=r"has 4 bands.*outside 1..4"):
        GeoTiffTiles(str(path), image_size=32, channels=2, bands=[1, 5])


@pytest.fixture
def bordered(tmp_path):
    """3 bands, nodata 0: the left 90 columns of 200 have no data in band 2 only, and a
    scattering of single-band nodata pixels elsewhere."""
    rng = np.random.default_rng(1)
    raw = rng.integers(1, 256, (3, 200, 200)).astype(np.uint8)
    raw[1, :, :90] = 0
    raw[2][rng.random((200, 200)) < 0.02] = 0
    return write_scene(tmp_path / "n" / "c.tif", raw, nodata=0), raw


def test_valid_is_every_band_not_nodata(bordered):
    path, raw = bordered
    data = GeoTiffTiles(str(path), image_size=40, channels=3, max_nodata=0.9,
                        items_per_epoch=60)
    assert data.bit_depth == 8
    partial = 0
    for i in range(60):
        item = data[i]
        window = item["meta"]["window"]
        expected_valid = (cut(raw, window) != 0).all(0)  # independent mask
        assert np.array_equal(item["valid"].numpy(), expected_valid)
        expected = np.where(expected_valid, scaled(cut(raw, window), 8), 0)
        assert np.array_equal(item["image"].numpy(), expected)  # nodata pixels are 0
        partial += 0.1 < (~expected_valid).mean() < 0.9
    assert partial > 0  # the border was sampled


def test_windows_above_max_nodata_are_never_returned(bordered):
    path, raw = bordered
    data = GeoTiffTiles(str(path), image_size=40, channels=3, max_nodata=0.3,
                        items_per_epoch=100)
    shares = [1 - (cut(raw, data[i]["meta"]["window"]) != 0).all(0).mean() for i in range(100)]
    assert max(shares) <= 0.3
    assert max(shares) > 0.1  # windows over the border edge are kept when below the limit
    # a limit no window can meet: a DataError naming the scene and what to change
    with pytest.raises(DataError, match=r"c\.tif: item 0: .*max_nodata"):
        GeoTiffTiles(str(path), image_size=120, channels=3, max_nodata=0.0, tries=5)[0]


def test_overview_lets_redraws_skip_reads_without_changing_windows(tmp_path, monkeypatch):
    """A scene 60 % nodata (a swath edge): with averaged overviews, candidates the overview
    shows to be mostly nodata are not read, and every item is the window it is without."""
    raw = np.random.default_rng(5).integers(1, 256, (2, 512, 512)).astype(np.uint8)
    raw[:, :, :300] = 0
    plain = write_scene(tmp_path / "plain" / "s.tif", raw, nodata=0)
    with_ovr = write_scene(tmp_path / "ovr" / "s.tif", raw, nodata=0, overviews=True,
                           resampling=Resampling.average)
    reads = []
    original = rasterio.io.DatasetReader.read

    def counting_read(self, *args, **kwargs):
        reads.append(self.name)
        return original(self, *args, **kwargs)

    items = {}
    for path in (plain, with_ovr):
        data = GeoTiffTiles(str(path), image_size=64, channels=2, max_nodata=0.3,
                            items_per_epoch=60, windows_per_block=1)
        monkeypatch.setattr(rasterio.io.DatasetReader, "read", counting_read)
        items[path] = [data[i] for i in range(60)]
        monkeypatch.undo()
    for a, b in zip(items[plain], items[with_ovr]):
        assert a["meta"]["window"] == b["meta"]["window"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["valid"], b["valid"])
        assert 1 - b["valid"].float().mean() <= 0.3
    assert reads.count(str(with_ovr)) < 0.5 * reads.count(str(plain))


@pytest.mark.parametrize("overviews", [False, True])
def test_all_nodata_scene_is_refused_at_build_naming_it(tmp_path, overviews):
    good = np.full((1, 96, 96), 7, np.uint8)
    write_scene(tmp_path / "d" / "good.tif", good, nodata=0)
    write_scene(tmp_path / "d" / "empty.tif", np.zeros((1, 300, 300), np.uint8), nodata=0,
                overviews=overviews)
    with pytest.raises(DataError, match=r"empty\.tif: no valid pixel"):
        GeoTiffTiles(str(tmp_path / "d"), image_size=32, channels=1)
    with pytest.warns(UserWarning, match="empty.tif"):
        data = GeoTiffTiles(str(tmp_path / "d"), image_size=32, channels=1, skip_bad=True)
    assert [s.path.name for s in data.scenes] == ["good.tif"]
    assert len(data.skipped_samples) == 1


def test_same_window_for_same_seed_and_index(bordered, twelve_bit, tmp_path):
    """Two scenes (4 and 3 bands: bands 1-3 of each); item i is a function of (seed, i)
    only, whatever was read before and in whichever object."""
    def make(seed):
        return GeoTiffTiles(str(tmp_path), image_size=32, channels=3, bands=[1, 2, 3],
                            max_nodata=0.9, items_per_epoch=50, seed=seed)

    a, b, c = make(3), make(3), make(4)
    assert len(a) == 50
    order = [7, 3, 49, 0, 7]
    first = [a[i] for i in order]
    for i, got in zip(reversed(order), reversed(first)):  # another object, another order
        again = b[i]
        assert got["meta"] == again["meta"]
        assert torch.equal(got["image"], again["image"])
        assert torch.equal(got["valid"], again["valid"])
    assert {a[i]["meta"]["file"] for i in range(50)} == {str(twelve_bit[0]), str(bordered[0])}
    assert any(a[i]["meta"] != c[i]["meta"] for i in range(10))  # another seed, other windows
    with pytest.raises(IndexError):
        a[50]


def test_default_length_tiles_the_area_once(tmp_path):
    write_scene(tmp_path / "e" / "x.tif", np.ones((1, 640, 480), np.uint8))
    write_scene(tmp_path / "e" / "sub" / "y.tif", np.ones((1, 200, 640), np.uint8))
    data = GeoTiffTiles(str(tmp_path / "e"), image_size=16, channels=1)
    assert len(data) == math.ceil((640 * 480 + 200 * 640) / 16**2) > MIN_ITEMS
    with pytest.warns(UserWarning, match=r"y\.tif: 640×200\): their windows are padded"):
        assert len(GeoTiffTiles(str(tmp_path / "e"), image_size=256, channels=1)) == MIN_ITEMS


def test_getitem_reads_windows_of_at_most_image_size(twelve_bit, monkeypatch):
    path, _ = twelve_bit
    data = GeoTiffTiles(str(path), image_size=40, channels=4, items_per_epoch=30)
    calls = []
    original = rasterio.io.DatasetReader.read

    def recording_read(self, *args, **kwargs):
        calls.append((kwargs.get("window"), kwargs.get("out_shape")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", recording_read)
    for i in range(30):
        data[i]
    assert len(calls) >= 30
    for window, out_shape in calls:
        assert window is not None and out_shape is None
        assert window.width <= 40 and window.height <= 40
    # construction samples windows (and overviews), never a scene larger than the sample
    # (256²) whole at full resolution
    for overviews in (False, True):
        large = write_scene(path.parent / f"large{overviews}.tif",
                            np.full((2, 320, 300), 9, np.uint16), overviews=overviews)
        calls.clear()
        GeoTiffTiles(str(large), image_size=40, channels=2, bit_depth="auto")
        assert calls
        for window, out_shape in calls:
            assert (window is not None and window.width * window.height <= 64 * 64) or \
                (out_shape is not None and out_shape[1:] == (160, 150))  # the 2× overview


def test_gdal_cache_ceiling_is_set_where_windows_are_read(twelve_bit, tmp_path):
    """GDAL's default block cache (5 % of RAM per process) would fill with a large scene's
    tiles: the source sets a ceiling in the reading process, raised to twice the decoded
    tiles one window touches when the configured one is smaller."""
    from rasterio.env import get_gdal_config, set_gdal_config

    path, _ = twelve_bit
    wide = write_scene(tmp_path / "w" / "wide.tif", np.ones((8, 300, 300), np.uint16),
                       block=256)
    before = get_gdal_config("GDAL_CACHEMAX")
    try:
        GeoTiffTiles(str(path), image_size=32, channels=4, gdal_cache_mb=64)[0]
        assert get_gdal_config("GDAL_CACHEMAX") == 64 * 2**20  # bytes, not 64 B
        GeoTiffTiles(str(wide), image_size=64, channels=8, gdal_cache_mb=1)[0]
        # a 64² window can touch 2×2 tiles of 256² × 8 bands × 2 bytes
        assert get_gdal_config("GDAL_CACHEMAX") == 2 * 4 * 256 * 256 * 8 * 2
    finally:
        set_gdal_config("GDAL_CACHEMAX", before)


def test_scene_smaller_than_the_window_is_padded_invalid(tmp_path):
    raw = np.random.default_rng(2).integers(1, 256, (2, 30, 44)).astype(np.uint8)
    path = write_scene(tmp_path / "f" / "small.tif", raw, block=16)
    with pytest.warns(UserWarning, match="padded with invalid pixels"):
        data = GeoTiffTiles(str(path), image_size=64, channels=2, items_per_epoch=20)
    offsets = set()
    for i in range(20):
        item = data[i]
        col, row, w, h = item["meta"]["window"]
        assert (w, h) == (64, 64) and -20 <= col <= 0 and -34 <= row <= 0
        offsets.add((col, row))
        valid = np.zeros((64, 64), bool)
        valid[-row:-row + 30, -col:-col + 44] = True
        image = np.zeros((2, 64, 64), np.float32)
        image[:, -row:-row + 30, -col:-col + 44] = scaled(raw, 8)
        assert np.array_equal(item["valid"].numpy(), valid)
        assert np.array_equal(item["image"].numpy(), image)
    assert len(offsets) > 1  # placed at random, not always in the corner


def test_float_scenes_nan_invalid_and_range_checked(tmp_path):
    raw = np.random.default_rng(3).random((2, 64, 64)).astype(np.float32)
    raw[0, 10:20, :] = np.nan
    path = write_scene(tmp_path / "g" / "f.tif", raw)
    data = GeoTiffTiles(str(path), image_size=32, channels=2, items_per_epoch=10,
                        max_nodata=1.0)
    assert data.bit_depth is None  # floats are read as they are
    for i in range(10):
        item = data[i]
        window = item["meta"]["window"]
        valid = np.isfinite(cut(raw, window)).all(0)
        assert np.array_equal(item["valid"].numpy(), valid)
        assert np.array_equal(item["image"].numpy(), np.where(valid, cut(raw, window), 0))
    write_scene(tmp_path / "h" / "reflectance100.tif", raw * 100)
    with pytest.raises(DataError, match=r"reflectance100\.tif.*outside \[0, 1\]"):
        GeoTiffTiles(str(tmp_path / "h"), image_size=32, channels=2)


def test_manifest_keeps_only_listed_scenes(bordered, tmp_path):
    path, _ = bordered
    write_scene(path.parent / "other.tif", np.full((3, 64, 64), 9, np.uint8))
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "licence", "author", "url"])
        w.writerow(["other.tif", "CC-BY-4.0", "someone", "https://example.org/o"])
    data = GeoTiffTiles(str(path.parent), image_size=32, channels=3, items_per_epoch=20,
                        provenance=ProvenanceFilter(manifest, path.parent,
                                                    require=("licence",)))
    assert {data[i]["meta"]["file"] for i in range(20)} == {str(path.parent / "other.tif")}
    assert data.image_provenance["images_used"] == 1
    assert data.provenance_files() == ["other.tif"]


def test_inspector_reports_scenes(twelve_bit, bordered):
    root = twelve_bit[0].parents[1]
    report = inspect_geotiff_tiles(root)
    assert report["scenes"] == 2 and report["band_count"] == [3, 4]
    assert report["dtypes"] == ["uint16", "uint8"] and report["crs"] == ["EPSG:32633"]
    by_file = {s["file"]: s for s in report["files"]}
    assert by_file["scenes/a.tif"]["nbits"] == 12 and by_file["n/c.tif"]["nodata"] == 0
    assert by_file["scenes/a.tif"]["block"] == [32, 32]
    assert report["pixels"] == 150 * 170 + 200 * 200


def test_bench_reports_its_fields(tmp_path):
    from densessl.bench.tiles import bench_geotiff_tiles

    kwargs = dict(sizes=(160, 80), window=32, samples=3, bands=3, tile=64,
                  cache_dir=tmp_path, isolate=False, uncapped=False, log=lambda m: None)
    first = bench_geotiff_tiles(**kwargs)
    assert set(first["scenes"]) == {"160px", "80px"}
    for entry in first["scenes"].values():
        assert entry["synthesize_s"] >= 0 and entry["pairs_per_s_per_worker"] > 0
        assert entry["decode_ms_per_pair"] > 0 and entry["rss_growth_mb"] >= 0
        assert entry["bit_depth"] in (12, 14)  # 12-14-bit data (14 where a cloud is)
    assert isinstance(first["meets_target"], bool)
    assert first["pixels_ratio_large_over_small"] == 4.0
    with rasterio.open(tmp_path / "bench" / "s2like-160px-3b-tile64-v1.tif") as src:
        assert src.block_shapes[0] == (64, 64) and src.compression.value == "DEFLATE"
        assert src.nodata == 0 and src.count == 3
    again = bench_geotiff_tiles(**kwargs)  # cached: written once
    assert all(e["synthesize_s"] is None for e in again["scenes"].values())


def test_pretrains_on_a_folder_of_4_band_scenes(tmp_path):
    from densessl.workflows.pretraining import pretrain

    rng = np.random.default_rng(4)
    for name in ("p", "q"):
        field = rng.integers(200, 4000, (4, 12, 12)).repeat(8, 1).repeat(8, 2)
        raw = (field + rng.integers(0, 50, field.shape)).astype(np.uint16)
        raw[:, :, :10] = 0
        write_scene(tmp_path / "scenes" / f"{name}.tif", raw, nodata=0)
    recipe = {
        "name": "tiles_e2e", "seed": 0,
        "data": {"source": "geotiff_tiles", "path": str(tmp_path / "scenes"), "channels": 4,
                 "image_size": 48, "options": {"max_nodata": 0.3, "items_per_epoch": 16}},
        "pairs": {"builder": "same_image"},
        "augment": {"view_size": 32, "mean": 0.5, "std": 0.25,
                    "photometry": {"non_rgb": "per_channel"}},
        "model": {"backbone": "resnet18", "dense_dim": 16, "global_dim": 16,
                  "key_bn": "batch"},
        "loss": {"dense": {"queue_size": 64, "samples_per_image": 8}, "global": {"queue_size": 16}},
        "train": {"batch_size": 4, "max_steps": 2, "num_workers": 0},
    }
    metrics = pretrain(recipe, tmp_path / "out")
    assert metrics["steps"] == 2
    assert (tmp_path / "out" / "encoder.pt").stat().st_size > 0


# --- block-local window groups (windows_per_block) ---------------------------------------


def block_grid(path):
    """The internal block (tile) height and width, read with rasterio."""
    with rasterio.open(path) as src:
        return tuple(src.block_shapes[0])


def block_of(window, grid):
    """The (block row, block col) holding ``window`` whole, or None if it spans blocks."""
    col, row, w, h = window
    bh, bw = grid
    first, last = (row // bh, col // bw), ((row + h - 1) // bh, (col + w - 1) // bw)
    return first if first == last else None


@pytest.fixture
def tiled(tmp_path):
    """4 bands uint16, 256 × 320 (whole 64² blocks), nodata 0 over the left 100 columns."""
    raw = np.random.default_rng(7).integers(1, 4096, (4, 256, 320)).astype(np.uint16)
    raw[:, :, :100] = 0
    return write_scene(tmp_path / "t" / "tiled.tif", raw, nodata=0, block=64), raw


@pytest.mark.parametrize("k", [4, 8])
def test_group_members_lie_in_one_internal_block(tiled, k):
    path, raw = tiled
    grid = block_grid(path)
    assert grid == (64, 64)
    data = GeoTiffTiles(str(path), image_size=48, channels=4, max_nodata=0.25,
                        items_per_epoch=12 * k, windows_per_block=k)
    assert data.sample_group == k
    blocks = set()
    for g in range(12):
        members = [data[i] for i in range(g * k, (g + 1) * k)]
        windows = [m["meta"]["window"] for m in members]
        held = {block_of(w, grid) for w in windows}
        assert len(held) == 1 and None not in held, windows  # one block, wholly inside
        blocks |= held
        for m, w in zip(members, windows):  # still the right pixels, max_nodata per window
            expected_valid = (cut(raw, w) != 0).all(0)
            assert np.array_equal(m["valid"].numpy(), expected_valid)
            assert np.array_equal(m["image"].numpy(),
                                  np.where(expected_valid, scaled(cut(raw, w), 12), 0))
            assert (~expected_valid).mean() <= 0.25
        assert len({tuple(w) for w in windows}) > 1  # members differ inside the block
    assert len(blocks) > 3  # groups spread over the scene
    # the mostly-nodata blocks (columns 0-99) are redrawn: never a block wholly in them
    assert all(c >= 1 for _, c in blocks)


def test_group_redraws_its_block_when_the_block_is_too_empty(tmp_path):
    """Data in 4 of 16 blocks only: every group lands in one of them (the block draw is
    redrawn, the same for every member), every window within max_nodata."""
    raw = np.zeros((2, 256, 256), np.uint8)
    good = [(0, 3), (1, 1), (2, 2), (3, 0)]
    rng = np.random.default_rng(8)
    for r, c in good:
        raw[:, r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] = rng.integers(1, 256, (2, 64, 64))
    path = write_scene(tmp_path / "r" / "sparse.tif", raw, nodata=0, block=64)
    data = GeoTiffTiles(str(path), image_size=32, channels=2, max_nodata=0.2,
                        items_per_epoch=80, windows_per_block=8)
    seen = set()
    for g in range(10):
        windows = [data[i]["meta"]["window"] for i in range(g * 8, (g + 1) * 8)]
        held = {block_of(w, (64, 64)) for w in windows}
        assert len(held) == 1 and held <= set(good), (g, windows)
        seen |= held
        for w in windows:
            assert (cut(raw, w) == 0).any(0).mean() <= 0.2
    assert len(seen) > 1


def test_members_fall_back_to_the_group_probe(tmp_path):
    """A block where few windows qualify: a member whose own tries all fail takes the group's
    probe window (proven within max_nodata), never a window over the limit; a group none of
    whose probes qualifies is an error naming the item and windows_per_block."""
    raw = np.zeros((1, 64, 64), np.uint8)
    raw[:, :36, :36] = 9  # only windows near the top-left corner are mostly valid
    path = write_scene(tmp_path / "p" / "corner.tif", raw, nodata=0, block=64)
    data = GeoTiffTiles(str(path), image_size=32, channels=1, max_nodata=0.6, tries=3,
                        items_per_epoch=128, windows_per_block=8)
    fallbacks = failed = 0
    for g in range(16):
        _, region, probe, _ = data.group_region(g)
        if probe is None:
            failed += 1
            with pytest.raises(DataError, match=rf"item {g * 8 + 3}: window group {g} "
                                                r"\(data.options.windows_per_block 8\).*"
                                                r"max_nodata"):
                data[g * 8 + 3]
            continue
        for i in range(g * 8, (g + 1) * 8):
            w = data[i]["meta"]["window"]
            assert (cut(raw, w)[0] == 0).mean() <= 0.6
            origins = list(data.draw(i)[1])
            assert len(origins) == 3 + 1 and origins[-1] == probe
            own = [o for o in origins[:-1] if (cut(raw, [*o, 32, 32])[0] == 0).mean() <= 0.6]
            assert tuple(w[:2]) == (own[0] if own else probe)
            fallbacks += not own
    assert fallbacks > 0 and failed > 0


def test_group_windows_are_a_function_of_seed_and_index(tiled):
    """Whatever the access order, the object, or what it has remembered: item i is the same
    window (a group's region is derived from (seed, group) alone)."""
    path, _ = tiled

    def make(seed=0):
        return GeoTiffTiles(str(path), image_size=48, channels=4, max_nodata=0.25,
                            items_per_epoch=64, windows_per_block=8, seed=seed)

    forward = make()
    expected = [forward[i] for i in range(64)]
    shuffled = make()
    for i in np.random.default_rng(1).permutation(64):
        got = shuffled[int(i)]
        assert got["meta"] == expected[i]["meta"]
        assert torch.equal(got["image"], expected[i]["image"])
    for i in (63, 5, 17):  # a fresh object per item: no remembered region
        assert make()[i]["meta"] == expected[i]["meta"]
    assert any(make(1)[i]["meta"] != expected[i]["meta"] for i in range(8))


def test_windows_per_block_1_is_the_ungrouped_draw(twelve_bit):
    """k = 1: each window is the first candidate of draw(), drawn over the whole scene from
    (seed, index) exactly as before groups existed (a per-item generator: scene, col, row)."""
    path, _ = twelve_bit
    data = GeoTiffTiles(str(path), image_size=48, channels=4, items_per_epoch=20,
                        windows_per_block=1)
    for i in range(20):
        rng = np.random.default_rng([0, i])
        rng.random()  # the scene draw (one scene)
        expected = [int(rng.integers(0, 170 - 48 + 1)), int(rng.integers(0, 150 - 48 + 1))]
        assert data[i]["meta"]["window"] == [*expected, 48, 48]


def test_small_blocks_group_inside_one_and_a_half_windows(tmp_path):
    raw = np.random.default_rng(9).integers(1, 256, (1, 200, 240)).astype(np.uint8)
    path = write_scene(tmp_path / "b" / "small_blocks.tif", raw, block=16)
    data = GeoTiffTiles(str(path), image_size=48, channels=1, items_per_epoch=48,
                        windows_per_block=6)
    for g in range(8):
        windows = np.array([data[i]["meta"]["window"] for i in range(g * 6, (g + 1) * 6)])
        assert np.ptp(windows[:, 0]) <= 72 - 48 and np.ptp(windows[:, 1]) <= 72 - 48
        assert windows[:, 0].min() >= 0 and windows[:, 0].max() <= 240 - 48


def test_default_length_is_whole_groups(tmp_path):
    write_scene(tmp_path / "e" / "x.tif", np.ones((1, 640, 481), np.uint8))
    data = GeoTiffTiles(str(tmp_path / "e"), image_size=16, channels=1, windows_per_block=8)
    assert len(data) == 8 * math.ceil(math.ceil(640 * 481 / 16**2) / 8)
    with pytest.raises(DataError, match="windows_per_block"):
        GeoTiffTiles(str(tmp_path / "e"), image_size=16, channels=1, windows_per_block=0)


class ReadLog:
    """Opens the scene through a Python file object that logs every (offset, size) GDAL
    reads: a tile's compressed bytes are read once per decode (GDAL's block cache holds the
    decoded tile, so a cache hit reads nothing)."""

    def __init__(self, path):
        import io

        self.path, self.reads, self.handles = path, [], []
        log = self.reads

        class Logged(io.FileIO):
            def read(self, size=-1):
                at = self.tell()
                out = super().read(size)
                log.append((at, len(out)))
                return out

        self.file_class = Logged
        with rasterio.open(path) as src:
            bh, bw = src.block_shapes[0]
            ny, nx = math.ceil(src.height / bh), math.ceil(src.width / bw)
            self.tiles = {(y, x): (int(src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=1)),
                                   int(src.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=1)))
                          for y in range(ny) for x in range(nx)}
        assert len({o for o, _ in self.tiles.values()}) == len(self.tiles)

    def open(self):
        handle = rasterio.open(self.path, opener=lambda p, mode="rb": self.file_class(p, "rb"))
        handle.read(1, window=rasterio.windows.Window(0, 0, 1, 1))  # headers; tile (0, 0)
        self.handles.append(handle)
        return handle

    def decodes(self):
        """How often each tile's bytes were read since the log was last cleared."""
        counts = {}
        for at, size in self.reads:
            for tile, (offset, length) in self.tiles.items():
                if at < offset + length and offset < at + size:
                    counts[tile] = counts.get(tile, 0) + 1
        return counts

    def close(self):  # explicitly: a Python-backed handle left to the interpreter's exit crashes
        for handle in self.handles:
            handle.close()


def test_a_group_decodes_each_internal_tile_once(tiled, monkeypatch):
    path, _ = tiled
    k = 8
    data = GeoTiffTiles(str(path), image_size=48, channels=4, max_nodata=0.25,
                        items_per_epoch=10 * k, windows_per_block=k)
    expected = [data[i]["meta"]["window"] for i in range(10 * k)]  # through a plain handle
    log = ReadLog(path)
    try:
        handle = log.open()
        monkeypatch.setattr(data.handles, "get", lambda *args, **kwargs: handle)
        data._groups.clear()  # choose each region again, through the logged handle
        # opening reads the headers and tile (0, 0) (its read may overlap the next tile)
        opened, decoded = set(log.decodes()), set()
        for g in range(10):
            log.reads.clear()
            windows = [data[i]["meta"]["window"] for i in range(g * k, (g + 1) * k)]
            assert windows == expected[g * k:(g + 1) * k]
            counts = log.decodes()
            # each tile at most once in the group: the k windows and the kept region's probe
            # share the block (a rejected region's probe reads its own block once)
            assert all(n == 1 for n in counts.values()), counts
            block = block_of(windows[0], (64, 64))
            assert block in set(counts) | decoded | opened  # read now, or still cached
            assert not decoded & set(counts)  # a tile decoded before is never decoded again
            decoded |= set(counts)
        # the control: the same group's windows each through a fresh handle (no shared
        # cache) read its block once per window — what the count would show on a re-decode
        log.reads.clear()
        for w in expected[:k]:
            log.open().read(window=rasterio.windows.Window(*w))
        assert log.decodes()[block_of(expected[0], (64, 64))] == k + (
            block_of(expected[0], (64, 64)) == (0, 0)) * k
    finally:
        log.close()


def test_data_check_reads_scenes_with_rasterio(tmp_path, monkeypatch):
    """``data inspect --check --format geotiff_tiles``: rasters decoded with rasterio, block by
    block (PIL would fail on 13-band uint16); a truncated scene is named; one file works."""
    from densessl.data import check

    good = write_scene(tmp_path / "c" / "good.tif",
                       np.random.default_rng(0).integers(1, 4096, (13, 96, 96)).astype(np.uint16))
    bad = write_scene(tmp_path / "c" / "sub" / "bad.tif",
                      np.random.default_rng(1).integers(1, 4096, (13, 96, 96)).astype(np.uint16))
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    monkeypatch.setattr(check, "decode_image", lambda p: pytest.fail(f"PIL decode of {p}"))
    report = check.check_files(tmp_path / "c", "geotiff_tiles")
    assert report["files"] == 2 and len(report["bad"]) == 1 and "bad.tif" in report["bad"][0]
    assert check.check_files(good, "geotiff_tiles") == {"files": 1, "bad": []}


def test_bench_reports_pairs_per_s_for_each_windows_per_block(tmp_path):
    from densessl.bench.tiles import bench_geotiff_tiles
    from densessl.data.geotiff_tiles import WINDOWS_PER_BLOCK

    report = bench_geotiff_tiles(sizes=(128, 64), window=32, samples=8, bands=2, tile=64,
                                 windows_per_block=(1, 2), cache_dir=tmp_path, isolate=False,
                                 uncapped=False, log=lambda m: None)
    ks = sorted({1, 2, WINDOWS_PER_BLOCK})
    assert report["default_windows_per_block"] == WINDOWS_PER_BLOCK
    assert sorted(report["table"]) == sorted(f"k={k}" for k in ks)
    for row in report["table"].values():
        assert set(row) == {"128px", "64px"}
        assert all(v["pairs_per_s"] > 0 and v["rss_growth_mb"] >= 0 for v in row.values())
    for entry in report["scenes"].values():
        by_k = entry["by_windows_per_block"]
        assert sorted(by_k, key=int) == [str(k) for k in ks]
        assert all(f["windows_per_block"] == int(k) and f["pairs_timed"] % int(k) == 0
                   for k, f in by_k.items())
        # the scene's top-level figures are those at the source's default
        assert entry["pairs_per_s_per_worker"] == \
            by_k[str(WINDOWS_PER_BLOCK)]["pairs_per_s_per_worker"]
    assert set(report["rss_growth_ratio_by_windows_per_block"]) == {str(k) for k in ks}
