"""Bad data never trains silently (issue #14, item 5): each case writes the bad input on disk in
its real format, runs the real entry point and expects a clean one-line error, a correct skip
count or a warning, checked against values computed here independently of the loaders."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import from_origin

from densessl.cli import main
from densessl.data.decode import TinyImageWarning, decode_image
from densessl.data.geotiff import GeoTiffPairs
from densessl.data.geotiff_synth import write_raster
from densessl.data.image_folder import ImageFolder
from densessl.data.pidray import PIDray, read_image
from densessl.data.xbd import XBDDataset, inspect_xbd, read_rgb
from densessl.data.xbd_synth import synthesize_xbd
from densessl.errors import DataError, DensesslError, RecipeError
from densessl.workflows.pretraining import pretrain
from tests.reliability.helpers import SAME_IMAGE

UTM = CRS.from_epsg(32633)
PATTERN = r"(?P<place>[a-z]+)_(?P<date>\d{8})\.tif$"
TINY_RUN = ["train.batch_size=2", "train.max_steps=1", "train.num_workers=0",
            "data.image_size=32", "augment.view_size=32", "loss.dense.queue_size=64",
            "loss.global.queue_size=8", "model.split_bn_groups=1", "model.key_bn=batch"]


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# -- 1. 16-bit images are scaled by their bit depth, the same way in every loader --------------

def ramp16(h: int = 40, w: int = 48) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * (65535 // (h * w - 1))).astype(np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_images_scaled_not_clipped_in_every_loader(tmp_path, suffix):
    raw = ramp16()
    path = tmp_path / "folder" / f"a{suffix}"
    path.parent.mkdir()
    Image.fromarray(raw).save(path)
    assert Image.open(path).mode == "I;16"
    expected = raw.astype(np.float64) / 65535  # reference: the bit depth's full scale
    for channels in (1, 3):
        got = decode_image(path, channels)
        assert got.shape == (channels, *raw.shape)
        assert np.abs(got - expected).max() < 1e-6
    assert np.abs(read_image(path, 3) - expected).max() < 1e-6  # PIDray, SIXray, segment bank
    assert np.abs(read_rgb(path) - expected[..., None]).max() < 1e-6  # xBD
    # the folder source at the native short side: resize is the identity on a square crop
    item = ImageFolder(path.parent, image_size=40, channels=1)[0]["image"][0].double().numpy()
    assert np.abs(item - expected[:, 4:44]).max() < 1e-6
    # the old decoder saturated ~all of this ramp to 1.0
    assert (item >= 0.999).mean() < 0.01


def test_16bit_rgb_png_keeps_its_scale(tmp_path):
    import cv2

    raw = np.stack([ramp16(), ramp16()[::-1], ramp16()[:, ::-1]], -1)
    cv2.imwrite(str(tmp_path / "rgb.png"), raw[..., ::-1])  # cv2 writes BGR, 16-bit
    got = decode_image(tmp_path / "rgb.png", 3).transpose(1, 2, 0)
    assert np.abs(got - raw / 65535).max() <= 1 / 255 + 1e-6  # 8-bit precision, full scale


def test_float_image_outside_unit_range_is_an_error(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.full((8, 8), 300.0, np.float32), mode="F").save(path)
    with pytest.raises(DataError, match="f.tif.*outside"):
        decode_image(path)


# -- 2. min_valid is enforced for GeoTIFF windows ------------------------------------------------

def write_place(folder, place: str, valid: np.ndarray, dates=("20200101", "20200601")) -> None:
    """Two aligned 1-band uint16 dates; pixels outside ``valid`` are nodata (0)."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(len(place))
    for date in dates:
        data = rng.integers(100, 5000, valid.shape).astype(np.uint16)
        data[~valid] = 0
        write_raster(folder / f"{place}_{date}.tif", data[None], UTM,
                     from_origin(500000, 5000000, 10, 10), nodata=0)


def corner(size: int, side: int) -> np.ndarray:
    valid = np.zeros((size, size), bool)
    valid[:side, :side] = True
    return valid


