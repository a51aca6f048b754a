"""geotiff_masks: labels reprojected from another CRS agree with a per-pixel reference, 12-bit
scaling, nodata, spatially disjoint seeded splits, a linear probe that finds aligned labels and
loses shifted ones, and an error naming the file for each bad input. Fixtures are written with
rasterio here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin
from rasterio.warp import transform, transform_bounds
from scipy import ndimage

from densessl.cli import main
from densessl.data.labeled.build import build_eval_dataset
from densessl.data.labeled.geotiff_masks import inspect_geotiff_masks
from densessl.errors import DataError

UTM, WGS84 = CRS.from_epsg(32633), CRS.from_epsg(4326)
RES, S = 10.0, 32
ORIGIN = (500000.0, 5000000.0)


def write(path, array, crs, tf, nodata=None):
    """A GeoTIFF of a C×H×W (or H×W) array."""
    array = array[None] if array.ndim == 2 else array
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", count=array.shape[0], height=array.shape[1],
                       width=array.shape[2], dtype=array.dtype.name, crs=crs, transform=tf,
                       nodata=nodata) as dst:
        dst.write(array)


def build(root, channels=4, seed=0, **options):
    return build_eval_dataset("geotiff_masks", options, path=str(root), image_size=S,
                              channels=channels, seed=seed)


def items(data):
    """(split, index, stem, window) of every item of every split."""
    splits = {"train": data.train, "val": data.val, **data.test}
    return [(name, i, *split.window(i)) for name, split in splits.items()
            for i in range(len(split))]


# --- reprojection, nodata and bit depth ------------------------------------------------------

def utm_scene(rng, size, offset):
    """4-band uint16 12-bit scene with a nodata (0) frame and a patch where band 3 alone is 0."""
    x0, y0 = ORIGIN[0] + offset[0], ORIGIN[1] + offset[1]
    tf = from_origin(x0, y0, RES, RES)
    data = rng.integers(1, 4096, (4, size, size)).astype(np.uint16)
    data[:, :6], data[:, -6:], data[:, :, :6], data[:, :, -6:] = 0, 0, 0, 0  # nodata frame
    data[2, 40:44, 50:60] = 0  # nodata on one band only: the pixel is still nodata
    data[0, 20, 20], data[1, 20, 21], data[3, 21, 20] = 4095, 1000, 1
    return data, tf


def wgs_mask(rng, scene_tf, size, nudge):
    """Class ids 0..4 on an EPSG:4326 grid of another resolution over the middle of the scene
    (not all of it), with a few nodata (200) cells; ``nudge`` moves its origin by a fraction
    of a cell (to place no scene pixel centre on a cell edge)."""
    left, bottom, right, top = transform_bounds(UTM, WGS84, scene_tf.c, scene_tf.f - size * RES,
                                                scene_tf.c + size * RES, scene_tf.f)
    res_x, res_y = 0.0000871, 0.0000713
    tf = from_origin(left + 0.17 * (right - left) + nudge * res_x,
                     top - 0.14 * (top - bottom) - nudge * res_y, res_x, res_y)
    w = int(0.7 * (right - left) / res_x)
    h = int(0.75 * (top - bottom) / res_y)
    mask = rng.integers(0, 5, (h, w)).astype(np.uint8)
    mask[rng.random((h, w)) < 0.03] = 200
    return mask, tf


def reference_labels(mask, mask_tf, scene_tf, size, nodata=200):
    """Independent per-pixel nearest lookup: each scene pixel centre → x, y → EPSG:4326
    (``rasterio.warp.transform``) → mask pixel (floor); outside the mask or nodata → 255.
    Also how close the lookups inside or next to the mask come to a cell edge (mask pixels)."""
    rows, cols = np.mgrid[0:size, 0:size]
    xs, ys = scene_tf @ (cols.ravel() + 0.5, rows.ravel() + 0.5)
    lon, lat = transform(UTM, WGS84, xs, ys)
    mc, mr = ~mask_tf @ (np.asarray(lon), np.asarray(lat))
    i, j = np.floor(mr).astype(int), np.floor(mc).astype(int)
    h, w = mask.shape
    inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
    out = np.full(size * size, 255, np.int64)
    out[inside] = mask[i[inside], j[inside]]
    out[out == nodata] = 255
    near = (i >= -1) & (i <= h) & (j >= -1) & (j <= w)
    edge = np.minimum(np.abs(mc - np.round(mc)), np.abs(mr - np.round(mr)))[near]
    return out.reshape(size, size), float(edge.min())


@pytest.fixture(scope="module")
def reprojected(tmp_path_factory):
    """Two 128-px UTM scenes with EPSG:4326 masks (a: nodata 200 cells; b: no nodata value,
    255 cells); splits/ puts one in train, one in test."""
    root = tmp_path_factory.mktemp("reproj")
    rng = np.random.default_rng(0)
    truth = {}
    for stem, offset in (("a", (0.0, 0.0)), ("b", (3000.0, -1500.0))):
        scene, scene_tf = utm_scene(rng, 128, offset)
        for nudge in np.linspace(0.0, 0.5, 26):
            mask, mask_tf = wgs_mask(np.random.default_rng(len(truth)), scene_tf, 128, nudge)
            labels, edge = reference_labels(mask, mask_tf, scene_tf, 128)
            if edge > 2e-5:  # no lookup within 2e-5 mask pixel of a cell edge (GDAL: 1e-6)
                break
        write(root / "scenes" / f"{stem}.tif", scene, UTM, scene_tf, nodata=0)
        if stem == "b":  # no nodata value: coverage comes from the warp, 255 is ignore
            mask[mask == 200] = 255
        write(root / "masks" / f"{stem}.tif", mask, WGS84, mask_tf,
              nodata=200 if stem == "a" else None)
        labels[(scene == 0).any(0)] = 255  # scene nodata on any band
        truth[stem] = (scene, labels, edge)
    (root / "classes.txt").write_text("background\nfield\nforest\nwater\nurban\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\n")
    (root / "splits" / "test.txt").write_text("b\n")
    return root, truth


def test_labels_from_another_crs_match_a_per_pixel_reference(reprojected):
    root, truth = reprojected
    data = build(root, max_nodata=1.0)
    assert data.split_record["method"] == "files"
    assert data.split_record["train"] == ["a"] and data.split_record["test"] == ["b"]
    assert data.class_names == ["background", "field", "forest", "water", "urban"]
    seen = {"a": 0, "b": 0}
    # no scene pixel centre lies within 2e-5 mask pixel of a cell edge: none is ambiguous
    assert all(edge > 2e-5 for _, _, edge in truth.values())
    for name, i, stem, window in items(data):
        split = data.test["test"] if name == "test" else getattr(data, name)
        r0, c0 = window.row_off, window.col_off
        expected = truth[stem][1][r0:r0 + S, c0:c0 + S]
        got = split[i]["mask"].numpy()
        assert (got == expected).all(), (stem, window, int((got != expected).sum()))
        seen[stem] += 1
    # every window with a labelled pixel is used (max_nodata 1.0), the others are not
    for stem, (_, labels, _) in truth.items():
        blocks = labels.reshape(4, S, 4, S).transpose(0, 2, 1, 3)
        assert seen[stem] == int((blocks != 255).any((2, 3)).sum())
    # the mask covers part of the scene only and has nodata cells: ignore is present
    assert all((t[1] == 255).mean() > 0.2 for t in truth.values())
    # each split yields all the sample keys; detection targets come from the mask
    sample = data.train[5]
    assert sample["image"].shape == (4, S, S) and sample["mask"].dtype.is_floating_point is False
    assert set(data.keys) == {"image", "mask", "boxes", "labels", "instance_masks"}
    assert all(1 <= int(lab) <= 4 for lab in sample["labels"])
    assert data.cards[0]["name"] == str(root)


def test_twelve_bit_scenes_scale_by_4095_and_nodata_is_zero(reprojected):
    root, truth = reprojected
    data = build(root, max_nodata=1.0)
    assert data.bit_depth == 12  # auto: 16-bit storage, largest value 4095
    scene = truth["a"][0]
    index = next(i for name, i, stem, w in items(data)
                 if name == "train" and (w.row_off, w.col_off) == (0, 0))
    image = data.train[index]["image"]
    assert image.dtype.is_floating_point and image.shape == (4, S, S)
    assert float(image[0, 20, 20]) == pytest.approx(1.0, abs=1e-7)
    assert float(image[1, 20, 21]) == pytest.approx(1000 / 4095, rel=1e-6)
    assert float(image[3, 21, 20]) == pytest.approx(1 / 4095, rel=1e-6)
    expected = np.where((scene[:, :S, :S] == 0).any(0), 0.0, scene[:, :S, :S] / 4095.0)
    np.testing.assert_allclose(image.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert (image[:, :6] == 0).all() and (image[:, 40:44, 50:60] == 0).all()  # band 3 nodata
    assert (data.train[index]["mask"][40:44, 50:60] == 255).all()
    # an explicit depth overrides auto; a too-small one is an error naming a scene
    wide = build(root, max_nodata=1.0, bit_depth=16)
    assert wide.bit_depth == 16
    assert float(wide.train[index]["image"][0, 20, 20]) == pytest.approx(4095 / 65535, rel=1e-6)
    with pytest.raises(DataError, match=r"scenes/a\.tif: pixel values 1\.\.4095.*10 bits"):
        build(root, max_nodata=1.0, bit_depth=10)
    # bands pick (and order) scene bands; channels must match their number
    two = build(root, channels=2, max_nodata=1.0, bands=[2, 1])
    assert float(two.train[index]["image"][0, 20, 21]) == pytest.approx(1000 / 4095, rel=1e-6)


# --- splits ----------------------------------------------------------------------------------

def aligned_scene(root, stem, size, rng, offset=(0.0, 0.0), classes=3):
    tf = from_origin(ORIGIN[0] + offset[0], ORIGIN[1] + offset[1], RES, RES)
    write(root / "scenes" / f"{stem}.tif",
          rng.integers(0, 256, (4, size, size)).astype(np.uint8), UTM, tf)
    write(root / "masks" / f"{stem}.tif",
          rng.integers(0, classes, (size, size)).astype(np.uint8), UTM, tf)


def test_blocks_are_spatially_disjoint_seeded_and_recorded(tmp_path):
    rng = np.random.default_rng(1)
    for stem in ("p", "q"):  # two scenes: auto picks blocks
        aligned_scene(tmp_path, stem, 256, rng, offset=(0.0, 5000.0 * (stem == "q")))
    data = build(tmp_path, block_size=2, seed=3)
    record = data.split_record
    assert record["method"] == "blocks" and record["seed"] == 3 and record["block_size"] == 2
    assert data.bit_depth == 8
    where = {}
    for name, _, stem, w in items(data):
        cell = (stem, w.row_off // S, w.col_off // S)
        assert cell not in where  # no window in two splits
        where[cell] = name
        assert f"{stem}:{cell[1] // 2}:{cell[2] // 2}" in record[name]  # its block is listed
    assert set(record["train"]).isdisjoint(record["val"] + record["test"])
    assert set(record["val"]).isdisjoint(record["test"])
    assert len(record["test"]) >= 1 and len(record["val"]) >= 1
    # no train window shares or touches (edge or corner) a block of val or test
    held = {(b.split(":")[0], int(b.split(":")[1]), int(b.split(":")[2]))
            for b in record["val"] + record["test"]}
    for (stem, r, c), name in where.items():
        if name != "train":
            continue
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                assert (stem, (r + dr) // 2, (c + dc) // 2) not in held, (stem, r, c)
    assert record["dropped_train_windows"] > 0
    assert sum(record["windows"].values()) + record["dropped_train_windows"] == 2 * 64
    assert data.eval_splits().keys() == {"test"}
    # the same seed repeats the split, another seed changes it
    assert build(tmp_path, block_size=2, seed=3).split_record == record
    assert build(tmp_path, block_size=2, seed=4).split_record["test"] != record["test"]


def test_scene_split_keeps_scenes_whole_seeded_and_recorded(tmp_path):
    rng = np.random.default_rng(2)
    stems = ["s0", "s1", "s2", "s3", "s4"]
    for k, stem in enumerate(stems):
        aligned_scene(tmp_path, stem, 96, rng, offset=(2000.0 * k, 0.0))
    data = build(tmp_path, seed=7)
    record = data.split_record
    assert record["method"] == "scenes" and record["seed"] == 7
    assert sorted(record["train"] + record["val"] + record["test"]) == stems
    assert len(record["val"]) == 1 and len(record["test"]) == 1
    for name, _, stem, _ in items(data):
        assert stem in record[name]
    assert record["windows"] == {"train": 27, "val": 9, "test": 9}
    assert build(tmp_path, seed=7).split_record == record
    others = [build(tmp_path, seed=s).split_record["test"] for s in range(8)]
    assert len({tuple(t) for t in others}) > 1
    # test_fraction 0: val is what results report
    no_test = build(tmp_path, seed=7, test_fraction=0.0)
    assert no_test.test == {} and list(no_test.eval_splits()) == ["val"]


def test_class_values_remap_raw_ids_and_names(tmp_path):
    tf = from_origin(*ORIGIN, RES, RES)
    write(tmp_path / "scenes" / "w.tif", np.full((4, 64, 64), 100, np.uint8), UTM, tf)
    raw = np.full((64, 64), 10, np.uint8)
    raw[:, 32:] = 80
    raw[56:, :] = 255  # the ignore convention
    write(tmp_path / "masks" / "w.tif", raw, UTM, tf)
    data = build(tmp_path, split="blocks", block_size=1, buffer=0, val_fraction=0.25,
                 test_fraction=0.25, class_values=[10, 30, 80])
    assert data.class_names == ["class_10", "class_30", "class_80"]
    masks = {(w.row_off, w.col_off): split[i]["mask"]
             for name, i, _, w in items(data)
             for split in [data.test["test"] if name == "test" else getattr(data, name)]}
    assert (masks[(0, 0)] == 0).all() and (masks[(0, 32)] == 2).all()
    assert (masks[(32, 0)][24:] == 255).all() and (masks[(32, 0)][:24] == 0).all()
    with pytest.raises(DataError, match=r"masks/w\.tif: mask values \[80\].*class_values"):
        build(tmp_path, split="blocks", block_size=1, buffer=0, class_values=[10, 30])


# --- the alignment test ----------------------------------------------------------------------

def blob_field(rng, size, sigma=4.0):
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (field - field.mean()) / field.std()


def write_alignment_fixture(root, shift_px):
    """Eight 128-px 12-bit scenes of four independent blob fields; class 1 where band 1 is high
    (a third of the pixels). Each mask raster is that function of a 192-px field whose middle
    is the scene, written with its transform moved ``shift_px`` pixels east: 0 aligns it, 16
    (half a window) decorrelates it from the pixels (blob correlation length ~6 px; the
    autocorrelation at a 16 px lag is exp(-16²/(4·4²)) ≈ 0.02)."""
    rng = np.random.default_rng(5)
    for k in range(8):
        fields = [blob_field(rng, 192) for _ in range(4)]
        scene = np.stack([np.clip(2048 + 600 * f[32:160, 32:160], 1, 4095) for f in fields])
        x0, y0 = ORIGIN[0] + 4000.0 * k, ORIGIN[1]
        write(root / "scenes" / f"t{k}.tif", scene.astype(np.uint16), UTM,
              from_origin(x0, y0, RES, RES), nodata=0)
        labels = (fields[0] > 0.5).astype(np.uint8)
        write(root / "masks" / f"t{k}.tif", labels, UTM,
              from_origin(x0 - 32 * RES + shift_px * RES, y0 + 32 * RES, RES, RES))


def probe_scores(root, out):
    """mIoU of a frozen random-init encoder's linear probe and of the floor (the train split's
    majority class everywhere), through ``densessl finetune``'s workflow."""
    from densessl.workflows.experiment import finetune

    recipe = {"data": {"channels": 4},
              "finetune": {"dataset": "geotiff_masks", "path": str(root), "image_size": S,
                           "inits": ["random"], "tasks": ["linear_probe"], "seeds": [0],
                           "probe_steps": 150, "probe_levels": ["c2"],
                           "probe_pixels_per_image": 1024, "num_threads": 1}}
    results = finetune(recipe, None, out, log=lambda *a: None)
    key = "linear_probe@100%"
    return results["random"][key]["mIoU"], results["floor"][key]["mIoU"]


