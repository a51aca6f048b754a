"""``folder`` with ``tiles: true``: native-resolution crops instead of resizing the image, and
the default (resize + centre crop) unchanged. Expectations are numpy slices of the decoded
file, or the resize written out with cv2."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data.decode import decode_image
from densessl.data.image_folder import ImageFolder


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    big = rng.integers(0, 256, (120, 150, 3)).astype(np.uint8)
    Image.fromarray(big).save(root / "big.png")
    wide = rng.integers(0, 256, (40, 200, 3)).astype(np.uint8)  # shorter than the crop
    Image.fromarray(wide).save(root / "wide.png")
    return root, {"big.png": big, "wide.png": wide}


def test_tiles_are_native_resolution_slices(folder):
    root, arrays = folder
    data = ImageFolder(root, image_size=64, tiles=True, seed=5)
    item = data[data.files.index(root / "big.png")]
    col, row, w, h = item["meta"]["window"]
    assert (w, h) == (64, 64) and 0 <= col <= 150 - 64 and 0 <= row <= 120 - 64
    decoded = decode_image(root / "big.png", 3)
    assert np.array_equal(item["image"].numpy(), decoded[:, row:row + 64, col:col + 64])
    assert np.array_equal(item["image"].numpy(), arrays["big.png"][row:row + 64,
                                                                   col:col + 64].transpose(
        2, 0, 1).astype(np.float32) / np.float32(255))
    assert item["valid"].all()


def test_tiles_pad_images_smaller_than_the_crop_with_invalid(folder):
    root, arrays = folder
    index = [p.name for p in ImageFolder(root, image_size=64).files].index("wide.png")
    rows = set()
    for seed in range(6):
        item = ImageFolder(root, image_size=64, tiles=True, seed=seed)[index]
        col, row, _, _ = item["meta"]["window"]
        assert 0 <= col <= 200 - 64 and -24 <= row <= 0
        rows.add(row)
        valid = np.zeros((64, 64), bool)
        valid[-row:-row + 40] = True
        expected = np.zeros((3, 64, 64), np.float32)
        expected[:, -row:-row + 40] = decode_image(root / "wide.png", 3)[:, :, col:col + 64]
        assert np.array_equal(item["valid"].numpy(), valid)
        assert np.array_equal(item["image"].numpy(), expected)
    assert len(rows) > 1  # not always at the top


def test_tiles_are_the_same_for_the_same_seed_and_index(folder):
    root, _ = folder
    a = ImageFolder(root, image_size=48, tiles=True, seed=1)
    b = ImageFolder(root, image_size=48, tiles=True, seed=1)
    c = ImageFolder(root, image_size=48, tiles=True, seed=2)
    for i in (1, 0):
        assert a[i]["meta"] == b[i]["meta"] and torch.equal(a[i]["image"], b[i]["image"])
    assert any(a[i]["meta"] != c[i]["meta"] for i in range(2))


def test_default_still_resizes_the_short_side_and_centre_crops(folder):
    root, arrays = folder
    data = ImageFolder(root, image_size=64)
    item = data[data.files.index(root / "big.png")]
    assert "valid" not in item and "window" not in item["meta"]
    # 120×150 → 64×80 (area averaging), centre crop of 64 columns from 8
    resized = cv2.resize(arrays["big.png"].astype(np.float32) / 255, (80, 64),
                         interpolation=cv2.INTER_AREA)
    expected = resized[:, 8:72].transpose(2, 0, 1)
    assert np.abs(item["image"].numpy() - expected).max() < 1e-5


def test_bit_depth_auto_scales_12_bit_pngs_by_4095(tmp_path):
    root = tmp_path / "x"
    root.mkdir()
    raw = np.random.default_rng(1).integers(0, 4096, (70, 90)).astype(np.uint16)
    raw[0, 0] = 4095
    Image.fromarray(raw).save(root / "a.png")
    auto = ImageFolder(root, image_size=32, channels=1, tiles=True)
    assert auto.bit_depth == 12
    item = auto[0]
    col, row, _, _ = item["meta"]["window"]
    expected = raw[row:row + 32, col:col + 32].astype(np.float32) / np.float32(4095)
    assert np.allclose(item["image"][0].numpy(), expected, atol=1e-7)
    assert ImageFolder(root, image_size=32, channels=1, bit_depth=16).bit_depth == 16
    assert ImageFolder(root, image_size=32, channels=1, tiles=True, bit_depth=16)[0][
        "image"].max() < 4096 / 65535 + 1e-6