def test_all_nodata_series_is_refused_up_front(tmp_path):
    write_place(tmp_path / "d", "aaa", corner(64, 0) | np.eye(64, dtype=bool))  # a diagonal
    with pytest.raises(DataError, match=r"aaa_20200101.tif and .*min_valid 0.5 \(at most 0.0"):
        GeoTiffPairs(str(tmp_path / "d"), image_size=32, channels=1, pattern=PATTERN,
                     cache_dir=str(tmp_path / "c"))
    # through the real entry point: one line, before training
    recipe = [f"data.path={tmp_path / 'd'}", "data.source=geotiff", "data.channels=1",
              "pairs.builder=temporal", f"data.options={{pattern: '{PATTERN}', "
              f"cache_dir: '{tmp_path / 'c'}'}}", *TINY_RUN]
    with pytest.raises(DataError, match="min_valid"):
        pretrain(SAME_IMAGE, tmp_path / "out", overrides=recipe)
    assert not (tmp_path / "out" / "encoder.pt").exists()


def test_windows_below_min_valid_error_or_skip_and_count(tmp_path):
    # place "bad": only a 32² corner of 128² is valid, so the bound passes (1024 px = one
    # window) but random windows almost never reach 0.9; place "good" is valid everywhere
    write_place(tmp_path / "d", "bad", corner(128, 32))
    write_place(tmp_path / "d", "good", np.ones((128, 128), bool))
    kw = dict(image_size=32, channels=1, pattern=PATTERN, min_valid=0.9, tries=2,
              tiles_per_pair=4, cache_dir=str(tmp_path / "c"))
    strict = GeoTiffPairs(str(tmp_path / "d"), **kw)
    assert [p.early.path.name[:3] for p in strict.pairs] == ["bad", "goo"]
    failed = 0
    for i in range(0, len(strict), 2):  # even items: the bad place
        try:
            item = strict[i]
        except DataError as exc:
            assert "bad_20200101.tif and" in str(exc) and "below data.options.min_valid 0.9" \
                in str(exc)
            failed += 1
            continue
        assert (item["valid_t0"] & item["valid_t1"]).double().mean() >= 0.9
    assert failed >= 1
    skipping = GeoTiffPairs(str(tmp_path / "d"), skip_bad=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = [skipping[i] for i in range(len(skipping))]
    for item in items:  # independent check on what is handed out: never below min_valid
        assert (item["valid_t0"] & item["valid_t1"]).double().mean() >= 0.9
    assert len(skipping.read_skips) == failed  # each failing item skipped and counted once


def test_truncated_geotiff_error_skip_and_check(tmp_path, capsys):
    write_place(tmp_path / "d", "aaa", np.ones((64, 64), bool))
    write_place(tmp_path / "d", "bbb", np.ones((64, 64), bool))
    bad = tmp_path / "d" / "bbb_20200601.tif"
    truncate(bad, 0.3)
    with rasterio.open(bad) as src:  # the header is still sound
        assert src.width == 64
    kw = dict(image_size=32, channels=1, pattern=PATTERN, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="bbb_20200601.tif: cannot read GeoTIFF"):
        GeoTiffPairs(str(tmp_path / "d"), **kw)
    with pytest.warns(UserWarning, match="bbb_20200601.tif"):
        ds = GeoTiffPairs(str(tmp_path / "d"), skip_bad=True, **kw)
    assert len(ds.pairs) == 1 and len(ds.skipped_samples) == 1
    out = one_line_error(capsys, ["data", "inspect", str(tmp_path / "d"), "--format", "geotiff",
                                  "--check"], code=1)
    assert "1 of 4 files" in out and "bbb_20200601.tif" in out


# -- 3. degenerate geometry is skipped and counted ----------------------------------------------

def test_xbd_linestring_and_out_of_image_buildings_skipped_and_counted(tmp_path):
    root = synthesize_xbd(tmp_path / "xbd", n=2, size=64)
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    label = sorted(root.rglob("*_post_disaster.json"))[0]
    data = json.loads(label.read_text())
    for wkt in ("LINESTRING (1 1, 30 30)", "POLYGON ((200 200, 210 200, 210 210, 200 210, "
                "200 200))", "POLYGON ((10.1 10.1, 10.3 10.1, 10.3 10.3, 10.1 10.1))"):
        data["features"]["xy"].append({"wkt": wkt, "properties": {
            "feature_type": "building", "subtype": "destroyed", "uid": wkt[:8]}})
    label.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="skipped 3 buildings that cover no pixel"):
        ds = XBDDataset(root, use_targets=False)
    ref = XBDDataset(clean, use_targets=False)
    assert len(ds.degenerate_shapes) == 3
    for i in range(len(ds)):  # the rasters are those of the unmodified labels
        assert torch.equal(ds[i]["damage"], ref[i]["damage"])
    report, before = inspect_xbd(root), inspect_xbd(clean)
    assert report["buildings_without_pixels"] == 3 and before["buildings_without_pixels"] == 0
    assert report["classes"] == before["classes"]  # no destroyed building without pixels


