"""One image decoder for every loader: pixels scaled by their bit depth to [0, 1].

PIL's ``convert("RGB")`` clips a 16-bit image (mode ``I;16``, ``I``) to 0..255 instead of
scaling it, which turns almost every pixel of a real 16-bit X-ray or satellite PNG white. So
integer images are divided by the full scale of their bit depth, never by 255 after a
conversion: ``bit_depth`` bits (``data.bit_depth``; a 12-bit X-ray in a 16-bit PNG by 4095),
or the storage type's maximum (65535) when none is given. 8-bit images go through PIL's
conversion as before (same values).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from densessl.data.bit_depth import scale_to_unit
from densessl.errors import DataError

#: ITU-R 601-2 luma weights, what PIL's convert("L") uses for 8-bit RGB
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: an image whose short side is below image_size / TINY_FACTOR is upscaled by more than this
TINY_FACTOR = 4


class TinyImageWarning(UserWarning):
    """An image far smaller than the size it is resized to: mostly interpolation, no detail."""


def _bit_depth_scale(array: np.ndarray, mode: str, path: Path,
                     bit_depth: int | None) -> np.ndarray:
    """float32 in [0, 1] of an integer or float pixel array."""
    if array.dtype == np.bool_:  # mode "1"
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        # mode "I" (32-bit signed) is how PIL reads 16-bit PNG / TIFF data in some versions: the
        # file's values are 16-bit, so 65535 (or 2**bit_depth - 1) is their full scale
        if array.dtype.itemsize >= 4 and mode.startswith("I"):
            if array.size and (array.min() < 0 or array.max() > 65535):
                raise DataError(f"{path}: {mode} pixel values {array.min()}..{array.max()} are "
                                "outside 0..65535; expected 8- or 16-bit unsigned images")
            array = array.astype(np.uint16)
        return scale_to_unit(array, bit_depth, path)
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise DataError(f"{path}: floating-point image (mode {mode}) with values outside "
                        "[0, 1]; expected 8- or 16-bit images or floats in [0, 1]")
    return array


def decode_image(path: str | Path, channels: int = 3, keep_uint8: bool = False,
                 bit_depth: int | None = None) -> np.ndarray:
    """C×H×W float32 in [0, 1] (C = ``channels``, 1 or 3) of an image file, scaled by its bit
    depth: 8-bit files by 255, wider integer files by ``2**bit_depth - 1`` (the data's depth,
    ``data.bit_depth`` resolved by :func:`densessl.data.bit_depth.resolve_bit_depth`; None:
    the storage type's maximum, 65535 for 16-bit); a truncated or unreadable file is a
    :class:`DataError` naming it. With
    ``keep_uint8`` an 8-bit image stays uint8 0..255 (4× fewer bytes to resize, collate and
    copy; whoever reads it scales it); other bit depths are float32 as always."""
    path = Path(path)
    if channels not in (1, 3):
        raise DataError(f"{path}: images decode to 1 or 3 channels, got {channels}")
    try:
        with Image.open(path) as img:
            img.load()  # decodes every byte: a truncated file fails here, not later
            if img.mode in ("L", "RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "LAB", "HSV",
                            "PA", "RGBX", "La", "RGBa"):
                array = np.asarray(img.convert("RGB" if channels == 3 else "L"))
                if keep_uint8:
                    array = np.ascontiguousarray(array)
                    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()
                array = array.astype(np.float32) / np.float32(255.0)
            else:  # 1-bit, 16-bit, 32-bit int / float: one band, scaled by its depth
                array = _bit_depth_scale(np.asarray(img), img.mode, path, bit_depth)
                if array.ndim == 3:  # multi-band non-8-bit data PIL exposes as an array
                    array = array[..., :3] @ _LUMA if channels == 1 else array[..., :3]
                if array.ndim == 2 and channels == 3:
                    array = np.repeat(array[..., None], 3, axis=-1)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for corrupt files
        raise DataError(f"{path}: cannot read image ({exc})") from None
    array = np.ascontiguousarray(array, dtype=np.float32)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def warn_if_tiny(path: str | Path, height: int, width: int, image_size: int | None) -> None:
    """Warn (once per file and size) when an image is upscaled more than :data:`TINY_FACTOR`
    times to reach ``image_size``: the pixels it yields are interpolation, not data."""
    if image_size and min(height, width) * TINY_FACTOR < image_size:
        warnings.warn(f"{path}: image is {width}×{height} px, upscaled more than "
                      f"{TINY_FACTOR}× to data.image_size {image_size}; check the file or "
                      "lower data.image_size", TinyImageWarning, stacklevel=3)
