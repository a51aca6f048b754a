"""Unlabeled images from a folder (PNG, JPEG, TIFF), for pretraining on your own imagery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from densessl.data.bad_samples import ReadSkips
from densessl.data.bit_depth import BitDepth, resolve_bit_depth
from densessl.data.decode import decode_image, warn_if_tiny
from densessl.data.registry import register_checker, register_inspector, register_source
from densessl.data.sixray import resize_crop
from densessl.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursively), sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


@register_source("folder")
class ImageFolder(Dataset):
    """Every image under ``root`` (recursively), resized so its short side is ``image_size``
    and centre-cropped to a square: ``{"image": C×S×S float in [0, 1]}``.

    With ``tiles: true`` an item is instead a random ``image_size`` crop at the image's native
    resolution (large aerial or satellite tiles keep their ground resolution; nothing is
    resized), placed by a generator seeded by ``(seed, index)`` (the same crop for the same
    item in every epoch, worker and resumed run), with ``"valid"`` (S×S bool). An image
    smaller than ``image_size`` is padded with zeros marked invalid, at a random offset,
    rather than upscaled: upscaling would invent pixels at another resolution than the rest.

    Integer images wider than 8 bits are scaled by ``bit_depth`` (``auto``: resolved once over
    a sample of the files, :func:`~densessl.data.bit_depth.resolve_bit_depth`).

    Geometry augmentation happens later on the device, so this stays a plain, cheap loader.
    """

    def __init__(self, path: str | Path, image_size: int = 224, channels: int = 3,
                 skip_bad: bool = False, tiles: bool = False, bit_depth: BitDepth = "auto",
                 seed: int = 0) -> None:
        self.root = Path(path)
        if not self.root.is_dir():
            raise DataError(f"data.path: folder {str(self.root)!r} does not exist")
        self.files = list_images(self.root)
        if not self.files:
            raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) found under "
                            f"{str(self.root)!r}")
        if channels not in (1, 3):
            raise DataError(f"data.channels: image folders give 1 or 3 channels, got {channels}; "
                            "use a GeoTIFF source for multispectral imagery")
        self.image_size, self.channels, self.skip_bad = image_size, channels, skip_bad
        self.tiles, self.seed = tiles, seed
        self.bit_depth = resolve_bit_depth(bit_depth, self.files)
        self.read_skips = ReadSkips(len(self.files))  # unreadable files found in workers

    def __len__(self) -> int:
        return len(self.files)

    def provenance_files(self) -> list[str]:
        """Each item's image, relative to the root (what a ``data.manifest`` row names)."""
        return [p.relative_to(self.root).as_posix() for p in self.files]

    def restrict(self, indices: list[int]) -> None:
        """Keep only these items (provenance filters, densessl.data.manifest)."""
        self.files = [self.files[i] for i in indices]
        self.read_skips = ReadSkips(len(self.files))

    def __getitem__(self, index: int) -> dict:
        # an unreadable file (e.g. truncated): with skip_bad the next one, counted
        return self.read_skips.first_readable(index, self._read, self.skip_bad,
                                              f"data.path {str(self.root)!r}")

    def _read(self, index: int) -> dict:
        path = self.files[index]
        # scaled by bit depth (16-bit too)
        pixels = decode_image(path, self.channels, bit_depth=self.bit_depth)
        if self.tiles:
            return self._tile(index, path, pixels)
        warn_if_tiny(path, *pixels.shape[1:], self.image_size)
        image, *_ = resize_crop(torch.from_numpy(pixels), self.image_size)
        return {"image": image.contiguous(), "meta": {"source": "folder", "file": str(path)}}

    def _tile(self, index: int, path: Path, pixels: np.ndarray) -> dict:
        """The native-resolution crop of item ``index`` (class doc); ``meta["window"]`` is
        ``[col, row, S, S]`` in the image's pixels (negative offsets: padding)."""
        s = self.image_size
        _, h, w = pixels.shape
        rng = np.random.default_rng([self.seed, index])
        col = int(rng.integers(min(0, w - s), max(0, w - s) + 1))
        row = int(rng.integers(min(0, h - s), max(0, h - s) + 1))
        if h >= s and w >= s:
            image = pixels[:, row:row + s, col:col + s]
            valid = np.ones((s, s), bool)
        else:  # smaller than the crop in some side: the image sits inside, zeros around
            image = np.zeros((pixels.shape[0], s, s), np.float32)
            valid = np.zeros((s, s), bool)
            c0, r0 = max(col, 0), max(row, 0)
            c1, r1 = min(col + s, w), min(row + s, h)
            image[:, r0 - row:r1 - row, c0 - col:c1 - col] = pixels[:, r0:r1, c0:c1]
            valid[r0 - row:r1 - row, c0 - col:c1 - col] = True
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "valid": torch.from_numpy(valid),
                "meta": {"source": "folder", "file": str(path), "window": [col, row, s, s]}}


@register_inspector("folder")
def inspect_folder(root: Path) -> dict:
    """``densessl data inspect ROOT --format folder``: image count by extension (add
    ``--manifest`` for licences, images without provenance and flagged images)."""
    files = list_images(root)
    by_ext: dict[str, int] = {}
    for f in files:
        by_ext[f.suffix.lower()] = by_ext.get(f.suffix.lower(), 0) + 1
    return {"format": "folder", "root": str(root), "images": len(files),
            "extensions": dict(sorted(by_ext.items()))}


@register_checker("folder")
def check_folder(root: Path, options: dict) -> list[str]:
    """What ``data.source: folder`` refuses in ``root`` at construction (``data inspect
    --check``; every image is decoded by the check itself). ``options``: those of
    :class:`ImageFolder`."""
    from densessl.data.bad_samples import loader_refusals

    return loader_refusals(ImageFolder, root, options)[0]
