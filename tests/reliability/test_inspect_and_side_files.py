"""Issue 27 (reliability): ``data inspect --check`` refuses what the loaders refuse, side files
next to an encoder are read strictly, loaded files never unpickle code, and a shared segment
cache is keyed and validated.

Every fixture is written on disk in the real format (GeoTIFFs with rasterio, a PIDray / COCO
JSON with PNGs, an encoder as pretraining writes it) and the real CLI runs on it
(``densessl.cli.main`` + capsys): a refusal is exit != 0 and one ``error:`` line naming the
culprit file, with no traceback and no partial output file.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import from_origin

from densessl.cli import main
from densessl.data.geotiff import GeoTiffPairs
from densessl.data.geotiff_synth import write_raster
from densessl.data.pidray import PIDray
from densessl.data.segment_bank import SegmentBank
from densessl.errors import DataError, DensesslError
from densessl.io import save_torch, write_json
from densessl.models import DenseEncoder
from densessl.models.weights import load_encoder_file
from densessl.workflows.resume import describe_run, read_checkpoint

UTM = CRS.from_epsg(32633)
PLACE_PATTERN = r"(?P<place>[a-z]+)_(?P<date>\d{8})\.tif$"


def one_error_line(err: str) -> str:
    """The single ``error:`` line a refusal prints (no traceback, nothing else)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def inspect_check(root, fmt, capsys, *extra) -> tuple[int, dict, str]:
    capsys.readouterr()
    rc = main(["data", "inspect", str(root), "--format", fmt, "--check", *extra])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out), captured.err


# --- data inspect --check: GeoTIFF series ------------------------------------------------------


def _raster(path, valid=True, size=96, origin=(500000.0, 5000000.0), bands=3):
    data = np.random.default_rng(0).random((bands, size, size)).astype(np.float32)
    if not valid:
        data[:] = -9999
    write_raster(path, data, UTM, from_origin(*origin, 10, 10), nodata=-9999)


def test_geotiff_check_refuses_an_all_nodata_date_as_pretraining_does(tmp_path, capsys):
    root = tmp_path / "series"
    root.mkdir()
    _raster(root / "farm_20200101.tif")
    _raster(root / "farm_20210101.tif", valid=False)  # every pixel nodata
    with pytest.raises(DataError, match="farm_20210101.tif"):  # what pretraining does
        GeoTiffPairs(str(root), image_size=64, channels=3,
                     stats_path=str(tmp_path / "s.json"))
    rc, report, err = inspect_check(root, "geotiff", capsys)
    line = one_error_line(err)
    assert rc == 1 and "farm_20210101.tif" in line and "all nodata" in line
    assert any("farm_20210101.tif" in r for r in report["check"]["refused"])
    # the check writes nothing (its band statistics go to a temporary file)
    assert sorted(p.name for p in root.iterdir()) == ["farm_20200101.tif", "farm_20210101.tif"]


def test_geotiff_check_refuses_dates_that_do_not_overlap(tmp_path, capsys):
    _raster(tmp_path / "farm_20200101.tif")
    _raster(tmp_path / "farm_20210101.tif")
    _raster(tmp_path / "lake_20200101.tif", origin=(600000.0, 5000000.0))
    _raster(tmp_path / "lake_20210101.tif", origin=(700000.0, 5000000.0))  # 100 km east
    with pytest.raises(DataError, match="do not overlap"):
        GeoTiffPairs(str(tmp_path), image_size=64, channels=3, pattern=PLACE_PATTERN,
                     stats_path=str(tmp_path / "s.json"))
    rc, report, err = inspect_check(tmp_path, "geotiff", capsys,
                                    "--option", f"pattern={PLACE_PATTERN}")
    line = one_error_line(err)
    assert rc == 1 and "lake_20200101.tif and" in line and "do not overlap" in line
    assert len(report["check"]["refused"]) == 1


def test_geotiff_check_counts_every_pixel_of_a_large_all_nodata_date(tmp_path, capsys):
    """Above 256 px the source samples a raster's nodata, so it builds; each window of the pair
    is refused when read. The check counts every pixel and refuses it up front."""
    _raster(tmp_path / "farm_20200101.tif", size=320)
    _raster(tmp_path / "farm_20210101.tif", valid=False, size=320)
    dataset = GeoTiffPairs(str(tmp_path), image_size=64, channels=3,
                           stats_path=str(tmp_path / "s.json"))
    with pytest.raises(DataError, match="below data.options.min_valid"):
        dataset[0]
    rc, _, err = inspect_check(tmp_path, "geotiff", capsys)
    line = one_error_line(err)
    assert rc == 1 and "farm_20210101.tif: every pixel is nodata" in line