def write_pidray(root, polygons: list[list[float]], size: int = 96) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(root / "train" / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": size, "width": size}],
            "categories": [{"id": 1, "name": "Gun"}],
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": [poly]} for k, poly in enumerate(polygons)]}
    (root / "annotations" / "xray_train.json").write_text(json.dumps(coco))


def test_pidray_zero_area_masks_error_or_skip(tmp_path):
    good = [10, 10, 60, 10, 60, 60, 10, 60]
    outside = [200, 200, 220, 200, 220, 220]
    write_pidray(tmp_path / "p", [good, outside])
    with pytest.raises(DataError, match="annotation id 2.*covers no pixel"):
        PIDray(tmp_path / "p")
    with pytest.warns(UserWarning, match="annotation id 2"):
        ds = PIDray(tmp_path / "p", skip_bad=True)
    # the image with a dropped annotation is dropped too (it would teach background there)
    assert len(ds) == 0 and len(ds.skipped_samples) == 1


def test_pidray_instance_resized_away_is_dropped_and_counted(tmp_path):
    big, speck = [8, 8, 80, 8, 80, 80, 8, 80], [50, 50, 51, 50, 51, 51, 50, 51]
    write_pidray(tmp_path / "p", [big, speck], size=96)
    item = PIDray(tmp_path / "p", image_size=32)[0]
    boxes = item["boxes"]
    assert len(boxes) == 1 and item["meta"]["dropped_instances"] == 1
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


# -- 4. tiny images warn --------------------------------------------------------------------

def test_tiny_image_warns_with_its_name(tmp_path):
    (tmp_path / "f").mkdir()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "f" / "dot.png")
    with pytest.warns(TinyImageWarning, match=r"dot.png: image is 1×1 px"):
        ImageFolder(tmp_path / "f", image_size=64)[0]
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "f" / "dot.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TinyImageWarning)
        ImageFolder(tmp_path / "f", image_size=64)[0]  # no warning at the native size


# -- 5. cross-field recipe checks before any work ----------------------------------------------

def test_view_larger_than_image_and_empty_source_are_one_line(capsys, tmp_path):
    err = one_line_error(capsys, ["recipe", SAME_IMAGE, "--set", "data.image_size=32",
                                  "--set", "augment.view_size=64"])
    assert "augment.view_size 64 is larger than data.image_size 32" in err
    with pytest.raises(DensesslError, match="num_images >= 1.*got 0"):
        pretrain(SAME_IMAGE, tmp_path / "o", overrides=[*TINY_RUN, "data.options.num_images=0"])


@pytest.mark.parametrize("arch", ["fpn", "unet", "deeplabv3plus"])
def test_finetune_image_size_check_matches_smp(arch, one_thread):
    from densessl.eval.segmentation import build_segmentation_model, check_input_size
    from densessl.recipe import load_recipe

    model = build_segmentation_model(arch, "resnet18", 3, 2).eval()
    for size in (48, 64, 80):
        recipe = load_recipe(SAME_IMAGE, [f"finetune.image_size={size}",
                                          f"finetune.segmentation_archs=[{arch}]",
                                          "finetune.inits=[random]"])
        try:  # the reference: does smp's model itself accept the size?
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            accepted = True
        except RuntimeError:
            accepted = False
        if accepted:
            check_input_size(recipe)
        else:
            with pytest.raises(RecipeError, match=f"finetune.image_size: {size} is not a "
                                                  f"multiple of 32.*{arch}"):
                check_input_size(recipe)


