"""PIDray loader on a generated fixture in the real COCO layout (polygons, RLE, crowd, empty)."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from densessl import cli
from densessl.data.pidray import PIDRAY_CLASSES, PIDray, inspect_pidray
from densessl.data.xray_synth import synthesize_xray
from densessl.errors import DataError


@pytest.fixture(scope="module")
def xray_root(tmp_path_factory):
    return synthesize_xray(tmp_path_factory.mktemp("xray"), n=12, seed=3)


def _copy(root, tmp_path):
    dst = tmp_path / "pidray"
    shutil.copytree(root / "pidray", dst)
    return dst


def test_masks_equal_pycocotools(xray_root):
    root = xray_root / "pidray"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "xray_train.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    styles = {("polygon" if isinstance(a["segmentation"], list) else
               "rle_list" if isinstance(a["segmentation"]["counts"], list) else "rle")
              for a in anns}
    assert styles == {"polygon", "rle", "rle_list"}
    assert any(a["iscrowd"] for a in anns)
    data = PIDray(root, split="train")
    assert len(data) == 12
    by_id = {r["id"]: i for i, r in enumerate(data.records)}
    seen_empty = False
    for image_id in coco.getImgIds():
        sample = data[by_id[image_id]]
        img_anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        plain = [a for a in img_anns if not a["iscrowd"]]
        assert sample["instance_masks"].shape[0] == len(plain)
        semantic = np.zeros(sample["mask"].shape, np.int64)
        for k, ann in enumerate(plain):
            expected = coco.annToMask(ann).astype(bool)
            assert np.array_equal(sample["instance_masks"][k].numpy(), expected)
            name = coco.loadCats(ann["category_id"])[0]["name"]
            assert sample["labels"][k] == PIDRAY_CLASSES.index(name) + 1
            x, y, w, h = ann["bbox"]
            torch.testing.assert_close(sample["boxes"][k], torch.tensor([x, y, x + w, y + h]))
        for ann in img_anns:
            semantic[coco.annToMask(ann).astype(bool)] = ann["category_id"]
        assert np.array_equal(sample["mask"].numpy(), semantic)
        assert sample["image"].shape[0] == 3 and 0 <= sample["image"].min() <= 1
        seen_empty |= not img_anns
    assert seen_empty  # an image without annotations loads with an empty target


def test_test_splits_resize_and_extended_layout(xray_root, tmp_path):
    for split in ("easy", "hard", "hidden"):
        assert len(PIDray(xray_root / "pidray", split=split)) >= 4
    sample = PIDray(xray_root / "pidray", split="hard", image_size=64)[0]
    assert sample["image"].shape == (3, 64, 64) and sample["mask"].shape == (64, 64)
    assert sample["instance_masks"].shape[1:] == (64, 64)
    root = tmp_path / "ext"
    (root / "annotations").mkdir(parents=True)
    shutil.copy(xray_root / "pidray/annotations/xray_test_easy.json",
                root / "annotations/test.json")
    shutil.copytree(xray_root / "pidray/easy", root / "test")
    assert len(PIDray(root, split="test")) == len(PIDray(xray_root / "pidray", split="easy"))


def test_inspector_counts(xray_root):
    summary = inspect_pidray(xray_root / "pidray")
    assert summary["format"] == "pidray"
    assert summary["splits"]["train"] == 12 and summary["images"] == sum(summary["splits"].values())
    coco = json.loads((xray_root / "pidray/annotations/xray_train.json").read_text())
    train_instances = len(coco["annotations"])
    assert sum(c["instances"] for c in summary["classes"].values()) >= train_instances
    assert summary["image_size"]["min"][0] == 128 and summary["image_size"]["max"][1] <= 160


def test_cli_synth_and_inspect(tmp_path, capsys):
    assert cli.main(["data", "synth", "xray", "--out", str(tmp_path), "--n", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["data", "inspect", str(tmp_path / "pidray"), "--format", "pidray"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"] == 4
    assert set(summary["classes"]) == set(PIDRAY_CLASSES)
    assert all(c["pixels"] >= 0 for c in summary["classes"].values())


def _edit_json(root, fn):
    path = root / "annotations" / "xray_train.json"
    coco = json.loads(path.read_text())
    fn(coco)
    path.write_text(json.dumps(coco))
    return coco


@pytest.mark.parametrize("problem, expected", [
    ("missing_image", "missing file"),
    ("unknown_category", "unknown category id 99"),
    ("empty_segmentation", "invalid segmentation"),
    ("bad_polygon", "invalid segmentation"),
])
def test_bad_annotations(xray_root, tmp_path, problem, expected):
    root = _copy(xray_root, tmp_path)

    def corrupt(coco):
        ann = next(a for a in coco["annotations"] if not a["iscrowd"])
        if problem == "missing_image":
            coco["images"][3]["file_name"] = "nope.png"
        elif problem == "unknown_category":
            ann["category_id"] = 99
        elif problem == "empty_segmentation":
            ann["segmentation"] = []
        else:
            ann["segmentation"] = [[1.0, 2.0, 3.0]]

    _edit_json(root, corrupt)
    with pytest.raises(DataError, match=expected) as info:
        PIDray(root)
    assert "xray_train.json" in str(info.value)
    with pytest.warns(UserWarning, match=expected):
        data = PIDray(root, skip_bad=True)
    assert len(data.skipped_samples) == 1 and expected in data.skipped_samples[0]
    assert len(data) == 11  # the image with the bad entry is not used half-labeled


def test_truncated_png(xray_root, tmp_path):
    root = _copy(xray_root, tmp_path)
    png = sorted((root / "train").glob("*.png"))[2]
    png.write_bytes(png.read_bytes()[:200])
    data = PIDray(root)
    index = next(i for i, r in enumerate(data.records) if r["file"] == png)
    with pytest.raises(DataError, match=png.name):
        data[index]
    with pytest.warns(UserWarning, match="cannot read image"):
        data = PIDray(root, skip_bad=True, verify_images=True)
    assert len(data) == 11 and png.name in data.skipped_samples[0]
