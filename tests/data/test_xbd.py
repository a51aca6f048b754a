"""xBD loader: fixtures in the real format (seeded synthesizer), masks against an independent
point-in-polygon rasterization, both folder layouts, the inspector and bad input."""

import json
import shutil

import numpy as np
import pytest
import shapely
from PIL import Image

from densessl.cli import main
from densessl.data.xbd import XBDDataset, XBDTiles, inspect_xbd, scan_xbd
from densessl.data.xbd_synth import synthesize_xbd
from densessl.errors import DataError

DAMAGE = {"no-damage": 1, "minor-damage": 2, "major-damage": 3, "destroyed": 4}


@pytest.fixture(scope="module")
def xbd_root(tmp_path_factory):
    return synthesize_xbd(tmp_path_factory.mktemp("xbd"), n=4, seed=3)


def copy_root(xbd_root, tmp_path):
    return shutil.copytree(xbd_root, tmp_path / "xbd")


def independent_maps(label_path, size, ignore=255):
    """Pixel-centre point-in-polygon with shapely, straight from the JSON."""
    features = json.loads(label_path.read_text())["features"]["xy"]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    out = np.zeros((size, size), np.int64)
    # worse damage wins on overlaps, un-classified lowest
    rank = lambda f: {**DAMAGE, "un-classified": 0}.get(f["properties"].get("subtype"), 1)  # noqa: E731
    for feature in sorted(features, key=rank):
        subtype = feature["properties"].get("subtype")
        value = 1 if subtype is None else DAMAGE.get(subtype, ignore)
        out[shapely.contains_xy(shapely.from_wkt(feature["wkt"]), xs, ys)] = value
    return out


def test_format_of_the_fixture(xbd_root):
    label = json.loads(next((xbd_root / "train" / "labels").glob("*_post_disaster.json"))
                       .read_text())
    assert len(label["features"]["lng_lat"]) == len(label["features"]["xy"]) > 0
    assert {"disaster", "disaster_type", "gsd", "capture_date", "img_name", "width",
            "height"} <= set(label["metadata"])
    pre = json.loads(next((xbd_root / "train" / "labels").glob("*_pre_disaster.json"))
                     .read_text())
    assert all("subtype" not in f["properties"] for f in pre["features"]["xy"])
    assert len(list((xbd_root / "train" / "targets").glob("*_target.png"))) == 8


def test_rasterized_masks_match_point_in_polygon(xbd_root):
    dataset = XBDDataset(xbd_root, use_targets=False)
    assert len(dataset) == 4
    checked = 0
    for pair in dataset.pairs:
        mask, damage = dataset.maps(pair)
        expected_damage = independent_maps(pair.post_label, pair.size[0])
        expected_mask = independent_maps(pair.pre_label, pair.size[0]) > 0
        assert (damage != expected_damage).sum() <= 2  # only pixel centres exactly on an edge
        assert ((mask > 0) != expected_mask).sum() <= 2
        assert set(np.unique(damage)) <= {0, 1, 2, 3, 4, 255}
        checked += int((expected_damage > 0).sum())
    assert checked > 1000


def test_sample_keys_and_target_pngs_are_used(xbd_root, tmp_path):
    root = copy_root(xbd_root, tmp_path)
    item = XBDDataset(root)[0]
    assert item["image_t0"].shape == item["image_t1"].shape == (3, 128, 128)
    assert 0 <= item["image_t0"].min() and item["image_t0"].max() <= 1
    assert item["mask"].dtype == item["damage"].dtype
    assert item["damage"].max() > 1 and item["meta"]["disaster"].startswith("synthetic")
    # a target PNG, when present, is what the dataset returns
    target = sorted((root / "train" / "targets").glob("*_post_disaster_target.png"))[0]
    Image.fromarray(np.full((128, 128), 3, np.uint8)).save(target)
    assert (XBDDataset(root)[0]["damage"] == 3).all()
    assert (XBDDataset(root, use_targets=False)[0]["damage"] != 3).any()