def test_run_refuses_bad_finetune_size_before_pretraining(capsys, tmp_path):
    err = one_line_error(capsys, ["run", SAME_IMAGE, "--out", str(tmp_path / "r"),
                                  "--set", "finetune.image_size=48"])
    assert "finetune.image_size: 48 is not a multiple of 32" in err
    assert not (tmp_path / "r" / "pretrain").exists()


def test_num_classes_below_cut_paste_ids_refused_before_training(tmp_path):
    from densessl.recipe import load_recipe
    from densessl.workflows.pretraining import check_class_ids

    class Builder:  # what a cut-paste builder over a PIDray bank reports
        def label_ids(self):
            return {1, 5, 12}

    ok = load_recipe(SAME_IMAGE, ["loss.queue=per_class", "loss.num_classes=13"])
    check_class_ids(ok, Builder())
    low = load_recipe(SAME_IMAGE, ["loss.queue=per_class", "loss.num_classes=12"])
    with pytest.raises(RecipeError, match=r"loss.num_classes: 12, .*ids up to 12.*>= 13"):
        check_class_ids(low, Builder())
    check_class_ids(load_recipe(SAME_IMAGE, ["loss.num_classes=2"]), Builder())  # one queue


def test_cut_paste_reports_the_bank_ids(tmp_path):
    from densessl.pairs.cut_paste import CutPastePairs

    segs = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8),
             "mask": torch.ones(4, 4, dtype=torch.bool), "label": c} for c in (3, 12, 7)]
    bgs = [{"image": torch.zeros(3, 32, 32)}] * 2
    assert CutPastePairs(segments=segs, backgrounds=bgs, image_size=32).label_ids() == {3, 7, 12}
    only = CutPastePairs(segments=segs, backgrounds=bgs, image_size=32, classes=[7], k=1)
    assert only.label_ids() == {7}


# -- 6. skip_bad really skips and counts; data inspect --check finds truncated files ----------

def folder_with_bad_files(root, n: int = 6):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "x.jpg")
    truncate(root / "0.png")
    truncate(root / "x.jpg")


def test_inspect_check_reports_truncated_png_and_jpeg(tmp_path, capsys):
    folder_with_bad_files(tmp_path / "f")
    assert main(["data", "inspect", str(tmp_path / "f"), "--format", "folder"]) == 0
    capsys.readouterr()  # headers only: the plain inspect cannot tell
    err = one_line_error(capsys, ["data", "inspect", str(tmp_path / "f"), "--format", "folder",
                                  "--check"], code=1)
    assert "2 of 7 files cannot be decoded" in err
    (tmp_path / "f" / "0.png").unlink()
    (tmp_path / "f" / "x.jpg").unlink()
    assert main(["data", "inspect", str(tmp_path / "f"), "--format", "folder", "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["check"] == {"files": 5, "bad": []}


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_bad_skips_truncated_files_and_counts_them(tmp_path, workers, one_thread):
    folder_with_bad_files(tmp_path / "f")
    args = [*TINY_RUN, "data.source=folder", f"data.path={tmp_path / 'f'}", "data.options={}",
            f"train.num_workers={workers}", "train.max_steps=4"]
    with pytest.raises(DataError, match=r"(0.png|x.jpg): cannot read image"):
        pretrain(SAME_IMAGE, tmp_path / "strict", overrides=args)
    with warnings.catch_warnings(record=True) as caught:  # a worker warns on its own stderr
        warnings.simplefilter("always")
        metrics = pretrain(SAME_IMAGE, tmp_path / "skip", overrides=[*args, "data.skip_bad=true"])
    if workers == 0:
        assert any("skipping: " in str(w.message) and "0.png" in str(w.message) for w in caught)
    # 4 steps of 2 draw every file of the first seeded permutation of 7: both bad ones
    saved = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert metrics["skipped_samples"] == saved["skipped_samples"] == 2


def test_worker_errors_print_their_own_line():
    from torch._utils import ExceptionWrapper

    from densessl.cli import _one_line

    try:
        raise DataError("/data/x.jpg: cannot read image (truncated)")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as info:
        wrapped.reraise()
    assert "Original Traceback" in str(info.value)  # what torch hands back
    assert _one_line(info.value) == "/data/x.jpg: cannot read image (truncated)"