def test_probe_finds_aligned_labels_and_loses_shifted_ones(tmp_path):
    write_alignment_fixture(tmp_path / "aligned", 0)
    write_alignment_fixture(tmp_path / "shifted", S // 2)
    aligned, floor = probe_scores(tmp_path / "aligned", tmp_path / "out_a")
    shifted, floor_s = probe_scores(tmp_path / "shifted", tmp_path / "out_s")
    print(f"aligned mIoU {aligned:.3f} (floor {floor:.3f}); shifted {shifted:.3f} "
          f"(floor {floor_s:.3f})")
    assert aligned > floor + 0.25
    assert shifted < floor_s + 0.08
    runs = json.loads((tmp_path / "out_a" / "runs.json").read_text())
    assert runs["datasets"][0]["name"] == str(tmp_path / "aligned")


# --- errors ----------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    """One aligned 64-px scene + mask (uint16 12-bit, classes 0..2)."""
    tf = from_origin(*ORIGIN, RES, RES)
    rng = np.random.default_rng(3)
    write(tmp_path / "scenes" / "x.tif", rng.integers(1, 4096, (4, 64, 64)).astype(np.uint16),
          UTM, tf, nodata=0)
    write(tmp_path / "masks" / "x.tif", rng.integers(0, 3, (64, 64)).astype(np.uint8), UTM, tf)
    return tmp_path, tf


def test_unpaired_files_name_the_stem(small):
    root, tf = small
    write(root / "scenes" / "lonely.tif", np.ones((4, 64, 64), np.uint16), UTM, tf)
    with pytest.raises(DataError, match=r"no mask for scene\(s\) \['lonely'\].*lonely\.tif"):
        build(root)
    (root / "scenes" / "lonely.tif").unlink()
    write(root / "masks" / "orphan.tif", np.ones((64, 64), np.uint8), UTM, tf)
    with pytest.raises(DataError, match=r"no scene for mask\(s\) \['orphan'\].*orphan\.tif"):
        build(root)


def test_mask_outside_its_scene_is_an_error(small):
    root, _ = small
    far = from_origin(16.5, 46.0, 0.0001, 0.0001)  # EPSG:4326, ~50 km east of the scene
    write(root / "masks" / "x.tif", np.ones((64, 64), np.uint8), WGS84, far)
    with pytest.raises(DataError, match=r"masks/x\.tif: the mask does not overlap its scene"):
        build(root)


def test_all_nodata_scene_and_no_usable_window_name_the_scene(small):
    root, tf = small
    write(root / "scenes" / "x.tif", np.zeros((4, 64, 64), np.uint16), UTM, tf, nodata=0)
    with pytest.raises(DataError, match=r"scenes/x\.tif: every pixel .* is nodata"):
        build(root)
    scene = np.full((4, 64, 64), 7, np.uint16)
    scene[:, :, :40] = 0  # 40 of 64 columns nodata: every window is at least 25 % nodata
    scene[:, :32, :] = 0  # the top row of windows is all nodata
    write(root / "scenes" / "x.tif", scene, UTM, tf, nodata=0)
    with pytest.raises(DataError, match=r"scenes/x\.tif: no 32x32 window .*max_nodata 0\.1.*"
                                        r"0\.250"):
        build(root, max_nodata=0.1)


def test_bad_bands_ids_and_channels_name_the_file(small):
    root, _ = small
    with pytest.raises(DataError, match=r"scenes/x\.tif: finetune\.options\.bands .*\[5\] out of"):
        build(root, channels=2, bands=[1, 5])
    with pytest.raises(DataError, match=r"data\.channels is 3 but 4 bands .*scenes/x\.tif"):
        build(root, channels=3)
    (root / "classes.txt").write_text("background\nroad\n")
    with pytest.raises(DataError, match=r"masks/x\.tif: class id 2 but .*classes\.txt names 2"):
        build(root)


def test_float_scenes_outside_unit_range_need_scale(small):
    root, tf = small
    scene = np.full((4, 64, 64), 2500.0, np.float32)
    scene[1, :4, :] = np.nan  # NaN on one band is nodata
    write(root / "scenes" / "x.tif", scene, UTM, tf)
    with pytest.raises(DataError, match=r"scenes/x\.tif: float pixel values 2500\.\.2500.*scale"):
        build(root, split="blocks", block_size=1, buffer=0)
    data = build(root, split="blocks", block_size=1, buffer=0, scale=10000.0)
    assert data.bit_depth is None
    for name, i, _, w in items(data):
        sample = (data.test["test"] if name == "test" else getattr(data, name))[i]
        top = w.row_off == 0
        assert float(sample["image"][:, 4:].min()) == pytest.approx(0.25)
        assert (sample["image"][:, :4] == (0 if top else 0.25)).all()
        assert (sample["mask"][:4] == 255).all() == top
    write(root / "scenes" / "x.tif", np.full((4, 64, 64), 0.3, np.float32), UTM, tf)
    reflectance = build(root, split="blocks", block_size=1, buffer=0)  # in [0, 1]: as is
    assert float(reflectance.train[0]["image"][0, 0, 0]) == pytest.approx(0.3)


def test_items_read_alike_in_dataloader_workers(reprojected):
    """Scene handles are opened per process: forked workers read what the parent reads."""
    import pickle

    from torch.utils.data import DataLoader

    root, _ = reprojected
    data = build(root, max_nodata=1.0)
    data.train[0]  # the parent opens its handles before the workers fork
    direct = [data.train[i]["image"] for i in range(len(data.train))]
    loader = DataLoader(data.train, batch_size=None, num_workers=2,
                        collate_fn=lambda s: s["image"])
    loaded = list(loader)
    assert len(loaded) == len(direct) and all((a == b).all() for a, b in zip(direct, loaded))
    copy = pickle.loads(pickle.dumps(data.train))  # spawned workers: no handle travels
    assert (copy[3]["image"] == direct[3]).all()
    assert (copy[3]["mask"] == data.train[3]["mask"]).all()


def test_data_inspect_reports_pairs_and_problems(reprojected, capsys, tmp_path):
    root, _ = reprojected
    assert main(["data", "inspect", str(root), "--format", "geotiff_masks"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 2 and summary["crs"] == ["EPSG:32633"]
    assert summary["mask_crs"] == ["EPSG:4326"] and summary["band_count"] == [4]
    assert summary["splits"] == {"train": 1, "test": 1} and summary["problems"] == []
    write(tmp_path / "scenes" / "z.tif", np.ones((4, 8, 8), np.uint16), UTM,
          Affine(RES, 0, 0, 0, -RES, 0))
    assert "no mask for scene(s) ['z']" in inspect_geotiff_masks(tmp_path)["problems"][0]
