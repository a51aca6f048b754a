"""Bit depth: how many of a pixel's stored bits carry data, and scaling pixels to [0, 1] by it.

A 12-bit X-ray or a 14-bit satellite band is stored in 16-bit files. Dividing it by 65535
squashes it into [0, 0.06]: the augmentation's colour jitter, the normalisation and an
ImageNet init then see a nearly black image. So integer pixels are divided by
``2**bit_depth - 1`` of the *data* (``data.bit_depth``), not of the storage type.

``data.bit_depth: auto`` resolves once per dataset, at start-up:

1. the depth the files declare: a PNG's ``sBIT`` chunk (significant bits), a GeoTIFF's
   ``NBITS`` (GDAL's IMAGE_STRUCTURE metadata), a TIFF's ``BitsPerSample`` when it is not a
   whole byte count;
2. else the maximum over a sample of files (windows for large rasters): the smallest of
   :data:`BIT_DEPTHS` that holds it.

8-bit storage always scales by 255, whatever ``bit_depth`` says: a folder may mix JPEGs with
16-bit PNGs, and an 8-bit file holds no more than 8 bits.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from densessl.errors import DataError

BIT_DEPTHS = (8, 10, 12, 14, 16)
BitDepth = Literal["auto", 8, 10, 12, 14, 16]
#: files read to find the maximum when none declares its depth
SAMPLE_FILES = 16
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RASTER_SUFFIXES = (".tif", ".tiff")


def full_scale(bit_depth: int) -> float:
    """The largest value of ``bit_depth`` bits: what maps to 1.0."""
    return float(2 ** int(bit_depth) - 1)


def depth_for_max(value: float) -> int:
    """The smallest of :data:`BIT_DEPTHS` whose full scale holds ``value``."""
    for depth in BIT_DEPTHS:
        if value <= full_scale(depth):
            return depth
    raise DataError(f"pixel value {value:g} is above 16 bits (65535); expected unsigned images "
                    "of at most 16 bits")


def png_significant_bits(path: str | Path) -> int | None:
    """The PNG ``sBIT`` chunk's largest channel value (the bits that carry data), or None when
    the file has none. Read from the chunk list (PIL does not expose it): chunks before the
    first IDAT, each ``length, type, data, crc``."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return None
            while True:
                header = f.read(8)
                if len(header) < 8:
                    return None
                length, kind = struct.unpack(">I4s", header)
                if kind == b"sBIT":
                    bits = f.read(length)
                    return max(bits) if bits else None
                if kind in (b"IDAT", b"IEND"):
                    return None
                f.seek(length + 4, 1)  # data and CRC
    except OSError:
        return None


def raster_declared_bits(path: str | Path) -> int | None:
    """A GeoTIFF / TIFF's declared significant bits: GDAL's ``NBITS`` (what
    ``gdal_translate -co NBITS=12`` writes), else ``BitsPerSample`` when it is not 8, 16 or
    32 (a packed 12-bit TIFF); None for plain 8/16-bit files."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            nbits = src.tags(ns="IMAGE_STRUCTURE").get("NBITS") or \
                src.tags(1, ns="IMAGE_STRUCTURE").get("NBITS")
            if nbits:
                return int(nbits)
            bits = src.tags(ns="TIFF").get("TIFFTAG_BITSPERSAMPLE")
            return int(bits) if bits and int(bits) not in (8, 16, 32) else None
    except Exception:  # noqa: BLE001 - not a raster GDAL reads: nothing declared
        return None


def declared_bit_depth(path: str | Path) -> int | None:
    """The depth a file declares in its metadata, or None (see the module docstring)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        return png_significant_bits(path)
    if suffix in _RASTER_SUFFIXES:
        return raster_declared_bits(path)
    return None


def image_max(path: Path) -> tuple[float, int]:
    """The largest pixel value of an image file and its storage bits (PIL); an unreadable file
    counts as an empty 8-bit one: it is reported, with the loader's ``skip_bad``, when it is
    read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except (OSError, SyntaxError, ValueError):  # PIL's errors for corrupt files
        return 0.0, 8
    storage = 8 if array.dtype in (np.uint8, np.bool_) else 16
    return (float(array.max()) if array.size else 0.0), storage


def resolve_bit_depth(value: BitDepth | int | None, files: Sequence[str | Path], *,
                      where: str = "data.bit_depth",
                      read_max: Callable[[Path], tuple[float, int]] | None = None) -> int | None:
    """``value`` as a number of bits: itself when it is one, and for ``"auto"`` what the files
    declare, else the depth of the largest value over :data:`SAMPLE_FILES` of them (spread
    evenly over the sorted list). ``read_max(path) -> (max value, storage bits)`` reads a
    file's maximum (default: the whole image with PIL; rasters pass a windowed reader).
    None stays None (the loader's old rule: the storage type's full scale)."""
    if value is None:
        return None
    if value != "auto":
        if value not in BIT_DEPTHS:
            raise DataError(f"{where}: expected auto or one of {list(BIT_DEPTHS)}, got {value!r}")
        return int(value)
    files = [Path(f) for f in files]
    if not files:
        return 8
    step = max(1, len(files) // SAMPLE_FILES)
    sample = files[::step][:SAMPLE_FILES]
    declared = {declared_bit_depth(f) for f in sample} - {None}
    if declared:
        return max(depth_for_max(full_scale(d)) for d in declared)
    read_max = read_max or image_max
    top, storage = 0.0, 8
    for f in sample:
        m, bits = read_max(f)
        top, storage = max(top, m), max(storage, bits)
    if storage == 8:
        return 8
    return depth_for_max(top)


def scale_to_unit(array: np.ndarray, bit_depth: int | None, where: str | Path) -> np.ndarray:
    """float32 in [0, 1] of integer pixels: 8-bit storage by 255, wider storage by
    ``2**bit_depth - 1`` (None: by the storage type's maximum, 65535 for 16-bit). A value
    above that full scale is a :class:`DataError` naming ``where`` and the depth to set."""
    if array.dtype == np.uint8 or bit_depth is None:
        top = float(np.iinfo(array.dtype).max) if array.dtype.itemsize < 4 else 65535.0
    else:
        top = full_scale(bit_depth)
    if array.size:
        lo, hi = array.min(), array.max()
        if lo < 0 or hi > top:
            hint = (f"; data.bit_depth is {bit_depth}: set it to {depth_for_max(hi)} or auto"
                    if bit_depth is not None and 0 <= hi <= 65535 else "")
            raise DataError(f"{where}: pixel values {lo}..{hi} are outside 0..{int(top)}{hint}")
    return array.astype(np.float32) / np.float32(top)