def test_geotiff_check_names_the_files_of_different_band_counts(tmp_path, capsys):
    _raster(tmp_path / "farm_20200101.tif", bands=3)
    _raster(tmp_path / "farm_20210101.tif", bands=4)
    rc, _, err = inspect_check(tmp_path, "geotiff", capsys)
    line = one_error_line(err)
    assert rc == 1 and "farm_20200101.tif has 3" in line and "farm_20210101.tif has 4" in line


# --- data inspect: PIDray / COCO / mask folder -------------------------------------------------


def _png(path, size=64, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _coco(images: list[str], categories: list[dict], size=64) -> dict:
    square = [[8.0, 8.0, 40.0, 8.0, 40.0, 40.0, 8.0, 40.0]]
    return {"images": [{"id": i + 1, "file_name": f, "height": size, "width": size}
                       for i, f in enumerate(images)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1,
                             "segmentation": square, "iscrowd": 0, "area": 1024.0,
                             "bbox": [8.0, 8.0, 32.0, 32.0]} for i in range(len(images))],
            "categories": categories}


def pidray_root(root, missing=("b.png",)):
    """annotations/xray_train.json over train/a.png, train/c.png and the ``missing`` ones."""
    names = ["a.png", *missing, "c.png"]
    for k, name in enumerate(names):
        if name not in missing:
            _png(root / "train" / name, seed=k)
    write_json(root / "annotations" / "xray_train.json",
               _coco(names, [{"id": 1, "name": "Baton"}]))
    return root