def test_per_disaster_layout_and_tiles(xbd_root, tmp_path):
    for phase_file in (xbd_root / "train" / "images").glob("*.png"):
        disaster = phase_file.name.rsplit("_", 3)[0]
        for folder, name in (("images", phase_file.name),
                             ("labels", phase_file.name.replace(".png", ".json"))):
            dest = tmp_path / disaster / folder
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(xbd_root / "train" / folder / name, dest / name)
    pairs = scan_xbd(tmp_path)
    assert {p.group for p in pairs} == {"synthetic-flood", "synthetic-wildfire"}
    tiles = XBDTiles(tmp_path, image_size=64, tiles_per_pair=3, seed=1)
    assert len(tiles) == 12
    a, b = tiles[5], tiles[5]
    assert (a["image_t0"] == b["image_t0"]).all() and a["image_t0"].shape == (3, 64, 64)
    # consecutive indices (one batch) come from different files
    assert len({tiles[i]["meta"]["pair"] for i in range(4)}) == 4


def test_inspector_and_cli(xbd_root, tmp_path, capsys):
    summary = inspect_xbd(xbd_root)
    assert summary["pairs"] == 4 and summary["disasters"] == {"synthetic-flood": 2,
                                                             "synthetic-wildfire": 2}
    posts = [json.loads(p.read_text()) for p in
             (xbd_root / "train" / "labels").glob("*_post_disaster.json")]
    n_features = sum(len(p["features"]["xy"]) for p in posts)
    assert sum(c["instances"] for c in summary["classes"].values()) == n_features
    assert summary["classes"]["destroyed"]["pixels"] > 0
    assert main(["data", "synth", "xbd", "--out", str(tmp_path / "s"), "--n", "2"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "s"), "--format", "xbd"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 2


def test_corrupt_png_names_the_file(xbd_root, tmp_path):
    root = copy_root(xbd_root, tmp_path)
    bad = sorted((root / "train" / "images").glob("*_post_disaster.png"))[1]
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=bad.name):
        XBDTiles(root, image_size=64)
    with pytest.warns(UserWarning, match=bad.name):
        tiles = XBDTiles(root, image_size=64, skip_bad=True)
    assert len(tiles.pairs) == 3 and bad.name in tiles.skipped_samples[0]


def test_truncated_png_fails_when_read(xbd_root, tmp_path):
    root = copy_root(xbd_root, tmp_path)
    bad = sorted((root / "train" / "images").glob("*_pre_disaster.png"))[0]
    bad.write_bytes(bad.read_bytes()[:200])  # header intact, pixel data cut
    with pytest.raises(DataError, match=bad.name):
        XBDTiles(root, image_size=64, verify_images=True)
    tiles = XBDTiles(root, image_size=64)  # header-only check at index time
    with pytest.raises(DataError, match=bad.name):
        tiles[0]
    tiles = XBDTiles(root, image_size=64, skip_bad=True)
    with pytest.warns(UserWarning, match=bad.name):
        item = tiles[0]
    # counted once (ReadSkips: shared with DataLoader workers), not in the start-up list
    assert item["meta"]["pair"] not in bad.name and len(tiles.read_skips) == 1


def test_missing_post_and_size_mismatch(xbd_root, tmp_path):
    root = copy_root(xbd_root, tmp_path)
    images = root / "train" / "images"
    lonely = sorted(images.glob("*_post_disaster.png"))[0]
    pre = lonely.with_name(lonely.name.replace("_post_", "_pre_"))
    lonely.unlink()
    with pytest.raises(DataError, match=f"{pre.name}: pre-disaster image has no post"):
        scan_xbd(root)
    other = sorted(images.glob("*_post_disaster.png"))[0]
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(other)
    skipped = []
    with pytest.warns(UserWarning):
        pairs = scan_xbd(root, skip_bad=True, skipped=skipped)
    assert len(pairs) == 2 and len(skipped) == 2
    assert "sizes differ" in skipped[1] and other.name in skipped[1]


def test_invalid_wkt_names_the_label(xbd_root, tmp_path):
    root = copy_root(xbd_root, tmp_path)
    label = sorted((root / "train" / "labels").glob("*_post_disaster.json"))[0]
    data = json.loads(label.read_text())
    data["features"]["xy"][0]["wkt"] = "POLYGON ((1 2, 3"
    label.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"{label.name}: feature 0: invalid WKT"):
        XBDDataset(root)
    with pytest.warns(UserWarning):
        dataset = XBDDataset(root, skip_bad=True)
    assert len(dataset) == 3 and len(dataset.skipped_samples) == 1
