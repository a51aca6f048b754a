"""SIXray loader on a generated fixture in the real layout (JPEG + CSV + VOC XML)."""

import json
import shutil

import numpy as np
import pytest
import torch

from densessl import cli
from densessl.data.pidray import PIDRAY_CLASSES
from densessl.data.sixray import SIXray, read_voc_boxes
from densessl.data.xray_synth import synthesize_xray
from densessl.errors import DataError

#: image name → [(class name, item mask)] as the fixture writer placed them (recorded below)
PLACED: dict[str, list] = {}


@pytest.fixture(scope="module")
def xray_root(tmp_path_factory):
    """The synthetic set; the SIXray writer's item masks are recorded on the way (PLACED), so
    the loader's boxes can be checked against the objects put in, not against its own parser."""
    from densessl.data import xray_synth

    pending = []

    def recording_place_item(rng, name, height, width):
        mask, attenuation = place_item(rng, name, height, width)
        pending.append((name, np.asarray(mask, dtype=bool)))
        return mask, attenuation

    def recording_voc_xml(name, height, width, objects):
        PLACED[name] = list(pending)
        pending.clear()
        return voc_xml(name, height, width, objects)

    def recording_write_sixray(*args, **kwargs):
        pending.clear()  # the PIDray writer places items too
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(xray_synth, "place_item", recording_place_item)
            patch.setattr(xray_synth, "_voc_xml", recording_voc_xml)
            return write_sixray(*args, **kwargs)

    place_item, voc_xml, write_sixray = (xray_synth.place_item, xray_synth._voc_xml,
                                         xray_synth.write_sixray)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(xray_synth, "write_sixray", recording_write_sixray)
        return synthesize_xray(tmp_path_factory.mktemp("xray"), n=16, seed=5)


def _copy(root, tmp_path):
    dst = tmp_path / "sixray"
    shutil.copytree(root / "sixray", dst)
    return dst


def test_negatives_are_backgrounds(xray_root):
    data = SIXray(xray_root / "sixray", image_size=64)
    names = [f.stem for f, _ in data.items]
    assert names and all(n.startswith("N") for n in names)
    sample = data[0]
    assert sample["image"].shape == (3, 64, 64)
    assert sample["image_labels"].sum() == 0 and sample["boxes"].shape == (0, 4)
    assert data.dataset_cards[0]["name"] == "SIXray"


def test_positives_carry_image_labels_and_boxes(xray_root):
    root = xray_root / "sixray"
    data = SIXray(root, split="all", which="positive", image_size=128)
    assert len(data) == 4  # one image in four is positive
    assert len(PLACED) == 4
    for i, (file, labels) in enumerate(data.items):
        sample = data[i]
        placed = PLACED[file.stem]  # what the fixture writer put in, not what the XML says
        assert placed and sample["labels"].tolist() == [
            PIDRAY_CLASSES.index(name) + 1 for name, _ in placed]
        # image labels list exactly the classes that were placed
        assert {n for n, v in zip(SIXray.classes, labels) if v} == {n for n, _ in placed}
        # the box of each placed item's mask, with COCO edges (a pixel spans [x, x + 1)),
        # by brute force over the mask's rows and columns
        truth = []
        for _, mask in placed:
            cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
            truth.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        # 128 px high images: scale 1, centre crop shifts x only
        w = __import__("PIL.Image", fromlist=["Image"]).open(file).width
        shift = (w - 128) // 2
        expected = torch.tensor(truth, dtype=torch.float32) - torch.tensor([shift, 0, shift, 0])
        torch.testing.assert_close(sample["boxes"], expected.clamp(0, 128))
    # the parser reads the same boxes from the writer's VOC XML
    file = data.items[0][0]
    parsed = read_voc_boxes(root / "positive-Annotation/Annotation" / f"{file.stem}.xml")
    assert [c for c, _ in parsed] == [PIDRAY_CLASSES.index(n) + 1 for n, _ in PLACED[file.stem]]


def test_inspector(xray_root, capsys):
    assert cli.main(["data", "inspect", str(xray_root / "sixray"), "--format", "sixray"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 16 and summary["splits"] == {"10/test": 4, "10/train": 12}
    assert sum(c["positive_images"] for c in summary["classes"].values()) >= 4


def test_wrong_csv_header(xray_root, tmp_path):
    root = _copy(xray_root, tmp_path)
    csv = root / "ImageSet/10/train.csv"
    csv.write_text(csv.read_text().replace("name,Gun", "file,Gun", 1))
    with pytest.raises(DataError, match="train.csv: header must be"):
        SIXray(root)


def test_bad_csv_value(xray_root, tmp_path):
    root = _copy(xray_root, tmp_path)
    csv = root / "ImageSet/10/train.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",yes"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="train.csv: line 3"):
        SIXray(root)


def test_missing_and_truncated_images(xray_root, tmp_path):
    root = _copy(xray_root, tmp_path)
    negatives = sorted((root / "JPEGImage").glob("N*.jpg"))
    negatives[0].unlink()
    with pytest.raises(DataError, match=negatives[0].name):
        SIXray(root)
    with pytest.warns(UserWarning, match="missing file"):
        data = SIXray(root, skip_bad=True)
    assert len(data.skipped_samples) == 1
    negatives[1].write_bytes(negatives[1].read_bytes()[:300])
    with pytest.warns(UserWarning):
        data = SIXray(root, skip_bad=True, verify_images=True)
    assert len(data.skipped_samples) == 2 and negatives[1].name in data.skipped_samples[1]