def test_pidray_inspect_names_skipped_files_and_check_refuses_them(tmp_path, capsys):
    root = pidray_root(tmp_path / "pidray")
    with pytest.raises(DataError, match="b.png"):  # what fine-tuning / pretraining do
        PIDray(root)
    assert main(["data", "inspect", str(root), "--format", "pidray"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == 1
    assert len(report["skipped_first"]) == 1
    assert "b.png" in report["skipped_first"][0] and "missing" in report["skipped_first"][0]
    rc, report, err = inspect_check(root, "pidray", capsys)
    line = one_error_line(err)
    assert rc == 1 and "missing file" in line and "b.png" in line
    assert len(report["check"]["refused"]) == 1
    _png(root / "train" / "b.png")  # the image is back: nothing is refused
    rc, report, err = inspect_check(root, "pidray", capsys)
    assert rc == 0 and report["check"] == {"files": 3, "bad": []} and err == ""


def test_coco_check_refuses_an_annotation_pointing_at_a_missing_image(tmp_path, capsys):
    root = tmp_path / "coco"
    _png(root / "a.png")
    _png(root / "c.png", seed=1)
    cats = [{"id": 1, "name": "thing"}]
    write_json(root / "annotations" / "train.json", _coco(["a.png"], cats))
    write_json(root / "annotations" / "test.json", _coco(["c.png", "gone.png"], cats))
    rc, _, err = inspect_check(root, "coco", capsys)
    line = one_error_line(err)
    assert rc == 1 and "gone.png" in line and "test.json" in line


def test_mask_folder_check_refuses_an_image_without_a_mask(tmp_path, capsys):
    root = tmp_path / "mf"
    for k in range(5):
        _png(root / "images" / f"s{k}.png", size=32, seed=k)
        if k != 3:
            (root / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / f"s{k}.png")
    rc, _, err = inspect_check(root, "mask_folder", capsys)
    line = one_error_line(err)
    assert rc == 1 and "s3.png has no mask" in line


# --- side files next to an encoder -------------------------------------------------------------


@pytest.fixture
def encoder(tmp_path):
    """encoder.pt / neck.pt / encoder.json / metrics.json as ``densessl pretrain`` writes them."""
    torch.manual_seed(0)
    enc = DenseEncoder("resnet18", 3, neck="fpn", neck_dim=32, fpn_upsample="nearest")
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path / "run"
    save_torch(folder / "encoder.pt", enc.backbone.state_dict())
    save_torch(folder / "neck.pt", enc.neck.state_dict())
    write_json(folder / "encoder.json", {
        "backbone": "resnet18", "in_channels": 3, "recipe": "t", "data_source": "pidray",
        "fpn_upsample": "nearest", "datasets": [{"name": "PIDray", "licence": "CC-BY-4.0"}]})
    write_json(folder / "metrics.json", {"steps": 10, "status": "finished"})
    return folder / "encoder.pt"


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("encoder.json", b'{"backbone": "resnet18", "datasets": [', "not valid JSON"),
    ("encoder.json", b"", "not valid JSON"),
    ("encoder.json", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("metrics.json", b'["steps"]', "expected a JSON object"),
    ("neck.pt", b"PK\x03\x04 truncated zip", "cannot be read as a torch state dict"),
])
def test_export_refuses_a_damaged_side_file_naming_it(encoder, tmp_path, capsys, name,
                                                      content, problem):
    (encoder.parent / name).write_bytes(content)
    out = tmp_path / "out" / "r18.pt"
    rc = main(["export", str(encoder), "--to", "torchvision", "--neck", "--out", str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(encoder.parent / name) in line and problem in line
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no partial file
    with pytest.raises(DensesslError, match=name) as info:  # fine-tuning reads it the same way
        load_encoder_file(encoder, "resnet18", 3)
    assert "\n" not in str(info.value)


def test_export_names_a_missing_encoder_json(encoder, tmp_path, capsys):
    (encoder.parent / "encoder.json").unlink()
    out = tmp_path / "r18.pt"
    with pytest.warns(UserWarning, match="no encoder.json next to"):
        assert main(["export", str(encoder), "--to", "timm", "--out", str(out)]) == 0
    card = json.loads((tmp_path / "r18.pt.card.json").read_text())
    assert any(str(encoder.parent / "encoder.json") in w for w in card["warnings"])


def test_describe_run_names_a_damaged_metrics_json(encoder):
    (encoder.parent / "metrics.json").write_text('{"steps": 1')
    assert "metrics.json is damaged" in describe_run(encoder.parent)


# --- loaded files never unpickle code ----------------------------------------------------------


class Payload:
    """Unpickling this creates a file: proof that a loader ran code from the file it read."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_carrying_a_pickled_object_are_refused_in_one_line(encoder, tmp_path):
    marker = tmp_path / "ran"
    state = torch.load(encoder, weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, encoder)
    with pytest.raises(DensesslError, match="pickled Python object") as info:
        load_encoder_file(encoder, "resnet18", 3)
    assert "\n" not in str(info.value) and str(encoder) in str(info.value)
    assert not marker.exists()


def test_a_checkpoint_carrying_a_pickled_object_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 3,
                "hyper_parameters": {"recipe": Payload(marker)}}, ckpt)
    with pytest.raises(DensesslError, match="pickled Python object") as info:
        read_checkpoint(ckpt)
    assert "\n" not in str(info.value) and str(ckpt) in str(info.value)
    assert not marker.exists()
    # a checkpoint of tensors and plain types (what Lightning writes) still reads
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 3,
                "hyper_parameters": {"recipe": {"name": "x"}}, "rng": (3, (1, 2), None)}, ckpt)
    assert read_checkpoint(ckpt)["global_step"] == 3


# --- the segment-bank cache --------------------------------------------------------------------


def _bank(root, cache):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = SegmentBank(root, cache_dir=cache)
    rebuilt = [str(w.message) for w in caught if "segment bank: cache" in str(w.message)]
    return bank, rebuilt


def test_segment_cache_refuses_a_pickled_object_and_rebuilds(tmp_path):
    root, cache = pidray_root(tmp_path / "pidray", missing=()), tmp_path / "cache"
    bank, rebuilt = _bank(root, cache)
    assert len(bank) == 2 and rebuilt == []
    marker = tmp_path / "ran"
    torch.save({"segments": [Payload(marker)], "skipped": []}, bank.cache_file)
    again, rebuilt = _bank(root, cache)
    assert not marker.exists()
    assert len(rebuilt) == 1 and "pickled Python object" in rebuilt[0]
    assert str(bank.cache_file) in rebuilt[0] and "rebuilding" in rebuilt[0]
    assert len(again) == 2 and torch.equal(again[0]["image"], bank[0]["image"])
    assert _bank(root, cache)[1] == []  # the rebuilt cache is used as it is


def test_segment_cache_of_another_dataset_or_stale_images_is_rebuilt(tmp_path):
    root, cache = pidray_root(tmp_path / "pidray", missing=()), tmp_path / "cache"
    bank, _ = _bank(root, cache)
    # a foreign cache under this name (another set, written in a shared folder)
    foreign = torch.load(bank.cache_file, weights_only=True)
    foreign["key"] = "0" * 64
    foreign["segments"] = foreign["segments"][:1]
    save_torch(bank.cache_file, foreign)
    again, rebuilt = _bank(root, cache)
    assert len(rebuilt) == 1 and "key mismatch" in rebuilt[0] and len(again) == 2
    # an image edited after the bank was cut: the cached crops would be stale
    image = root / "train" / "a.png"
    _png(image, seed=7)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fresh, rebuilt = _bank(root, cache)
    assert len(rebuilt) == 1 and "a.png changed" in rebuilt[0]
    assert not torch.equal(fresh[0]["image"], bank[0]["image"])
