"""Bit depth: what files declare, what a sample's maximum implies, and scaling by it, against
hand-computed values (a 12-bit X-ray in a 16-bit PNG must reach 1.0, not 0.0625)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from densessl.data.bit_depth import (
    declared_bit_depth,
    depth_for_max,
    resolve_bit_depth,
    scale_to_unit,
)
from densessl.data.decode import decode_image
from densessl.data.stats import band_statistics
from densessl.errors import DataError


def write_png16(path, array: np.ndarray, sbit: int | None = None) -> None:
    """A 16-bit greyscale PNG; with ``sbit`` an sBIT chunk (significant bits) inserted before
    the first IDAT, as scanners and X-ray software write it (PIL cannot write one)."""
    Image.fromarray(array.astype(np.uint16)).save(path)
    if sbit is None:
        return
    data = path.read_bytes()
    at = data.index(b"IDAT") - 4  # the chunk's length field
    body = b"sBIT" + bytes([sbit])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    path.write_bytes(data[:at] + chunk + data[at:])


def test_png_sbit_is_the_declared_depth_and_decodes_to_full_scale(tmp_path):
    img = np.array([[0, 1000], [2048, 4095]], dtype=np.uint16)
    path = tmp_path / "xray.png"
    write_png16(path, img, sbit=12)
    # the chunk is valid PNG: PIL still reads the pixels unchanged
    assert np.array_equal(np.asarray(Image.open(path)), img)
    assert declared_bit_depth(path) == 12
    depth = resolve_bit_depth("auto", [path])
    assert depth == 12
    out = decode_image(path, channels=1, bit_depth=depth)[0]
    expected = np.array([[0, 1000 / 4095], [2048 / 4095, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    # without a depth, the old rule: the storage type's full scale (what squashed it)
    assert decode_image(path, channels=1)[0].max() == pytest.approx(4095 / 65535)


@pytest.mark.parametrize(("top", "expected"), [(255, 8), (256, 10), (1023, 10), (1024, 12),
                                               (3000, 12), (4095, 12), (4096, 14),
                                               (16383, 14), (20000, 16), (65535, 16)])
def test_depth_for_max_is_the_smallest_depth_holding_the_value(top, expected):
    assert depth_for_max(top) == expected


def test_auto_without_metadata_uses_the_sample_maximum(tmp_path):
    files = []
    for i, top in enumerate((900, 3100, 2000)):  # the brightest file decides: 3100 -> 12 bits
        files.append(tmp_path / f"{i}.png")
        write_png16(files[-1], np.array([[0, top]]))
    assert [declared_bit_depth(f) for f in files] == [None, None, None]
    assert resolve_bit_depth("auto", files) == 12
    eight = tmp_path / "rgb.jpg"
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(eight)
    assert resolve_bit_depth("auto", [eight]) == 8
    assert resolve_bit_depth(10, files) == 10  # an explicit depth is kept as it is


def test_geotiff_nbits_is_the_declared_depth(tmp_path):
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=2, dtype="uint16",
                       nbits=12, crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(np.full((2, 8, 8), 4000, np.uint16))
    assert declared_bit_depth(path) == 12
    assert resolve_bit_depth("auto", [path]) == 12


def test_value_above_the_depth_names_the_file_and_the_depth_to_set(tmp_path):
    path = tmp_path / "bright.png"
    write_png16(path, np.array([[0, 5000]]))
    with pytest.raises(DataError, match=r"bright\.png.*5000.*set it to 14"):
        decode_image(path, channels=1, bit_depth=12)
    with pytest.raises(DataError, match="auto or one of"):
        resolve_bit_depth(11, [path])


def test_eight_bit_storage_always_scales_by_255():
    # a folder mixing JPEGs with 12-bit PNGs: the JPEG holds 8 bits whatever data.bit_depth is
    out = scale_to_unit(np.array([0, 51, 255], np.uint8), 12, "x.jpg")
    np.testing.assert_allclose(out, [0, 0.2, 1.0], atol=1e-7)


def test_band_statistics_exclude_nodata_against_masked_numpy():
    rng = np.random.default_rng(0)
    images, valids = [], []
    for _ in range(5):
        img = rng.uniform(0.2, 0.9, size=(3, 16, 16)).astype(np.float32)
        valid = rng.uniform(size=(16, 16)) > 0.3
        img[:, ~valid] = 0.0  # a nodata fill that must not drag the mean down
        images.append(img)
        valids.append(valid)
    mean, std, count = band_statistics(zip(images, valids))
    pixels = np.concatenate([im[:, v] for im, v in zip(images, valids)], axis=1).astype(np.float64)
    assert count == pixels.shape[1]
    np.testing.assert_allclose(mean, pixels.mean(1), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(1), rtol=1e-7)
    with pytest.raises(DataError, match="no valid pixel"):
        band_statistics([(images[0], np.zeros((16, 16), bool))])
